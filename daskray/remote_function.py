"""``@daskray.remote`` functions and what a call sends to the cluster.

A call ``f.remote(*args, **kwargs)`` becomes a small graph submitted at once: the
ObjectRefs among the top-level arguments are its external inputs (resolved to
values before the function runs), refs nested in containers travel as refs and
are pinned until the task ends, and one node per return value stands behind the
ObjectRefs handed back.  The function itself is cloudpickled once per function
(cached here) and cached by the workers under the hash of its bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import numbers
from typing import Any, Callable

from . import backend
from .refs import ObjectRef, RefKey, collect_pickled_refs, dask_key_of
from .runtime.serialization import GraphEncoder, table_id

#: option -> check, for functions (actors add their own in actors/)
TASK_OPTIONS = {
    "num_cpus": lambda v: isinstance(v, numbers.Real) and v >= 0,
    "num_gpus": lambda v: isinstance(v, numbers.Real) and v >= 0,
    "resources": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, numbers.Real) and x >= 0 for k, x in v.items()),
    "num_returns": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "max_retries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
    "retry_exceptions": lambda v: isinstance(v, bool),
    "name": lambda v: isinstance(v, str),
}
DEFAULTS = {"num_cpus": 1, "num_returns": 1, "max_retries": 3, "retry_exceptions": False}
#: max_retries=-1 means "retry forever" in Ray; bounded here
INFINITE_RETRIES = 1_000_000


def check_str(what: str, value: Any, *, optional: bool = False) -> None:
    """Ray's check of a name or namespace: a ``TypeError`` if not a str (None
    allowed if ``optional``: not set), a ``ValueError`` if empty."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{what} must not be empty")


def check_options(options: dict, allowed: dict = TASK_OPTIONS,
                  what: str = "a remote function") -> dict:
    """Validate remote options; raise ``ValueError`` naming the bad one (or the
    validator's own ``TypeError``/``ValueError``)."""
    for name, value in options.items():
        if name not in allowed:
            raise ValueError(
                f"invalid option {name!r} for {what}; valid options are "
                f"{', '.join(sorted(allowed))}")
        if not allowed[name](value):
            raise ValueError(f"invalid value {value!r} for option {name!r}")
    return options


class RemoteCall:
    """The task body of one call: the function, its arguments, where refs go."""

    __slots__ = ("key", "func", "args", "kwargs", "ref_slots")

    def __init__(self, key: str, func: Callable, args: tuple, kwargs: dict,
                 ref_slots: tuple) -> None:
        self.key = key
        self.func = func
        self.args = args
        self.kwargs = kwargs
        #: ((position or keyword, dask key of the ref), ...)
        self.ref_slots = ref_slots

    def __call__(self, values: dict) -> Any:
        if not self.ref_slots:
            return self.func(*self.args, **self.kwargs)
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for slot, key in self.ref_slots:
            if type(slot) is int:
                args[slot] = values[key]
            else:
                kwargs[slot] = values[key]
        return self.func(*args, **kwargs)


class NthReturn:
    """Body of the node behind the i-th ObjectRef of a ``num_returns=k`` call."""

    __slots__ = ("key", "index", "count", "source")

    def __init__(self, key: str, index: int, count: int, source: str) -> None:
        self.key = key
        self.index = index
        self.count = count
        self.source = source

    def __call__(self, values: dict) -> Any:
        value = values[self.source]
        try:
            n = len(value)
        except TypeError:
            n = -1
        if n != self.count:
            raise ValueError(
                f"task {self.source} was declared with num_returns={self.count} but "
                f"returned {'a ' + type(value).__name__ if n < 0 else f'{n} values'}")
        return value[self.index]


class _FunctionTable:
    """One function's pickled table, made once and reused by every call: (bytes, id)."""

    __slots__ = ("data", "id")

    def __init__(self, func: Callable) -> None:
        self.data = GraphEncoder(preload=[func]).encode_table()
        self.id = table_id(self.data)


