"""The connection a task's Ray-style calls go through, inside a worker.

It is the worker's side of :class:`~daskray.runtime.session.Connection`: a task
that calls ``.remote()``, ``put()`` or ``get()`` talks to the head over the
worker's own socket.  A task waiting in ``get()`` does not sit idle: the head lends
its worker's CPU out, and sends it the tasks it waits for, to run on top of it
(nested, on the same stack, up to ``daskray.max-nesting-depth`` deep); what else
was queued goes back to the head, for other workers.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

from ..errors import ClusterError, NestingLimitError
from . import protocol as P
from . import settings, transport
from .records import BlockedReport, ReleasedReport

#: nested tasks run on the stack of the task waiting in get(): room for that
RECURSION_LIMIT = 20_000
#: calls made inside tasks nest at most this deep unless ``daskray.max-nesting-depth``
#: says otherwise; a task that deep cannot make calls (NestingLimitError)
DEFAULT_MAX_NESTING_DEPTH = 1000
#: what one nested task may take of the stack: Python frames (the task's own, the
#: get() it waits in, the worker's) and bytes of C stack, generously
FRAMES_PER_NESTED_TASK = 50
STACK_BYTES_PER_NESTED_TASK = 64 * 1024


def read_max_nesting_depth() -> int:
    """``daskray.max-nesting-depth`` from this process's dask config (the driver's,
    as it was at ``init()``)."""
    return settings.whole_number("daskray.max-nesting-depth", DEFAULT_MAX_NESTING_DEPTH,
                                 1, 2000)


def make_room_for_nesting(depth: int) -> None:
    """Let this process's main thread hold ``depth`` nested tasks: a recursion
    limit and a stack size limit to fit (the main thread's stack grows on demand
    up to the soft limit in force, as far as the hard limit allows)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(),
                              RECURSION_LIMIT + depth * FRAMES_PER_NESTED_TASK))
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 8 * 1024 * 1024 + depth * STACK_BYTES_PER_NESTED_TASK
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise ClusterError(
            "daskray calls from a thread a task started are not supported; call "
            ".remote(), get(), put() and wait() from the task's own thread (an actor "
            "with max_concurrency > 1, or with async methods, may call from any thread)")


