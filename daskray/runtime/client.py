"""The driver's side of the cluster: submit graphs, receive their results.

::

    user threads ──submit (lock-guarded inproc PUSH)──> I/O thread ──DEALER──> head
    user threads <──per-graph SimpleQueue── I/O thread <── results, errors, notices

One I/O thread owns the socket to the head (ZeroMQ sockets are not thread-safe);
any number of user threads may run graphs at once, each waiting on its own
queue.  Large results are fetched by the waiting thread straight from the
worker that holds them.  If the head process dies, every waiting graph fails
with :class:`~daskray.errors.ClusterError` instead of hanging.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Any, Callable

import zmq

from ..errors import ClusterError
from ..refs import tracker
from . import protocol as P
from . import transport
from .process import pidfd
from .serialization import frames_nbytes
from .fetch import fetch_object

FETCH_TIMEOUT_MS = 60_000
#: what threads still waiting for results are told when this process shuts down
SHUT_DOWN = ("daskray.shutdown() was called while this was waiting: the connection to the "
             "cluster is closed. Call daskray.init() again to run more work")


class Client:
    """A connection from this process to a cluster's head."""

    def __init__(self, head_address: str, token: bytes, head_pid: int | None = None) -> None:
        self.token = token
        self.ctx = zmq.Context()
        self._graph_numbers = itertools.count(1)
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._wake_address = f"inproc://daskray-client-{id(self)}"
        self._wake_pull = self.ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_address)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.connect(self._wake_address)
        self.client_id = b"c" + os.urandom(7)
        self._head = transport.dealer(self.ctx, head_address, token, identity=self.client_id)
        self._head_pid = head_pid
        #: what is known of ObjectRefs: {ref key: RefResult}, filed by the I/O thread
        self.results: dict = {}
        self._results_changed = threading.Condition()
        self._next_store = 0
        #: where this process may write shared-memory segments (None: it may not)
        self.shm_prefix: str | None = None
        self._welcome: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: dict[str, str] = {}
        #: data-server addresses of workers that left: a read from one fails at once
        self.lost_workers: set[str] = set()
        self.closed = False
        self.failure: str | None = None
        # ref changes wake the I/O thread through a pipe: a write to it is safe
        # from any thread and from a finalizer, where a zmq socket or a lock is not
        self._ref_wake_r, self._ref_wake_w = os.pipe()
        os.set_blocking(self._ref_wake_r, False)
        os.set_blocking(self._ref_wake_w, False)
        #: ms to keep sending queued messages after close (see AttachedCluster)
        self.linger_ms = 0
        # the head watches the pid of a driver that joins a cluster it did not start
        self._head.send_multipart(P.hello_frames(token, P.ROLE_CLIENT, f"driver:{os.getpid()}"))
        self._thread = threading.Thread(target=self._io_loop, name="daskray-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """Block until the head says all its workers are up; their addresses."""
        try:
            msg = self._welcome.get(timeout=timeout)
        except queue.Empty:
            raise ClusterError(
                f"the daskray cluster did not start within {timeout:.0f} s"
            ) from None
        if isinstance(msg, Exception):
            raise msg
        self.workers = dict(msg.workers)
        return self.workers

    def next_number(self) -> int:
        return next(self._graph_numbers)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None,
                 awaits: Any = None) -> bool:
        """Block until ``predicate()`` holds (checked as results arrive) or timeout.
        ``awaits`` (what is waited for) matters only inside a worker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._results_changed:
            while not predicate():
                if self.failure is not None:
                    raise ClusterError(self.failure)
                remaining = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                self._results_changed.wait(remaining)
        return True

    def store_large(self, key: str, frames: list) -> str:
        """Store a large ``put`` value on a worker; that worker's id."""
        return self.store_many({key: frames})[key]

    def store_many(self, objects: dict[str, list]) -> dict[str, str]:
        """Store large objects on the workers, spread by bytes: {key: worker id}.

        All are sent at once, then every acknowledgement is awaited; the frames
        go without a copy (the worker keeps them as they arrive).
        """
        workers = sorted(self.workers)
        if not workers:
            raise ClusterError("no worker is running to hold the objects")
        start = self._next_store % len(workers)  # ties go round the workers
        load = {wid: 0 for wid in workers[start:] + workers[:start]}
        socks = {}
        placed: dict[str, str] = {}
        try:
            for key, frames in sorted(objects.items(), key=lambda kv: -frames_nbytes(kv[1])):
                wid = min(load, key=load.__getitem__)
                load[wid] += frames_nbytes(frames)
                sock = socks.get(wid)
                if sock is None:
                    sock = socks[wid] = transport.dealer(self.ctx, self.workers[wid], self.token)
                layout, pieces = transport.split_buffers(frames)
                sock.send_multipart([self.token, P.PUT, key.encode(), layout, *pieces], copy=False)
                placed[key] = wid
            self._next_store += 1
            pending = {wid: sum(1 for w in placed.values() if w == wid) for wid in socks}
            for wid, sock in socks.items():
                for _ in range(pending[wid]):
                    if not sock.poll(FETCH_TIMEOUT_MS) or sock.recv() != P.OK:
                        raise ClusterError(f"worker {wid} did not store an object sent to it")
        finally:
            for sock in socks.values():
                sock.close(0)
        return placed

    def new_graph(self) -> tuple[int, queue.SimpleQueue]:
        """A fresh graph number and the queue its messages will arrive on."""
        number = next(self._graph_numbers)
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self.failure is not None:
                raise ClusterError(self.failure)
            self._queues[number] = q
        return number, q

    def send(self, msg: Any) -> None:
        data = P.encode(msg)
        with self._lock:
            if self.closed:
                raise ClusterError("the daskray client is closed; call daskray.init() first")
            self._push.send(data, copy=False)

    def forget(self, number: int) -> None:
        with self._lock:
            self._queues.pop(number, None)

    def fetch(self, address: str, object_id: int) -> Any:
        """Read an object straight from the worker holding it."""
        sock = transport.dealer(self.ctx, address, self.token)
        try:
            return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS, shared=True,
                                holder_lost=lambda: address in self.lost_workers)
        finally:
            sock.close(0)

    def close(self) -> None:
        """Disconnect from the head.  Threads still waiting for results (in ``get``,
        ``wait`` or a dask compute) raise :class:`ClusterError` instead of waiting
        forever for a connection that is gone."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._push.send(b"")  # wakes the I/O thread, which then exits
        self._thread.join(5)
        self._push.close(0)
        # the tracker's wake hook was cleared before close; a late caller writes to -1
        fd, self._ref_wake_w = self._ref_wake_w, -1
        os.close(fd)
        if not self._thread.is_alive():  # else a socket is still open and term() would block
            self.ctx.term()
        self.fail_waiters(SHUT_DOWN)

    def fail_waiters(self, reason: str) -> None:
        """Make every thread waiting for results raise :class:`ClusterError` with
        ``reason``, and any later wait too; a failure already known stands."""
        if self.failure is None:
            self._fail_all(reason)

    # ------------------------------------------------------------------ I/O thread

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._head, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        poller.register(self._ref_wake_r, zmq.POLLIN)
        head_fd = pidfd(self._head_pid) if self._head_pid else None
        if head_fd is not None:
            poller.register(head_fd, zmq.POLLIN)
        watched_fd = head_fd  # closed when the loop ends, watched or not
        try:
            while True:
                ready = dict(poller.poll(50 if tracker.has_changes() else 1000))
                if self._ref_wake_r in ready:
                    transport.drain_pipe(self._ref_wake_r)
                # taken before draining the queue below: a drop recorded after a
                # submission that pins the same ref is then sent after it
                added, dropped = tracker.take_changes()
                if self._wake_pull in ready or added or dropped:
                    while True:
                        try:
                            data = self._wake_pull.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if not len(data.buffer):
                            return
                        transport.send_message(self._head, data)
                    if added or dropped:
                        transport.send_message(self._head, P.encode(P.RefsUpdate(added, dropped)))
                if self._head in ready:
                    while True:
                        try:
                            frame = self._head.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._deliver(frame)
                if head_fd is not None and head_fd in ready:
                    self.fail_waiters("the daskray head process died; the cluster is gone. "
                                   "Call daskray.shutdown() and daskray.init() to start a new one.")
                    poller.unregister(head_fd)
                    head_fd = None
        finally:
            self._head.close(self.linger_ms)
            os.close(self._ref_wake_r)
            if watched_fd is not None:
                os.close(watched_fd)
            self._wake_pull.close(0)

    def _deliver(self, frame: zmq.Frame) -> None:
        try:
            msg = P.decode(frame.buffer)
        except P.ProtocolError:
            return
        t = type(msg)
        if t is P.Welcome:
            self._welcome.put(msg)
        elif t is P.WorkersChanged:
            new = dict(msg.workers)
            self.lost_workers.update(set(self.workers.values()) - set(new.values()))
            self.workers = new
        elif t is P.RefResult:
            if msg.ref in tracker.counts:
                with self._results_changed:
                    self.results[msg.ref] = msg
                    self._results_changed.notify_all()
        elif t is P.ActorReply or t is P.ResourcesReply or t is P.StateSizesReply \
                or t is P.ActorNames or t is P.TimelineReply:
            with self._results_changed:
                self.results[("reply", msg.request)] = msg
                self._results_changed.notify_all()
        elif t is P.Rejected and msg.graph is not None:
            self._fail_graph(msg.graph, f"the head rejected graph {msg.graph}: {msg.reason}")
        elif t is P.Rejected:
            self._fail_all(f"the head rejected a message: {msg.reason}")
        else:
            q = self._queues.get(msg.graph)
            if q is not None:
                q.put(msg)

    def _fail_graph(self, number: Any, reason: str) -> None:
        """One submitted graph was refused: its waiter, or its refs, get the error."""
        q = self._queues.get(number)
        if q is not None:
            q.put(ClusterError(reason))
        keys = tracker.held_of_graph(self.client_id, number)
        with self._results_changed:
            for key in keys:
                self.results[key] = P.RefResult(key, None, None, 0, None, "ClusterError", reason)
            self._results_changed.notify_all()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self.failure = reason
            queues = list(self._queues.values())
        error = ClusterError(reason)
        self._welcome.put(error)
        for q in queues:
            q.put(error)
        with self._results_changed:
            self._results_changed.notify_all()

    def wake_for_refs(self) -> None:
        """Have the I/O thread send the ref changes now (any thread, any context)."""
        transport.poke(self._ref_wake_w)  # a closed pipe (-1) fails quietly too
