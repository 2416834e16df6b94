"""A worker process: runs tasks one at a time and keeps their results.

::

    head ──Run/Free/Cancel/Forget──>  main thread  ──Reports (batched)──> head
                                      │  runs tasks, talks to the head
                                      │  fetches large inputs from peers
    peers, driver ──get──────────>  data-server thread ──frames──> requester
    head ──interrupt─────────────>  (signals the main thread to cancel its task)

The main thread does all of its head I/O between tasks, so a report costs no
thread hand-off; reports are batched and flushed when the queue runs dry, when
a batch is big, or when the oldest report has waited ``FLUSH_SECONDS``.  The
data-server thread answers other processes while a task runs, and ends the
process when the head is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import zmq

from ..errors import (
    ClusterError, NestingLimitError, ObjectLostError, ObjectStoreFullError,
    RemoteTraceback, SerializationError, TaskCancelledError,
)
from .. import backend
from ..refs import collect_pickled_refs, tracker
from ..scheduler.policy import INLINE_THRESHOLD, SHARE_THRESHOLD
from . import protocol as P
from . import allocator, context, host_transfer, settings, shared_memory, transport
from .store_memory import HostStore
from .fetch import fetch_object
from .object_store import ObjectStore
from .process import child_setup, pidfd
from .serialization import (
    decode_table, decode_task, dumps, dumps_exception, dumps_frames, frames_nbytes, loads,
)

FLUSH_SECONDS = 0.001
FLUSH_COUNT = 256
FETCH_TIMEOUT_MS = 60_000
#: a task's exception leaves with at most this many frames of traceback, and this
#: many characters of the remote traceback it carries (an error re-raised through
#: nested calls gathers every level's frames and text otherwise: a thousand
#: levels would take minutes and gigabytes to report)
MAX_TRAVEL_FRAMES = 100
MAX_TRAVEL_CAUSE = 40_000


def decode_object_id(arg: bytes) -> int | str:
    """Objects are kept under a task id (digits) or a put's key (a string)."""
    text = arg.decode()
    return int(text) if text.isdigit() else text