class InTaskConnection:
    """The calls of the tasks running in ``worker`` (a
    :class:`~daskray.runtime.worker.Worker`), as a client of the cluster."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.id: str = worker.id
        self.actor: str | None = worker.actor
        self.client_id: bytes = worker.id.encode()
        #: what the head answered (filed by the worker as it reads its messages)
        self.results: dict = worker.results
        self.shm_prefix: str | None = worker.shm_prefix
        self.store = worker.store
        self._numbers = worker.numbers
        #: ``daskray.max-nesting-depth``, read when a task first needs it
        self._max_depth: int | None = None

    @property
    def current(self) -> int | None:
        """The task running now (the innermost, when tasks run nested)."""
        return self.worker.current

    def next_number(self) -> int:
        return next(self._numbers)

    def _calls_thread(self) -> Any:
        """The concurrent actor's calls, if this is one of their threads; else None."""
        calls = self.worker.concurrent
        return calls if calls is not None and calls.in_call_thread() else None

    def send(self, msg: Any) -> None:
        calls = self._calls_thread()
        if calls is not None:  # the main thread sends it
            calls.send(msg)
            return
        require_main_thread()
        worker = self.worker
        if type(msg) is P.SubmitGraph and worker.stack:
            self._check_depth(msg)
            msg = dataclasses.replace(msg, parent=worker.stack[-1])
        worker.flush()  # reports and ref changes first: they may be what msg relies on
        transport.send_message(worker.head, P.encode(msg))

    def max_nesting_depth(self) -> int:
        """``daskray.max-nesting-depth``: how deep calls made inside tasks may nest.
        Read on first use (a task calling daskray has imported dask by then), when
        the process also makes room on its stack for that many nested tasks."""
        if self._max_depth is None:
            self._max_depth = read_max_nesting_depth()
            make_room_for_nesting(self._max_depth)
        return self._max_depth

    def _check_depth(self, msg: P.SubmitGraph) -> None:
        """Refuse a call from the running task that would nest deeper than allowed."""
        depth = self.worker.depths[-1] + 1
        limit = self.max_nesting_depth()
        if depth > limit:
            called = next((name for name, body in zip(msg.names, msg.bodies) if body is not None),
                          "a task")
            raise NestingLimitError(
                f"{called} was called {depth} calls deep, past daskray.max-nesting-depth = "
                f"{limit} (each call waiting in get() holds a worker's stack): make the "
                "recursion shallower, or raise the limit with dask.config.set("
                "{'daskray.max-nesting-depth': N}) before daskray.init()")

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None,
                 awaits: Sequence | None = None) -> bool:
        """Block a task until ``predicate()`` holds.  ``awaits``: the ObjectRef keys
        it waits for; the head is told, lends this worker's CPU out meanwhile and
        sends it what the task waits for, to run on top of it (see
        SchedulerState._next_nested).  None: a short wait for the head's answer,
        which lends nothing.  In a concurrent actor's thread: wait for the main
        thread to file news."""
        calls = self._calls_thread()
        if calls is not None:
            return calls.wait_for(predicate, timeout)
        require_main_thread()
        if predicate():
            return True
        worker = self.worker
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = worker.stack[-1] if worker.stack else None
        # an actor's calls stay in order: its process runs nothing else meanwhile
        lend = awaits is not None and worker.actor is None
        nest = lend and len(worker.stack) < self.max_nesting_depth()  # room on the stack
        interruptible, worker.interruptible = worker.interruptible, False
        if lend:
            worker.report(BlockedReport(True, waiting, tuple(awaits), nest))
        worker.flush()
        try:
            while not predicate():
                if not worker.running:
                    raise ClusterError("the worker is stopping")
                if waiting is not None and waiting in worker.cancelled:  # Ray's signal
                    raise KeyboardInterrupt(f"task {waiting} was cancelled while it waited")
                if worker.queue and nest and self._step_nested():
                    continue
                if worker.queue and lend:
                    self._give_back_queue()
                worker.flush()
                wait_ms = 1000 if deadline is None else int((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    return False
                if worker.head.poll(min(wait_ms, 1000)):
                    worker.drain()
            return True
        finally:
            worker.interruptible = interruptible
            if lend:
                worker.report(BlockedReport(False, waiting))
            worker.flush()

    def _step_nested(self) -> bool:
        """Inside a waiting task: take messages, run one queued task meant to run on
        top of it (the head sent it for this task, or it is a call this task made);
        hand the head back the other queued tasks, for other workers to run.
        Whether it took one off the queue (a cancel may drop it as it is taken)."""
        worker = self.worker
        worker.drain()
        innermost = worker.stack[-1] if worker.stack else None
        kept: deque = deque()
        item = None
        for queued in worker.queue:
            if queued.task in worker.dropped:
                worker.dropped.discard(queued.task)
            elif queued.parent != innermost or innermost is None:
                worker.report(ReleasedReport(queued.task))
            elif item is None:
                item = queued
            else:
                kept.append(queued)
        worker.queue = kept
        if item is None:
            return False
        if not worker.claim(item.task):
            return True
        worker.report(worker.execute(*item))
        return True

    def _give_back_queue(self) -> None:
        """Hand every queued task back to the head, to run elsewhere."""
        worker = self.worker
        while worker.queue:
            worker.report(ReleasedReport(worker.queue.popleft().task))

    def fetch(self, address: str, object_id: Any) -> Any:
        if address == self.worker.address:
            return self.worker.store.get(object_id)
        return self.worker.peers.fetch(address, object_id)

    def store_large(self, key: str, frames: list) -> str:
        self.worker.store.put_frames(key, [memoryview(f) for f in frames])
        return self.id
