"""The loop of an actor whose calls run concurrently (``max_concurrency > 1`` or
async methods): calls start in order on a thread pool, and the main thread does
all of the I/O.

The calls' threads never touch the head's socket: what they send waits in an
outbox, their finish reports in ``done``, and a wake-up socket tells the main
thread; what the main thread files for them (results, replies) is announced on the
``news`` condition they wait on.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import zmq

from ..errors import ClusterError
from ..refs import tracker
from . import protocol as P
from . import transport

#: see worker.LAZY_SECONDS (the same; not imported: worker imports this module)
LAZY_SECONDS = 0.005


class ConcurrentCalls:
    """The concurrent actor's pool and the hand-offs between its threads and the
    main thread of ``worker`` (a :class:`~daskray.runtime.worker.Worker`)."""

    def __init__(self, worker: Any, max_concurrency: int) -> None:
        self.worker = worker
        self.pool = ThreadPoolExecutor(max_concurrency, "daskray-actor")
        #: finish reports of calls, for the main thread to send
        self.done: deque = deque()
        #: messages the calls' threads send: the main thread forwards them
        self.outbox: deque = deque()
        #: notified when the main thread has filed messages (results, replies)
        self.news = threading.Condition()
        self.wake_pull = worker.ctx.socket(zmq.PULL)
        self.wake_pull.bind(f"inproc://daskray-wake-{worker.id}")
        self.wake_push = worker.ctx.socket(zmq.PUSH)
        self.wake_push.connect(f"inproc://daskray-wake-{worker.id}")
        self.wake_lock = threading.Lock()

    def run(self) -> None:
        """The main thread's loop until the worker stops."""
        worker = self.worker
        poller = zmq.Poller()
        poller.register(worker.head, zmq.POLLIN)
        if worker.direct is not None:  # calls callers send straight (see worker)
            poller.register(worker.direct.fileno(), zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        # refs the calls' threads drop wake this loop through a pipe: safe from any
        # thread and from a finalizer, where a zmq socket or a lock is not
        refs_r, refs_w = os.pipe()
        os.set_blocking(refs_r, False)
        os.set_blocking(refs_w, False)
        poller.register(refs_r, zmq.POLLIN)
        tracker.wake = partial(transport.poke, refs_w)
        while worker.running:
            timeout = 50 if tracker.has_changes() else 1000
            if worker.reports:  # held back (see worker.LAZY_SECONDS)
                left = worker.first_report_at + LAZY_SECONDS - time.perf_counter()
                timeout = max(0, min(timeout, int(left * 1000) + 1))
            ready = dict(poller.poll(timeout))
            if refs_r in ready:
                transport.drain_pipe(refs_r)
            if self.wake_pull in ready:
                self._take_wake_ups()
            self._send_from_calls()
            with self.news:
                worker.drain()
                self.news.notify_all()
            while worker.queue:
                item = worker.queue.popleft()
                self.pool.submit(worker.execute, *item).add_done_callback(self._call_done)
            self._send_from_calls()
        with self.news:
            self.news.notify_all()  # waiters see running is False
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _take_wake_ups(self) -> None:
        while True:
            try:
                self.wake_pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _send_from_calls(self) -> None:
        """Send what the calls' threads sent, then their finish reports and the ref
        changes.  Order matters: what a call sent (a submission pinning a ref, a
        put) goes before its finish report (which releases the call's pins) and
        before ref drops recorded after it (a drop of an object the head does not
        know yet is lost).  So the reports and changes are taken first, and then
        every message queued by then goes ahead of them."""
        done = []
        while self.done:
            done.append(self.done.popleft())
        changes = tracker.take_changes()
        while self.outbox:
            transport.send_message(self.worker.head, P.encode(self.outbox.popleft()))
        for item in done:
            self.worker.report(item)
        if changes[0] or changes[1]:
            self.worker.flush(changes)
        else:
            self.worker.flush(lazy=True)

    def _call_done(self, future: Future) -> None:
        """In a pool thread: hand the report to the main thread and wake it."""
        self.done.append(future.result())
        self._wake_main()

    def _wake_main(self) -> None:
        with self.wake_lock:
            self.wake_push.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------ in a call's thread

    def in_call_thread(self) -> bool:
        """Whether this is a thread of the actor (its calls' threads, its event
        loop, their helpers), whose main thread is free to do the I/O."""
        return threading.current_thread() is not threading.main_thread()

    def send(self, msg: Any) -> None:
        """From a call's thread: have the main thread send ``msg``."""
        self.outbox.append(msg)
        self._wake_main()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """From a call's thread: wait until ``predicate()`` holds (the main thread
        files news), at most ``timeout`` seconds.  Whether it holds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.news:
            while not predicate():
                if not self.worker.running:
                    raise ClusterError("the worker is stopping")
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    return False
                self.news.wait(left)
        return True