def bound_for_travel(exc: BaseException) -> None:
    """Cut the middle out of ``exc``'s traceback and out of the remote traceback it
    carries (its ``__cause__``, when it was raised by ``get()``) where they are
    longer than ``MAX_TRAVEL_FRAMES`` / ``MAX_TRAVEL_CAUSE``, in place.  The
    outermost and the innermost parts -- this task's own frames and where the
    error started -- stay."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback) and len(cause.tb) > MAX_TRAVEL_CAUSE:
        half = MAX_TRAVEL_CAUSE // 2
        text = cause.tb
        exc.__cause__ = RemoteTraceback(
            f"{text[:half]}\n... {len(text) - 2 * half} characters of the tracebacks of "
            f"nested calls left out ...\n{text[-half:]}")
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if len(frames) > MAX_TRAVEL_FRAMES:
        keep = MAX_TRAVEL_FRAMES // 2
        frames[keep - 1].tb_next = frames[-keep]


class DataServer(threading.Thread):
    """Serves this process's objects to other processes; watches the parent."""

    def __init__(
        self, ctx: zmq.Context, address: str, token: bytes, store: ObjectStore,
        parent_pid: int, on_interrupt: Any,
    ) -> None:
        super().__init__(name="daskray-data-server", daemon=True)
        self.sock = transport.router(ctx, address, token)
        self.log = transport.ThrottledLog(prefix="daskray worker")
        self.token = token
        self.store = store
        self.parent_pid = parent_pid
        self.on_interrupt = on_interrupt
        self.shm_prefix: str | None = None
        #: data-server addresses of workers the head said died
        self.lost_peers: set[str] = set()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        parent_fd = pidfd(self.parent_pid)
        if parent_fd is not None:
            poller.register(parent_fd, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if parent_fd is not None and parent_fd in events or os.getppid() != self.parent_pid:
                os._exit(0)  # the head is gone: nobody will ever need us again
            if self.sock in events:
                self._serve(self.sock.recv_multipart(copy=False))

    def _serve(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0]
        if len(frames) < 4 or not P.hmac.compare_digest(frames[1].bytes, self.token):
            # every peer has the token (the handshake checked it): a bug, not an attack
            self.log.write("ignored a data request without the session token")
            return
        verb, arg = frames[2].bytes, frames[3].bytes
        try:
            if verb == P.GET:
                object_id = decode_object_id(arg)
                # asked to share it (the driver), shared already, or big: written
                # once, read in place by every reader on the host; else sent (a
                # task reads an input once, and copying beats fresh shared pages)
                share = len(frames) > 4 and frames[4].bytes == P.SHARED
                try:
                    out = None
                    if self.shm_prefix is not None and not share:
                        share = self.store.exported(object_id)
                        if not share:
                            out = self.store.frames(object_id)
                            share = frames_nbytes(out) >= SHARE_THRESHOLD
                    if self.shm_prefix is not None and share:
                        try:
                            descriptor = self.store.export(object_id, self.shm_prefix, out)
                        except (ObjectStoreFullError, OSError) as exc:
                            # no room (or no way) in shared memory: the asker gets a
                            # copy of its own
                            self.log.write("an object was sent, not shared",
                                           f"object {object_id}: {exc}")
                            descriptor = None
                        if descriptor is not None:
                            self.sock.send_multipart([ident, P.SHARED, descriptor])
                            return
                    if out is None:
                        out = self.store.frames(object_id)
                except KeyError:
                    self.sock.send_multipart([ident, P.MISSING])
                    return
                self.sock.send_multipart([ident, P.OK, *out], copy=False)
            elif verb == P.PING:
                self.sock.send_multipart([ident, P.PONG])
            elif verb == P.PEER_LOST:
                self.lost_peers.add(arg.decode())
            elif verb == P.GETSHM:  # a reader on another host
                host_transfer.serve_descriptor(self.sock, ident, arg)
            elif verb == P.PUT:
                key = decode_object_id(arg)
                if len(frames) < 5 or not isinstance(key, str) or key in self.store:
                    raise ValueError("a put must name a new key and the layout of its buffers")
                self.store.put_frames(key, transport.join_buffers(frames[4].bytes, frames[5:]))
                self.sock.send_multipart([ident, P.OK])
            elif verb == P.INTERRUPT:
                dropped = self.on_interrupt([int(x) for x in arg.split(b",") if x])
                if dropped:
                    self.sock.send_multipart(
                        [ident, P.DROPPED, b",".join(str(t).encode() for t in dropped)])
        except Exception as exc:  # noqa: BLE001 - this thread must outlive any request
            self.log.write(f"a {verb[:20]!r} request failed", repr(exc)[:300])
            if verb in (P.GET, P.GETSHM):  # the asker fails now, not after its timeout
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send_multipart([ident, P.MISSING])


class Worker:
    """The main thread's state: queued tasks, function tables, pending reports."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.id: str = config["worker_id"]
        self.token = bytes.fromhex(config["token"])
        self.ctx = zmq.Context()
        self.store = ObjectStore()
        self.address = transport.ipc_address(config["session_dir"], f"w-{self.id}.sock")
        self.server = DataServer(
            self.ctx, self.address, self.token, self.store, config["parent_pid"],
            self._interrupt,
        )
        self.head = transport.dealer(self.ctx, config["head_address"], self.token,
                                     identity=self.id)
        if config.get("shm_prefix") and shared_memory.available():
            self.server.shm_prefix = config["shm_prefix"]
            self.shm_prefix = config["shm_prefix"]
            shared_memory.configure(
                HostStore(self.shm_prefix, config["session_dir"], config["store_limit"]),
                server=self.address,
                fetch_foreign=partial(host_transfer.fetch, self.ctx, self.token))
        else:
            self.shm_prefix = None
        self.resources: dict = config.get("resources") or {}
        self.actor: str | None = config.get("actor")
        #: an actor with max_concurrency > 1 or async methods runs calls on a thread pool; their
        #: reports come back through ``done`` and a wake-up socket
        self.pool: ThreadPoolExecutor | None = None
        self.done: deque = deque()
        if self.actor is not None and config.get("threaded"):
            self.pool = ThreadPoolExecutor(config.get("max_concurrency", 1), "daskray-actor")
            self.wake_pull = self.ctx.socket(zmq.PULL)
            self.wake_pull.bind(f"inproc://daskray-wake-{self.id}")
            self.wake_push = self.ctx.socket(zmq.PUSH)
            self.wake_push.connect(f"inproc://daskray-wake-{self.id}")
            self.wake_lock = threading.Lock()
        #: messages the calls' threads send: the main thread forwards them
        self.outbox: deque = deque()
        #: notified when the main thread has filed messages (results, replies)
        self.news = threading.Condition()
        #: as a client of the cluster (tasks calling .remote() and get()): see session
        self.client_id = self.id.encode()
        self.results: dict = {}
        self._numbers = itertools.count(1)
        #: ids of the tasks running on the main thread's stack, outermost first
        self.stack: list[int] = []
        #: how deep in nested calls each of them is (1: a call the driver made)
        self.depths: list[int] = []
        #: ``daskray.max-nesting-depth``, read when a task first needs it
        self._max_depth: int | None = None
        self.queue: deque = deque()
        self.tables: dict[Any, Any] = {}
        self.raw_tables: dict[Any, bytes] = {}
        self.reports: list[tuple] = []
        self.first_report_at = 0.0
        self.current: int | None = None
        self.cancelled: set[int] = set()
        #: the main thread is in a task's own code (where a cancel may raise)
        self.interruptible = False
        #: queued tasks the data server already reported dropped: never run them
        self.dropped: set[int] = set()
        self.peers: dict[str, zmq.Socket] = {}
        self.running = True
        #: a task ran since free heap memory was last returned (see _wait_idle)
        self.heap_used = False
        self.last_task_end = 0.0

    # -------------------------------------------------------------- setup

    def start(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        self.server.start()
        self.head.send_multipart(P.hello_frames(self.token, P.ROLE_WORKER, self.id))
        self.head.send(P.encode(
            P.WorkerReady(self.address, os.getpid(), 1, self.resources, self.actor)))

    def _interrupt(self, task_ids: list[int]) -> list[int]:
        """Called in the data-server thread while the main thread may be busy:
        interrupt the running task if listed; mark listed queued tasks dropped
        (the main thread skips them) and return those, for the head to know now."""
        running = set(self.stack)
        if self.current is not None:
            running.add(self.current)
        hit = running.intersection(task_ids)
        if hit:  # raised in the task's own code, or where it waits in get()
            self.cancelled.update(hit)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        # the others are queued here, or still unread on the head socket, or done
        # (the head then ignores the answer): none of them may start any more
        dropped = [t for t in task_ids if t not in running]
        self.dropped.update(dropped)
        return dropped

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        # only inside the task's own code: never in the worker's bookkeeping, and
        # not in a nested task run while the cancelled one waits (wait_for raises)
        current = self.current
        if self.interruptible and current is not None and current in self.cancelled:
            raise TaskCancelledError(f"task {current} was cancelled while running")

    # -------------------------------------------------------------- loop

    def run(self) -> None:
        if self.pool is not None:
            return self._run_concurrent()
        allocator.tune_for_reuse()
        trim = allocator.available()
        while self.running:
            if not self.queue:
                self._flush()
                self._wait_idle(trim)
            self._step()
        self._flush()

    def _wait_idle(self, trim: bool) -> None:
        """Wait for the head's next message; flush ref changes meanwhile, and once
        ``allocator.IDLE_SECONDS`` have passed since the last task ended (if
        ``trim``; other messages do not count) return free heap memory, once."""
        trim_at = self.last_task_end + allocator.IDLE_SECONDS if trim and self.heap_used else None
        while True:
            timeout = 1000
            if trim_at is not None:
                timeout = max(1, min(timeout, int((trim_at - time.monotonic()) * 1000) + 1))
            if tracker.has_changes():
                timeout = min(timeout, 50)
            if self.head.poll(timeout):
                return
            if tracker.has_changes():
                self._flush()
            if trim_at is not None and time.monotonic() >= trim_at:
                allocator.release_free_memory()
                trim_at = None
                self.heap_used = False

    def _run_concurrent(self) -> None:
        """An actor with max_concurrency > 1 or async methods: calls start in order
        on the pool, and this thread does the I/O."""
        poller = zmq.Poller()
        poller.register(self.head, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        # refs the calls' threads drop wake this loop through a pipe: safe from any
        # thread and from a finalizer, where a zmq socket or a lock is not
        refs_r, refs_w = os.pipe()
        os.set_blocking(refs_r, False)
        os.set_blocking(refs_w, False)
        poller.register(refs_r, zmq.POLLIN)
        tracker.wake = partial(transport.poke, refs_w)
        while self.running:
            ready = dict(poller.poll(50 if tracker.has_changes() else 1000))
            if refs_r in ready:
                transport.drain_pipe(refs_r)
            if self.wake_pull in ready:
                while True:
                    try:
                        self.wake_pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            self._send_from_calls()
            with self.news:
                self._drain()
                self.news.notify_all()
            while self.queue:
                item = self.queue.popleft()
                self.pool.submit(self._execute, *item).add_done_callback(self._call_done)
            self._send_from_calls()
        with self.news:
            self.news.notify_all()  # waiters see running is False
        self.pool.shutdown(wait=False, cancel_futures=True)

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
            transport.send_message(self.head, P.encode(self.outbox.popleft()))
        for item in done:
            self._report(item)
        self._flush(changes)

    def _call_done(self, future: Any) -> None:
        """In a pool thread: hand the report to the main thread and wake it."""
        self.done.append(future.result())
        self._wake_main()

    def _drain(self) -> None:
        """Take every message waiting."""
        while True:
            try:
                frame = self.head.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frame)

    def _step(self) -> None:
        """Take every message waiting, then run one queued task."""
        self._drain()
        if self.queue and self.running:
            item = self.queue.popleft()
            if item[0] in self.dropped:
                self.dropped.discard(item[0])
                return
            self._report(self._execute(*item))
            self.last_task_end = time.monotonic()
            self.heap_used = True
            if (
                len(self.reports) >= FLUSH_COUNT
                or time.perf_counter() - self.first_report_at > FLUSH_SECONDS
            ):
                self._flush()

    # -------------------------------------------------------------- as a client

    def next_number(self) -> int:
        return next(self._numbers)

    def send(self, msg: Any) -> None:
        if self._from_pool_thread():  # the main thread sends it (see _send_from_calls)
            self.outbox.append(msg)
            self._wake_main()
            return
        self._require_main_thread()
        if type(msg) is P.SubmitGraph and self.stack:
            self._check_depth(msg)
            msg = dataclasses.replace(msg, parent=self.stack[-1])
        self._flush()  # reports and ref changes first: they may be what msg relies on
        transport.send_message(self.head, P.encode(msg))

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
        depth = self.depths[-1] + 1
        limit = self.max_nesting_depth()
        if depth > limit:
            called = next((name for name, body in zip(msg.names, msg.bodies) if body is not None),
                          "a task")
            raise NestingLimitError(
                f"{called} was called {depth} calls deep, past daskray.max-nesting-depth = "
                f"{limit} (each call waiting in get() holds a worker's stack): make the "
                "recursion shallower, or raise the limit with dask.config.set("
                "{'daskray.max-nesting-depth': N}) before daskray.init()")

    def wait_for(self, predicate: Any, timeout: float | None,
                 awaits: Any = None) -> bool:
        """Block a task until ``predicate()`` holds.  ``awaits``: the ObjectRef keys
        it waits for; the head is told, lends this worker's CPU out meanwhile and
        sends it what the task waits for, to run on top of it (see
        SchedulerState._next_nested).  None: a short wait for the head's answer,
        which lends nothing.  In a concurrent actor's thread: wait for the main
        thread to file news."""
        if self._from_pool_thread():
            deadline = None if timeout is None else time.monotonic() + timeout
            with self.news:
                while not predicate():
                    if not self.running:
                        raise ClusterError("the worker is stopping")
                    left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                    if left <= 0:
                        return False
                    self.news.wait(left)
            return True
        self._require_main_thread()
        if predicate():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = self.stack[-1] if self.stack else None
        # an actor's calls stay in order: its process runs nothing else meanwhile
        lend = awaits is not None and self.actor is None
        nest = lend and len(self.stack) < self.max_nesting_depth()  # room on the stack
        interruptible, self.interruptible = self.interruptible, False
        if lend:
            self._report(("blocked", True, waiting, tuple(awaits), nest))
        self._flush()
        try:
            while not predicate():
                if not self.running:
                    raise ClusterError("the worker is stopping")
                if waiting is not None and waiting in self.cancelled:
                    raise TaskCancelledError(f"task {waiting} was cancelled while it waited")
                if self.queue and nest and self._step_nested():
                    continue
                if self.queue and lend:
                    self._give_back_queue()
                self._flush()
                wait_ms = 1000 if deadline is None else int((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    return False
                if self.head.poll(min(wait_ms, 1000)):
                    self._drain()
            return True
        finally:
            self.interruptible = interruptible
            if lend:
                self._report(("blocked", False, waiting))
            self._flush()

    def _step_nested(self) -> bool:
        """Inside a waiting task: take messages, run one queued task meant to run on
        top of it (the head sent it for this task, or it is a call this task made);
        hand the head back the other queued tasks, for other workers to run.
        Whether it ran one."""
        self._drain()
        innermost = self.stack[-1] if self.stack else None
        kept: deque = deque()
        item = None
        for queued in self.queue:
            if queued[0] in self.dropped:
                self.dropped.discard(queued[0])
            elif queued[5] != innermost or innermost is None:
                self._report(("r", queued[0]))
            elif item is None:
                item = queued
            else:
                kept.append(queued)
        self.queue = kept
        if item is None:
            return False
        self._report(self._execute(*item))
        return True

    def _give_back_queue(self) -> None:
        """Hand every queued task back to the head, to run elsewhere."""
        while self.queue:
            self._report(("r", self.queue.popleft()[0]))

    def fetch(self, address: str, object_id: Any) -> Any:
        if address == self.address:
            return self.store.get(object_id)
        return self._input(object_id, ("peer", address))

    def store_large(self, key: str, frames: list) -> str:
        self.store.put_frames(key, [memoryview(f) for f in frames])
        return self.id

    def _from_pool_thread(self) -> bool:
        """Whether this is a thread of a concurrent actor (its calls' threads, its
        event loop, their helpers), whose main thread is free to do the I/O."""
        return self.pool is not None and threading.current_thread() is not threading.main_thread()

    def _wake_main(self) -> None:
        with self.wake_lock:
            self.wake_push.send(b"", zmq.NOBLOCK)

    def _require_main_thread(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ClusterError(
                "daskray calls from a thread a task started are not supported; call "
                ".remote(), get(), put() and wait() from the task's own thread (an actor "
                "with max_concurrency > 1, or with async methods, may call from any thread)")

    def _on_message(self, frame: zmq.Frame) -> None:
        try:
            msg = P.decode(frame.buffer)
        except P.ProtocolError as exc:
            print(f"daskray worker {self.id}: dropped a message: {exc}", file=sys.stderr)
            return
        if type(msg) is P.Run:
            self.raw_tables.update(msg.tables)
            for item in msg.tasks:
                for object_id, source in item[3]:
                    if source[0] == "inline":  # kept even if the task is dropped:
                        self.store.put_pickled(object_id, source[1])  # the head counts it
                if item[0] in self.dropped:  # cancelled before it even arrived
                    self.dropped.discard(item[0])
                    continue
                self.queue.append(item)
        elif type(msg) is P.Free:
            for object_id in msg.objects:
                self.store.delete(object_id)
        elif type(msg) is P.Cancel:
            drop = set(msg.tasks)
            kept = deque()
            for item in self.queue:
                if item[0] in drop:
                    if item[0] not in self.dropped:
                        self._report(("r", item[0]))
                    self.dropped.discard(item[0])
                else:
                    kept.append(item)
            self.queue = kept
        elif type(msg) is P.Forget:
            for table_id in msg.tables:
                self.tables.pop(table_id, None)
                self.raw_tables.pop(table_id, None)
        elif type(msg) is P.RefResult:
            if msg.ref in tracker.counts:
                self.results[msg.ref] = msg
        elif type(msg) is P.ActorReply or type(msg) is P.ResourcesReply:
            self.results[("reply", msg.request)] = msg
        elif type(msg) is P.Stop:
            self.running = False
        elif type(msg) is P.Rejected:
            print(f"daskray worker {self.id}: the head rejected a message: {msg.reason}",
                  file=sys.stderr)
            if msg.graph is not None:  # a call a task made: its refs fail
                for key in tracker.held_of_graph(self.client_id, msg.graph):
                    self.results[key] = P.RefResult(
                        key, None, None, 0, None, "ClusterError",
                        f"the head rejected graph {msg.graph}: {msg.reason}")

    def _report(self, item: tuple) -> None:
        if not self.reports:
            self.first_report_at = time.perf_counter()
        self.reports.append(item)

    def _flush(self, changes: tuple | None = None) -> None:
        """Send the pending reports, after the ref changes recorded so far (or
        ``changes``, taken earlier by the caller)."""
        added, dropped = tracker.take_changes() if changes is None else changes
        if added or dropped:  # first: a finish report may release a pin they rely on
            self.reports.insert(0, ("refs", added, dropped))
        if self.reports:
            transport.send_message(self.head, P.encode(P.Reports(self.reports)))
            self.reports = []

    # -------------------------------------------------------------- running a task

    def _table(self, graph: Any) -> list[Any]:
        table = self.tables.get(graph)
        if table is None:
            table = self.tables[graph] = decode_table(self.raw_tables[graph])
        return table

    def _input(self, object_id: int, source: tuple) -> Any:
        if source[0] == "peer":
            lost = self.server.lost_peers
            if threading.current_thread() is not threading.main_thread():
                # a concurrent actor's thread: a socket of its own for this fetch
                # (a zmq socket serves one thread; an actor may have 1000 of them)
                sock = transport.dealer(self.ctx, source[1], self.token)
                try:
                    return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS,
                                        holder_lost=lambda: source[1] in lost)
                finally:
                    sock.close(0)
            sock = self.peers.get(source[1])
            if sock is None:
                sock = self.peers[source[1]] = transport.dealer(self.ctx, source[1], self.token)
            try:
                return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS,
                                    holder_lost=lambda: source[1] in lost)
            except BaseException:
                # its answer may still come: a later fetch must not read it as its own
                self.peers.pop(source[1], None)
                sock.close(0)
                raise
        try:
            return self.store.get(object_id)
        except KeyError:
            raise ObjectLostError(
                f"input object {object_id} is not held by worker {self.id}"
            ) from None

    def _execute(self, task_id: int, table_id: Any, body: bytes, deps: tuple,
                 notify: bool, parent: int | None = None, depth: int = 1) -> tuple:
        """Run one task (``depth`` calls deep); its report (finished or erred)."""
        if notify and self.pool is None:
            self._report(("s", task_id))
            self._flush()
        start = time.perf_counter()
        node = None
        outer = self.current  # a task waiting in get() runs others meanwhile
        try:
            node, dep_keys = decode_task(body, self._table(table_id))
            values = {key: self._input(oid, src) for key, (oid, src) in zip(dep_keys, deps)}
            if self.pool is None:
                self.current = task_id
                self.stack.append(task_id)
                self.depths.append(depth)
                self.interruptible = True
            try:
                result = node(values)
            finally:
                if self.pool is None:
                    self.interruptible = False
                    self.stack.pop()
                    self.depths.pop()
            if self.pool is None:
                self.current = outer
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's
            if self.pool is None:
                self.current = outer
            self.cancelled.discard(task_id)
            bound_for_travel(exc)
            return ("e", task_id, dumps_exception(exc, getattr(node, "key", task_id)))
        duration = time.perf_counter() - start
        try:
            with collect_pickled_refs() as contained:
                frames = dumps_frames(result)
            nbytes = frames_nbytes(frames)
            inline = None
            if notify:  # dask callbacks in the driver want every value
                inline = frames[0] if len(frames) == 1 else dumps(result)
            elif nbytes <= INLINE_THRESHOLD:
                inline = frames[0] if len(frames) == 1 else dumps(result)
        except BaseException as exc:  # noqa: BLE001
            key = getattr(node, "key", task_id)
            error = SerializationError(
                f"the result of task {key!r} cannot be sent to other processes: {exc}")
            return ("e", task_id, dumps_exception(error, key))
        self.store.put(task_id, result)
        return ("f", task_id, nbytes, inline, duration, tuple(contained))

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close(0)
        self.head.close(0)


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


def main(make_session: Callable[["Worker"], Any]) -> None:
    """Run a worker process; ``make_session(worker)`` gives the session its tasks'
    Ray-style calls go through (passed in: sessions build on the runtime, not the
    other way round)."""
    sys.setrecursionlimit(RECURSION_LIMIT)
    config = child_setup()
    worker = Worker(config)
    worker.start()
    context.worker_session = session = make_session(worker)  # tasks may use the cluster
    backend.install(session, in_task=True)
    tracker.on_drop = session.forget
    tracker.reporting = True
    try:
        worker.run()
    finally:
        worker.close()
        os._exit(0)

