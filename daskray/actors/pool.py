"""``ActorPool``: spread calls over a fixed set of actors, as Ray's ActorPool does."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..api import get, wait
from ..errors import GetTimeoutError
from ..refs import ObjectRef


class ActorPool:
    """Run ``fn(actor, value)`` calls on whichever actor of ``actors`` is idle.

    >>> pool = ActorPool([A.remote(), A.remote()])                  # doctest: +SKIP
    >>> list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3]))  # doctest: +SKIP
    [2, 4, 6]
    """

    def __init__(self, actors: list) -> None:
        if not actors:
            raise ValueError("ActorPool needs at least one actor")
        self._idle = deque(actors)
        self._running: dict[ObjectRef, tuple[int, Any]] = {}  # ref -> (index, actor)
        self._results: dict[int, ObjectRef] = {}
        self._pending: deque = deque()  # (fn, value) waiting for an idle actor
        self._next_submit = 0
        self._next_return = 0

    def submit(self, fn: Callable[[Any, Any], ObjectRef], value: Any) -> None:
        """Schedule ``fn(actor, value)`` on an idle actor (or once one is idle)."""
        if self._idle:
            actor = self._idle.popleft()
            ref = fn(actor, value)
            self._running[ref] = (self._next_submit, actor)
            self._results[self._next_submit] = ref
            self._next_submit += 1
        else:
            self._pending.append((fn, value))

    def has_next(self) -> bool:
        return bool(self._running) or bool(self._pending)

    def has_free(self) -> bool:
        return bool(self._idle) and not self._pending

    def _finished(self, ref: ObjectRef) -> None:
        _, actor = self._running.pop(ref)
        self._idle.append(actor)
        if self._pending:
            self.submit(*self._pending.popleft())

    def get_next(self, timeout: float | None = None) -> Any:
        """The next result in submission order."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        while self._next_return not in self._results:
            self._wait_one(timeout)
        ref = self._results.pop(self._next_return)
        self._next_return += 1
        if ref in self._running:
            value = get(ref, timeout=timeout)
            self._finished(ref)
            return value
        return get(ref)

    def get_next_unordered(self, timeout: float | None = None) -> Any:
        """The next result to finish, whichever call it belongs to."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        while not self._running:
            raise StopIteration("no call is running")
        ref = self._wait_one(timeout)
        index = next(i for i, r in self._results.items() if r == ref)
        del self._results[index]
        return get(ref)

    def _wait_one(self, timeout: float | None) -> ObjectRef:
        ready, _ = wait(list(self._running), num_returns=1, timeout=timeout)
        if not ready:
            raise GetTimeoutError(f"no actor call finished within {timeout} s")
        self._finished(ready[0])
        return ready[0]

    def map(self, fn: Callable, values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for every value, in order."""
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Callable, values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for every value, as they finish."""
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next_unordered()