def build_call(func: Callable, table: "_FunctionTable", name: str, args: tuple,
               kwargs: dict, options: dict, graph_number: int) -> dict:
    """The parts of a SubmitGraph message for one call (see ``runtime/protocol``)."""
    external: dict[int, RefKey] = {}
    ext_node: dict[RefKey, int] = {}
    ref_slots = []
    clean_args = list(args)
    clean_kwargs = dict(kwargs)
    for slot, value in itertools.chain(enumerate(args), kwargs.items()):
        if type(value) is ObjectRef:
            key = value._key
            if key not in ext_node:
                ext_node[key] = len(external)
                external[len(external)] = key
            ref_slots.append((slot, dask_key_of(key)))
            if type(slot) is int:
                clean_args[slot] = None
            else:
                clean_kwargs[slot] = None
    k = len(external)
    call_key = f"{name}-{graph_number}"
    call = RemoteCall(call_key, func, tuple(clean_args), clean_kwargs, tuple(ref_slots))
    enc = GraphEncoder(preload=[func])  # the function is entry 0, as in ``table``
    with collect_pickled_refs() as pinned:
        body = enc.encode_task((call, tuple(dask_key_of(r) for r in external.values())),
                               f"{name} (its arguments)")
    dep_nodes = tuple(range(k))
    names = [f"ref-{i}" for i in range(k)] + [call_key]
    deps: list[tuple] = [() for _ in range(k)] + [dep_nodes]
    bodies: list[bytes | None] = [None] * k + [body]
    num_returns = options.get("num_returns", 1)
    if num_returns == 1:
        wanted = [k]
    else:
        wanted = []
        for i in range(num_returns):
            nth = NthReturn(f"{call_key}[{i}]", i, num_returns, call_key)
            names.append(nth.key)
            deps.append((k,))
            bodies.append(enc.encode_task((nth, (call_key,)), nth.key))
            wanted.append(k + 1 + i)
    if enc.table_size == 1:
        table_data, tid = table.data, table.id
    else:  # the arguments hold functions or __main__ objects of their own
        table_data = enc.encode_table()
        tid = table_id(table_data)
    resources = dict(options.get("resources") or {})
    if options.get("num_gpus"):
        resources["GPU"] = options["num_gpus"]
    if options.get("num_cpus", 1) > 1:
        resources["CPU"] = options["num_cpus"]
    max_retries = options.get("max_retries", DEFAULTS["max_retries"])
    return dict(
        names=names, deps=deps, priorities=list(range(len(names))), bodies=bodies,
        data={}, wanted=wanted, groups=[name] * len(names), function_table=table_data,
        table_id=tid, external=external, pinned=list(dict.fromkeys(pinned)),
        max_retries=INFINITE_RETRIES if max_retries == -1 else max_retries,
        retry_exceptions=options.get("retry_exceptions", False),
        resources=resources or None,
    )


class _RunsCoroutine:
    """The task body of an ``async def`` remote function: runs the coroutine to its
    end on an event loop of its own in the worker, so the ref holds its result."""

    __slots__ = ("func",)

    def __init__(self, func: Callable) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return asyncio.run(self.func(*args, **kwargs))

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", "remote_function")


#: a signature that could not be read: calls are not checked
UNCHECKED = None


def call_signature(func: Callable, drop_first: bool = False) -> inspect.Signature | None:
    """What ``func``'s calls must match, for :func:`check_call`: annotations and
    default values dropped (only whether a default exists matters) so that the
    signature pickles with an actor's handle; ``drop_first`` drops ``self``.
    ``UNCHECKED`` when it cannot be read (a builtin, a C extension)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return UNCHECKED
    params = list(sig.parameters.values())
    if drop_first:
        if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return UNCHECKED
        params = params[1:]
    empty = inspect.Parameter.empty
    return inspect.Signature([
        p.replace(annotation=empty, default=empty if p.default is empty else None)
        for p in params])


def check_call(sig: inspect.Signature | None, what: str, args: tuple, kwargs: dict) -> None:
    """Raise ``TypeError`` in the caller, at ``.remote()``, when ``args`` and
    ``kwargs`` do not fit ``sig`` (as Ray does), rather than later in the worker."""
    if sig is UNCHECKED:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc} (the call does not match {what}{sig})") from None


class RemoteFunction:
    """What ``@daskray.remote`` makes of a function: call it with ``.remote()``."""

    def __init__(self, func: Callable, options: dict) -> None:
        if inspect.isclass(func):
            raise TypeError("RemoteFunction wraps functions; classes become actors")
        self._func = _RunsCoroutine(func) if inspect.iscoroutinefunction(func) else func
        self._options = check_options(dict(options))
        self._table: _FunctionTable | None = None
        self._signature: inspect.Signature | None | bool = False  # False: not read yet
        self.__name__ = getattr(func, "__name__", "remote_function")
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"remote function {self.__name__} cannot be called directly; use "
            f"{self.__name__}.remote(...) to run it on the cluster (it returns an "
            "ObjectRef; daskray.get(ref) gives the value)")

    def options(self, **options: Any) -> "RemoteFunction":
        """A copy with these options changed, for one or more calls."""
        clone = RemoteFunction(self.__wrapped__, {**self._options, **check_options(options)})
        clone._table, clone._signature = self._table, self._signature
        return clone

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a call; return its ObjectRef (a list of them when ``num_returns > 1``)."""
        if self._signature is False:
            self._signature = call_signature(self.__wrapped__)
        check_call(self._signature, self.__name__, args, kwargs)
        if self._table is None:
            self._table = _FunctionTable(self._func)
        return backend.current().submit_call(self._func, self._table, args, kwargs, self._options)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("daskray has no DAG API; call .remote() instead")
