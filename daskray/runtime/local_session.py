"""Ray-style calls in ``local_mode``: everything runs at once, in this process.

``f.remote()`` calls ``f`` before returning its ObjectRef, so breakpoints and
tracebacks are ordinary; ``get`` returns the stored value or re-raises the
stored exception.  Arguments are not pickled: the function sees the very objects
it was given (as a remote function in Ray's removed local mode did).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

from ..refs import ObjectRef, RefKey

_LOCAL_OWNER = b"local"


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class LocalSession:
    """The :class:`~daskray.runtime.session.Session` API without a cluster."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.values: dict[RefKey, Any] = {}

    def _store(self, value: Any) -> ObjectRef:
        key = (_LOCAL_OWNER, next(self._numbers), 0)
        ref = ObjectRef(key, owned=True)
        self.values[key] = value
        return ref

    def _resolve(self, value: Any) -> Any:
        if type(value) is ObjectRef:
            return self.get([value])[0]
        return value

    def submit_call(self, func: Callable, table: Any, args: tuple, kwargs: dict,
                    options: dict) -> ObjectRef | list[ObjectRef]:
        try:
            result = func(*map(self._resolve, args),
                          **{k: self._resolve(v) for k, v in kwargs.items()})
        except Exception as exc:  # stored, raised at get() like on a cluster
            outcome: Any = _Failed(exc)
        else:
            outcome = result
        n = options.get("num_returns", 1)
        if n == 1:
            return self._store(outcome)
        if isinstance(outcome, _Failed):
            return [self._store(outcome) for _ in range(n)]
        values = list(outcome)
        if len(values) != n:
            failure = _Failed(ValueError(
                f"task {getattr(func, '__name__', func)} was declared with num_returns={n} "
                f"but returned {len(values)} values"))
            return [self._store(failure) for _ in range(n)]
        return [self._store(v) for v in values]

    def create_actor(self, actor_class: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("actors are not available in local_mode yet")

    def put(self, value: Any) -> ObjectRef:
        return self._store(value)

    def get(self, refs: Sequence[ObjectRef], timeout: float | None = None) -> list:
        out = []
        for ref in refs:
            value = self.values[ref._key]
            if isinstance(value, _Failed):
                raise value.error
            out.append(value)
        return out

    def wait(self, refs: Sequence[ObjectRef], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list, list]:
        if not 0 <= num_returns <= len(refs):
            raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}")
        return list(refs[:num_returns]), list(refs[num_returns:])

    def cancel(self, refs: Sequence[ObjectRef]) -> None:
        """Everything already ran; nothing to cancel."""

    def forget(self, key: RefKey) -> None:
        self.values.pop(key, None)
