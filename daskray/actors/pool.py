"""``ActorPool``: spread calls over a set of actors, as Ray's ``ray.util.ActorPool``.

A call is ``fn(actor, value)``, which returns an ObjectRef (or a list of them, for a
method with ``num_returns`` > 1).  An actor is busy from the call until its result is
taken with :meth:`ActorPool.get_next` or :meth:`ActorPool.get_next_unordered`, as in
Ray; calls submitted while no actor is idle wait in the pool and start as results
are taken.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..api import get, wait
from ..errors import ActorDiedError, GetTimeoutError
from ..refs import ObjectRef

#: what ``fn(actor, value)`` returns: one ObjectRef, or a list of them
Future = Any


def _key(future: Future) -> Any:
    """A hashable stand-in for a call's result (a list of refs is not hashable)."""
    return tuple(future) if isinstance(future, list) else future


def _refs(future: Future) -> list[ObjectRef]:
    return list(future) if isinstance(future, (list, tuple)) else [future]


class ActorPool:
    """Run ``fn(actor, value)`` calls on whichever actor of ``actors`` is idle.

    >>> pool = ActorPool([A.remote(), A.remote()])                  # doctest: +SKIP
    >>> list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3]))  # doctest: +SKIP
    [2, 4, 6]
    """

    def __init__(self, actors: Iterable) -> None:
        self._idle: list = list(actors)
        #: key of a started call's result -> (its submission index, its actor)
        self._running: dict[Any, tuple[int, Any]] = {}
        #: submission index -> the call's result, until it is taken
        self._by_index: dict[int, Future] = {}
        #: (fn, value) submitted while no actor was idle
        self._pending: deque = deque()
        self._next_submit = 0

    # ------------------------------------------------------------ submitting

    def submit(self, fn: Callable[[Any, Any], Future], value: Any) -> None:
        """Schedule ``fn(actor, value)`` on an idle actor (or once one is idle)."""
        if not self._idle:
            self._pending.append((fn, value))
            return
        actor = self._idle.pop()
        future = fn(actor, value)
        self._running[_key(future)] = (self._next_submit, actor)
        self._by_index[self._next_submit] = future
        self._next_submit += 1

    def map(self, fn: Callable[[Any, Any], Future], values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for every value, in order.  Results of calls
        submitted before are dropped first (Ray's ``map`` does the same), so the
        iterator yields only this map's."""
        self._drop_earlier_results()
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next)

    def map_unordered(self, fn: Callable[[Any, Any], Future], values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for every value, as they finish (earlier
        submissions' results dropped first, as by :meth:`map`)."""
        self._drop_earlier_results()
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next_unordered)

    def _results(self, take: Callable[[], Any]) -> Iterator:
        while self.has_next():
            yield take()

    def _drop_earlier_results(self) -> None:
        """Forget every call not taken yet without waiting for it: its actor is
        idle again (a new call on it runs after the old one, in the actor's order);
        calls still waiting for an actor start and are forgotten as well."""
        while self._running:
            for key in list(self._running):
                index, actor = self._running.pop(key)
                self._by_index.pop(index, None)
                self._return_actor(actor)

    # ------------------------------------------------------------ taking results

    def has_next(self) -> bool:
        """Whether a submitted call's result is still to be taken."""
        return bool(self._running)

    def has_free(self) -> bool:
        """Whether an actor is idle and no submitted call waits for one."""
        return bool(self._idle) and not self._pending

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order, waiting at most ``timeout`` seconds
        (``GetTimeoutError``, a ``TimeoutError``).  On a timeout the call stays in
        the pool, or, with ``ignore_if_timedout`` (Ray's), it is dropped: its
        result is never returned and the next call's comes next."""
        if not self.has_next():
            raise StopIteration("no more results to get: submit calls first")
        index = min(self._by_index)  # the earliest call whose result is not taken
        future = self._by_index[index]
        if timeout is not None:
            refs = _refs(future)
            ready, _ = wait(refs, num_returns=len(refs), timeout=timeout)
            if len(ready) < len(refs):
                self._timed_out(index, timeout, ignore_if_timedout)
        del self._by_index[index]
        _, actor = self._running.pop(_key(future))
        return self._take(future, actor)

    def get_next_unordered(self, timeout: float | None = None,
                           ignore_if_timedout: bool = False) -> Any:
        """The result of whichever call finishes first, waiting at most ``timeout``
        seconds (``GetTimeoutError``, a ``TimeoutError``).  On a timeout every
        call stays in the pool, or, with ``ignore_if_timedout`` (Ray's), the
        earliest submitted one is dropped."""
        if not self.has_next():
            raise StopIteration("no more results to get: submit calls first")
        try:
            key = self._first_finished(timeout)
        except GetTimeoutError:
            self._timed_out(min(self._by_index), timeout, ignore_if_timedout)
        index, actor = self._running.pop(key)
        future = self._by_index.pop(index)
        return self._take(future, actor)

    def _timed_out(self, index: int, timeout: float | None, drop: bool) -> None:
        """No result within ``timeout``: raise GetTimeoutError; with ``drop``, first
        forget call ``index`` (its actor takes new calls, which run after it)."""
        if not drop:
            raise GetTimeoutError(
                f"no result of the pool's calls was ready within {timeout} s; they stay "
                "in the pool (ignore_if_timedout=True drops the one timed out)")
        future = self._by_index.pop(index)
        _, actor = self._running.pop(_key(future))
        self._return_actor(actor)
        raise GetTimeoutError(
            f"call {index} of the pool was not done within {timeout} s and was dropped "
            "(ignore_if_timedout=True): its result will not be returned")

    def _first_finished(self, timeout: float | None) -> Any:
        """The key of a call all of whose refs are ready, waiting for one."""
        owner = {ref: key for key in self._running for ref in _refs(key)}
        deadline = None if timeout is None else time.monotonic() + timeout
        wanted = 1
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = wait(list(owner), num_returns=min(wanted, len(owner)), timeout=left)
            done = set(ready)
            for key in self._running:
                if all(ref in done for ref in _refs(key)):
                    return key
            if len(ready) < wanted or wanted >= len(owner):
                raise GetTimeoutError(f"no call of the pool finished within {timeout} s")
            wanted = len(ready) + 1  # a call of many refs has only some of them ready

    def _take(self, future: Future, actor: Any) -> Any:
        """The value(s) of ``future``; its actor is idle again unless it died."""
        alive = True
        try:
            return get(future)
        except ActorDiedError:
            alive = False  # a dead actor would take every later call and fail it
            raise
        finally:
            self._return_actor(actor, alive)

    # ------------------------------------------------------------ the actors

    def _return_actor(self, actor: Any, alive: bool = True) -> None:
        if alive:
            self._idle.append(actor)
        if self._pending and self._idle:
            self.submit(*self._pending.popleft())

    def pop_idle(self) -> Any:
        """Take an idle actor out of the pool; None if none is free."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        """Add ``actor`` to the pool (it takes a waiting call at once, if any)."""
        busy = [a for _, a in self._running.values()]
        if actor in self._idle or actor in busy:
            raise ValueError(f"{actor!r} belongs to this ActorPool already")
        self._return_actor(actor)
