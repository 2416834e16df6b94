"""A worker process: runs tasks one at a time and keeps their results.

::

    head ──Run/Free/Cancel/Forget──>  main thread  ──Reports (batched)──> head
                                      │  runs tasks, talks to the head
                                      │  fetches large inputs from peers
    peers, driver ──get──────────>  data-server thread ──frames──> requester
    head ──interrupt─────────────>  (signals the main thread to cancel its task)

The main thread does all of its head I/O between tasks, so a report costs no
thread hand-off; reports are batched and flushed when the queue runs dry, when
a batch is big, or when the oldest report has waited ``FLUSH_SECONDS``; a long
task does not hold back the reports before it (:mod:`.late_reports`).  Its
roles beside running tasks live in modules of their own: the data server and
the reading of other workers' objects (:mod:`.data_server`), the connection a
task's own calls go through, with nested tasks while it waits in ``get()``
(:mod:`.in_task`), and the loop of an actor whose calls run concurrently
(:mod:`.concurrent_actor`).

An actor's process also listens on a *direct* Unix socket (:mod:`.direct_link`:
plain framed messages after the session token, no ZeroMQ on this hop where each
call may wait on the one before): callers that know where it is send calls there
(``DirectCall``), not through the head.  Such a call queues with the head's, runs under its
``direct_key``, and its outcome goes straight back to the caller (a
``RefResult``) and, in the next batch of reports, to the head.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Callable

import zmq

from .. import backend
from ..errors import ObjectLostError, RemoteTraceback, SerializationError, TaskCancelledError
from ..refs import collect_pickled_refs, tracker
from ..scheduler.actors import direct_key
from ..scheduler.policy import INLINE_THRESHOLD
from . import protocol as P
from . import allocator, context, host_transfer, shared_memory, transport
from .concurrent_actor import ConcurrentCalls
from .data_server import DataServer, PeerReader
from .direct_link import DirectServer
from .in_task import RECURSION_LIMIT, InTaskConnection
from .late_reports import LateReports
from .object_store import ObjectStore
from .output import Label, OutputCapture, actor_label, task_label
from .process import child_setup
from .records import (
    DirectErredReport, DirectFinishedReport, DirectReleasedReport, ErredReport, FinishedReport,
    RefsReport, ReleasedReport, RunTask, StartedReport,
)
from .serialization import (
    decode_table, decode_task, dumps, dumps_exception, dumps_frames, frames_nbytes,
)
from .store_memory import HostStore

FLUSH_SECONDS = 0.001
#: as plain ints: zmq.POLLIN is an enum.Flag, whose "&" runs Python code
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
FLUSH_COUNT = 256
#: see ``Worker.when_idle``: long enough that a cluster's start is over before the
#: worker spends CPU on it (after 50 ms, init() took 0.2 s longer)
IDLE_CALL_SECONDS = 0.2
#: how many ended direct calls a worker remembers (see Worker.direct_done)
DIRECT_DONE_KEPT = 4096
#: reports of direct calls whose callers have the outcome already wait at most
#: this long for company (the head is not waited on for them)
LAZY_SECONDS = 0.005
#: a task's exception leaves with at most this many frames of traceback, and this
#: many characters of the remote traceback it carries (an error re-raised through
#: nested calls gathers every level's frames and text otherwise: a thousand
#: levels would take minutes and gigabytes to report)
MAX_TRAVEL_FRAMES = 100
MAX_TRAVEL_CAUSE = 40_000


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


def _reply_bytes(reply: tuple) -> int:
    """About how many bytes a reply to a direct call (RefResult fields) takes."""
    return len(reply[1] or b"") + len(reply[4] or b"") + 64


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
        #: reads this worker's inputs held by other workers
        self.peers = PeerReader(self.ctx, self.token, self.server.lost_peers)
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
        #: an actor's socket for calls sent straight by their callers (see the module)
        self.direct: DirectServer | None = None
        #: direct calls queued or running: {direct key: (caller's connection, ref key)}
        self.direct_calls: dict[str, tuple[int, tuple]] = {}
        #: function tables callers sent with direct calls (kept: callers send each once)
        self.direct_tables: dict[bytes, bytes] = {}
        #: replies to direct calls' callers, sent with the next reports: {connection: [reply]}
        self.direct_replies: dict[int, list] = {}
        #: when the oldest of them was made (``perf_counter``)
        self.first_reply_at = 0.0
        #: pending reports that may not wait (see ``flush``)
        self.urgent_reports = 0
        #: keys of the direct calls that ended lately, oldest first (a cancel that comes
        #: after the end must not say the call was dropped: its report may still wait)
        self.direct_done: dict[str, None] = {}
        self.log = transport.ThrottledLog(prefix=f"daskray worker {self.id}")
        if self.actor is not None:
            direct_path = os.path.join(config["session_dir"], f"a-{self.id}.sock")
            self.direct = DirectServer(direct_path, self.token, self.log)
            context.direct_channel = (direct_path, self.id)
        self.poller = zmq.Poller()
        self.poller.register(self.head, zmq.POLLIN)
        if self.direct is not None:
            self.poller.register(self.direct.fileno(), zmq.POLLIN)
        self.running = True
        #: an actor with max_concurrency > 1 or async methods runs calls on a thread pool
        self.concurrent: ConcurrentCalls | None = None
        if self.actor is not None and config.get("threaded"):
            self.concurrent = ConcurrentCalls(self, config.get("max_concurrency", 1))
        #: what the head answered the tasks' calls (see in_task), and their numbers
        self.results: dict = {}
        self.numbers = itertools.count(1)
        #: ids of the tasks running on the main thread's stack, outermost first
        self.stack: list[int] = []
        #: how deep in nested calls each of them is (1: a call the driver made)
        self.depths: list[int] = []
        self.queue: deque = deque()
        self.tables: dict[Any, Any] = {}
        self.raw_tables: dict[Any, bytes] = {}
        self.reports: list = []  # protocol records, see Reports
        self.first_report_at = 0.0
        #: sends the pending reports while a long task runs (else they wait for its end)
        self.late = LateReports(self._send_reports)
        self.current: int | None = None
        self.cancelled: set[int] = set()
        #: the main thread is in a task's own code (where a cancel may raise)
        self.interruptible = False
        #: queued tasks the data server already reported dropped: never run them
        self.dropped: set[int] = set()
        #: the task taken from the queue to run, until it is on ``stack``: a cancel
        #: meanwhile finds it running, not queued (see ``claim`` and ``_interrupt``)
        self.starting: int | None = None
        #: makes taking a task from the queue and a cancel's look at it atomic
        self.claim_lock = threading.Lock()
        #: a task ran since free heap memory was last returned (see _wait_idle)
        self.heap_used = False
        self.last_task_end = 0.0
        #: forwards what tasks print to the drivers (see start_output)
        self.output: OutputCapture | None = None
        #: called once, the first time the worker waits ``IDLE_CALL_SECONDS`` for work
        self.when_idle: Callable[[], None] | None = None

    # -------------------------------------------------------------- setup

    def start_output(self, head_address: str) -> None:
        """Capture this process's fds 1 and 2: tasks' output goes to the drivers."""
        self.output = OutputCapture(self.ctx, head_address, self.token, self.id)
        self.output.start()

    def start(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        self.server.start()
        self.head.send_multipart(P.hello_frames(self.token, P.ROLE_WORKER, self.id))
        self.head.send(P.encode(
            P.WorkerReady(self.address, os.getpid(), 1, self.resources, self.actor)))

    def _interrupt(self, task_ids: list[int], force: bool = False) -> list[int]:
        """Called in the data-server thread while the main thread may be busy:
        interrupt the running task if listed (``force``: end this process, the
        head starts another); mark listed queued tasks dropped (the main thread
        skips them) and return those, for the head to know now."""
        with self.claim_lock:
            running = set(self.stack)
            running.update(t for t in (self.current, self.starting) if t is not None)
            # the others are queued here, or still unread on the head socket, or
            # done (the head then ignores the answer): none of them may start any more.
            # A direct call that ended is left out: its report may not have left yet
            dropped = [t for t in task_ids if t not in running and t not in self.direct_done]
            self.dropped.update(dropped)
        hit = running.intersection(task_ids)
        if hit and force:  # daskray.cancel(force=True): the head sees this worker die
            os.kill(os.getpid(), signal.SIGKILL)
        if hit:  # raised in the task's own code, or where it waits in get()
            self.cancelled.update(hit)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        return dropped

    def claim(self, task_id: int) -> bool:
        """Take queued task ``task_id`` to run it now, unless a cancel dropped it
        (the head was told it never ran, so it must not).  From here until it
        runs, a cancel sees it as running: it is interrupted, not dropped."""
        with self.claim_lock:
            if task_id in self.dropped:
                self.dropped.discard(task_id)
                return False
            self.starting = task_id
            return True

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        # only inside the task's own code: never in the worker's bookkeeping, and
        # not in a nested task run while the cancelled one waits (wait_for raises).
        # KeyboardInterrupt, as Ray's cancel raises in a task; its caller gets
        # TaskCancelledError (see execute)
        current = self.current
        if self.interruptible and current is not None and current in self.cancelled:
            raise KeyboardInterrupt(f"task {current} was cancelled (daskray.cancel)")

    # -------------------------------------------------------------- loop

    def run(self) -> None:
        if self.concurrent is not None:
            return self.concurrent.run()
        allocator.tune_for_reuse()
        trim = allocator.available()
        while self.running:
            if not self.queue:
                self._settle_output()
                self.flush(lazy=True)
                self._wait_idle(trim)
            self._step()
        self.flush()

    def _wait_idle(self, trim: bool) -> None:
        """Wait for the head's next message; flush ref changes meanwhile, and once
        ``allocator.IDLE_SECONDS`` have passed since the last task ended (if
        ``trim``; other messages do not count) return free heap memory, once."""
        trim_at = self.last_task_end + allocator.IDLE_SECONDS if trim and self.heap_used else None
        idle_since = time.monotonic()
        while True:
            timeout = 1000 if self.when_idle is None else int(IDLE_CALL_SECONDS * 1000)
            if trim_at is not None:
                timeout = max(1, min(timeout, int((trim_at - time.monotonic()) * 1000) + 1))
            if tracker.has_changes():
                timeout = min(timeout, 50)
            if self.reports:  # held back (see LAZY_SECONDS)
                left = self.first_report_at + LAZY_SECONDS - time.perf_counter()
                timeout = max(0, min(timeout, int(left * 1000) + 1))
            if self.poller.poll(timeout):
                return
            if self.direct is not None:  # callers that never authenticate
                self.direct.expire()
            if tracker.has_changes() or self.reports:
                self.flush()
            if self.when_idle is not None and time.monotonic() - idle_since >= IDLE_CALL_SECONDS:
                call, self.when_idle = self.when_idle, None
                call()
            if trim_at is not None and time.monotonic() >= trim_at:
                allocator.release_free_memory()
                trim_at = None
                self.heap_used = False

    def drain(self) -> None:
        """Take every message waiting (the head's, then callers' direct calls)."""
        head = self.head
        # asking is five times cheaper than a recv that fails (it raises zmq.Again),
        # and most steps find nothing waiting
        while head.get(_EVENTS) & _POLLIN:
            try:
                frame = head.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._on_message(frame)
        if self.direct is not None:
            self.drain_direct()

    def drain_direct(self) -> None:
        """Queue the calls callers sent straight to this actor's process."""
        for peer, data in self.direct.receive():
            self._on_direct(peer, data)

    def _on_direct(self, peer: int, data: bytes) -> None:
        """One message from caller connection ``peer`` (``DirectCalls``, or one
        ``DirectCall``): each call joins the queue.  The peer presented the session
        token first (see direct_link); a message that is not such a call is dropped
        before a byte of the task inside is unpickled."""
        try:
            msg = P.decode(data)
            if type(msg) is P.DirectCalls and type(msg.calls) is list:
                calls = msg.calls
            elif type(msg) is P.DirectCall:
                calls = [(msg.ref, msg.table_id, msg.table, msg.body)]
            else:
                raise P.ProtocolError(f"{type(msg).__name__} is not a direct call")
        except (P.ProtocolError, ValueError) as exc:
            self.log.write("dropped a malformed message on the direct socket", str(exc)[:300])
            return
        for call in calls:
            problem = self._direct_problem(call)
            if problem is not None:
                self.log.write("dropped a malformed message on the direct socket", problem)
                continue
            ref, table_id, table, body = call
            if table is not None:
                self.direct_tables[table_id] = table
            key = direct_key(ref)
            self.direct_calls[key] = (peer, ref)
            if key in self.dropped:  # cancelled (through the head) before it came
                self.dropped.discard(key)
                self.report(ReleasedReport(key))
                continue
            self.queue.append(RunTask(key, table_id, body, (), False, None, 1))

    def _direct_problem(self, call: Any) -> str | None:
        """What is wrong with a direct call ``(ref, table_id, table, body)``
        (None: nothing)."""
        if type(call) is not tuple or len(call) != 4:
            return "a direct call is not a (ref, table id, table, body) tuple"
        ref, table_id, table, body = call
        if not (type(ref) is tuple and len(ref) == 3 and type(ref[0]) is bytes
                and type(ref[1]) is int and type(ref[2]) is int
                and type(table_id) is bytes and type(body) is bytes
                and (table is None or type(table) is bytes)):
            return "a direct call's fields have the wrong types"
        if table is None and table_id not in self.direct_tables \
                and table_id not in self.raw_tables:
            return "a direct call refers to a function table never sent"
        if direct_key(ref) in self.direct_calls:
            return "a direct call was sent twice"
        return None

    def _step(self) -> None:
        """Take every message waiting, then run one queued task."""
        self.drain()
        if self.queue and self.running:
            item = self.queue.popleft()
            if not self.claim(item.task):
                self.direct_calls.pop(item.task, None)  # the head knows it was dropped
                return
            self.report(self.execute(*item))
            self.last_task_end = time.monotonic()
            self.heap_used = True
            if (
                len(self.reports) >= FLUSH_COUNT
                or time.perf_counter() - self.first_report_at > FLUSH_SECONDS
            ):
                self.flush(lazy=True)

    def _settle_output(self) -> None:
        """Lines printed from now on are the worker's own, not the last task's."""
        if self.output is not None:
            self.output.settle()

    def _on_message(self, frame: zmq.Frame) -> None:
        try:
            msg = P.decode(frame.buffer)
        except P.ProtocolError as exc:
            self._settle_output()
            print(f"daskray worker {self.id}: dropped a message: {exc}", file=sys.stderr)
            return
        if type(msg) is P.Run:
            self.raw_tables.update(msg.tables)
            for item in msg.tasks:
                for object_id, source in item.deps:
                    if source[0] == "inline":  # kept even if the task is dropped:
                        self.store.put_pickled(object_id, source[1])  # the head counts it
                if item.task in self.dropped:  # cancelled before it even arrived
                    self.dropped.discard(item.task)
                    continue
                self.queue.append(item)
        elif type(msg) is P.Free:
            for object_id in msg.objects:
                self.store.delete(object_id)
        elif type(msg) is P.Cancel:
            drop = set(msg.tasks)
            kept = deque()
            for item in self.queue:
                if item.task in drop:
                    if item.task not in self.dropped:
                        self.report(ReleasedReport(item.task))
                    self.dropped.discard(item.task)
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
        elif type(msg) is P.ActorReply or type(msg) is P.ResourcesReply \
                or type(msg) is P.ActorNames:
            self.results[("reply", msg.request)] = msg
        elif type(msg) is P.Stop:
            self.running = False
        elif type(msg) is P.Rejected:
            self._settle_output()
            print(f"daskray worker {self.id}: the head rejected a message: {msg.reason}",
                  file=sys.stderr)
            if msg.graph is not None:  # a call a task made: its refs fail
                for key in tracker.held_of_graph(self.id.encode(), msg.graph):
                    self.results[key] = P.RefResult(
                        key, None, None, 0, None, "ClusterError",
                        f"the head rejected graph {msg.graph}: {msg.reason}")

    def report(self, item: Any) -> None:
        """Queue a report for the head (sent by ``flush``); the outcome of a direct
        call also goes to its caller, now."""
        t = type(item)
        if (t is FinishedReport or t is ErredReport or t is ReleasedReport) \
                and type(item.task) is str and item.task in self.direct_calls:
            item = self._direct_outcome(item)
            t = type(item)
        if not (t is DirectErredReport or t is DirectFinishedReport and not item.contained):
            self.urgent_reports += 1
        self.late.disarm()
        if not self.reports:
            self.first_report_at = time.perf_counter()
        self.reports.append(item)

    def _direct_outcome(self, item: Any) -> Any:
        """Reply to the caller of a direct call; the report for the head.  A result
        holding ObjectRefs is not sent straight: the head must learn what it holds
        before the caller can use those refs, so the head tells the caller."""
        peer, ref = self.direct_calls.pop(item.task)
        self.direct_done[item.task] = None
        if len(self.direct_done) > DIRECT_DONE_KEPT:
            del self.direct_done[next(iter(self.direct_done))]
        t = type(item)
        reply = None
        if t is FinishedReport:
            if not item.contained:
                holder = None if item.inline is not None else self.address
                reply = (ref, item.inline, holder, item.task, None, None, None)
            report: Any = DirectFinishedReport(ref, item.task, item.nbytes, item.inline,
                                               item.duration, item.contained)
        elif t is ErredReport:
            reply = (ref, None, None, 0, item.error, None, None)
            report = DirectErredReport(ref, item.error)
        else:
            report = DirectReleasedReport(ref)
        if reply is not None:  # sent with the reports (see _send_reports)
            if not self.direct_replies:
                self.first_reply_at = time.perf_counter()
            self.direct_replies.setdefault(peer, []).append(reply)
        return report

    def flush(self, changes: tuple | None = None, lazy: bool = False) -> None:
        """Send the pending reports, after the ref changes recorded so far (or
        ``changes``, taken earlier by the caller).  ``lazy``: reports nobody waits
        on (direct calls' outcomes their callers have) may wait a little longer
        for company, ``LAZY_SECONDS`` at most (the caller of a lazy flush flushes
        again by then)."""
        self.late.disarm()
        self._send_reports(changes, lazy)

    def _send_reports(self, changes: tuple | None = None, lazy: bool = False) -> None:
        now = time.perf_counter()
        if self.direct_replies and (not lazy or not self.queue
                                    or now - self.first_reply_at > FLUSH_SECONDS):
            self._send_replies()  # first: the callers wait for them
        if lazy and changes is None and self.reports and not self.urgent_reports \
                and len(self.reports) < FLUSH_COUNT and not tracker.has_changes() \
                and now - self.first_report_at < LAZY_SECONDS:
            return
        if self.direct_replies:  # never after the reports of the same calls
            self._send_replies()
        added, dropped = tracker.take_changes() if changes is None else changes
        if added or dropped:  # first: a finish report may release a pin they rely on
            self.reports.insert(0, RefsReport(added, dropped))
        if self.reports:
            transport.send_message(self.head, P.encode(P.Reports(self.reports)))
            self.reports = []
            self.urgent_reports = 0

    def _send_replies(self) -> None:
        """Send the replies to direct calls' callers, a batch per caller."""
        replies, self.direct_replies = self.direct_replies, {}
        for peer, results in replies.items():
            for group in P.direct_batches(results, _reply_bytes):
                if not self.direct.send(peer, P.encode(P.DirectResults(group))):
                    break  # the caller is gone: the head has the outcomes

    # -------------------------------------------------------------- running a task

    def _table(self, graph: Any) -> list[Any]:
        table = self.tables.get(graph)
        if table is None:
            raw = self.raw_tables.get(graph)
            table = self.tables[graph] = decode_table(
                raw if raw is not None else self.direct_tables[graph])
        return table

    def _input(self, object_id: int, source: tuple) -> Any:
        if source[0] == "peer":
            return self.peers.fetch(source[1], object_id)
        try:
            return self.store.get(object_id)
        except KeyError:
            raise ObjectLostError(
                f"input object {object_id} is not held by worker {self.id}"
            ) from None

    def execute(self, task_id: int, table_id: Any, body: bytes, deps: tuple,
                notify: bool, parent: int | None = None,
                depth: int = 1) -> FinishedReport | ErredReport:
        """Run one task (``depth`` calls deep); its report (finished or erred).  The
        reports still pending leave while it runs if it runs long (:mod:`.late_reports`)."""
        if not self.reports or self.concurrent is not None:
            return self._execute(task_id, table_id, body, deps, notify, depth)
        self.late.arm(self.first_report_at)
        try:
            return self._execute(task_id, table_id, body, deps, notify, depth)
        finally:
            self.late.disarm()

    def _execute(self, task_id: int, table_id: Any, body: bytes, deps: tuple,
                 notify: bool, depth: int) -> FinishedReport | ErredReport:
        if notify and self.concurrent is None:
            self.report(StartedReport(task_id))
            self.flush()
        start = time.perf_counter()
        node = None
        outer = self.current  # a task waiting in get() runs others meanwhile
        try:
            node, dep_keys = decode_task(body, self._table(table_id))
            values = {key: self._input(oid, src) for key, (oid, src) in zip(dep_keys, deps)}
            if self.concurrent is None:
                with self.claim_lock:
                    self.current = task_id
                    self.stack.append(task_id)
                    self.starting = None
                self.depths.append(depth)
                before = self._output_started(task_id, node)
            elif self.output is not None and self.output.current[0] is None:
                self.output.current = (None, self._output_label(node))  # calls overlap
            try:
                if self.concurrent is None:
                    self.interruptible = True
                if task_id in self.cancelled:  # cancelled while it was being set up
                    raise KeyboardInterrupt(f"task {task_id} was cancelled before it ran")
                result = node(values)
            finally:
                if self.concurrent is None:
                    self.interruptible = False
                    self.stack.pop()
                    self.depths.pop()
                    if self.output is not None:  # back to idle: at the next task
                        self.output.task_ended(before, later=before[0] is None)
            if self.concurrent is None:
                self.current = outer
            if task_id in self.cancelled:  # it caught the KeyboardInterrupt: still cancelled
                raise TaskCancelledError(f"task {task_id} was cancelled while running")
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's
            if self.concurrent is None:
                self.current = outer
                self.starting = None
            if self.actor is not None and isinstance(exc, SystemExit):
                self._exit_actor()
            if task_id in self.cancelled and not isinstance(exc, TaskCancelledError):
                exc = TaskCancelledError(f"task {task_id} was cancelled while running")
            self.cancelled.discard(task_id)
            bound_for_travel(exc)
            return ErredReport(task_id, dumps_exception(exc, getattr(node, "key", task_id)))
        duration = time.perf_counter() - start
        try:
            with collect_pickled_refs() as contained:
                frames = dumps_frames(result)
            nbytes = len(frames[0]) if len(frames) == 1 else frames_nbytes(frames)
            inline = None
            if notify:  # dask callbacks in the driver want every value
                inline = frames[0] if len(frames) == 1 else dumps(result)
            elif nbytes <= INLINE_THRESHOLD:
                inline = frames[0] if len(frames) == 1 else dumps(result)
        except BaseException as exc:  # noqa: BLE001
            key = getattr(node, "key", task_id)
            error = SerializationError(
                f"the result of task {key!r} cannot be sent to other processes: {exc}")
            return ErredReport(task_id, dumps_exception(error, key))
        self.store.put(task_id, result)
        return FinishedReport(task_id, nbytes, inline, duration, tuple(contained))

    def _output_label(self, node: Any) -> Label:
        """The name lines printed by ``node`` are prefixed with, as Ray's: the
        task's function, or an actor's class (made only if it prints a line)."""
        return partial(actor_label if self.actor is not None else task_label,
                       getattr(node, "key", "task"))

    def _output_started(self, task_id: int, node: Any) -> Any:
        """Lines printed from now on are ``task_id``'s; what ran before (or None)."""
        if self.output is None:
            return None
        if type(task_id) is str:  # a direct call: the head knows no task by its key,
            task_id = None        # its lines go to the drivers that asked for output
        return self.output.task_started(task_id, self._output_label(node))

    def _exit_actor(self) -> None:
        """``sys.exit()`` in an actor's method ends the actor for good, as Ray's
        ``exit_actor()`` does (and as in Ray): the head stops this process, and the
        call and those after it raise ActorDiedError."""
        context.worker_session.conn.send(P.KillActorRequest(self.actor))
        threading.Event().wait(60)  # nothing more may run meanwhile
        os._exit(1)

    def close(self) -> None:
        self.late.stop()
        if self.output is not None:
            self.output.close()
        self.peers.close()
        if self.direct is not None:
            self.direct.close()
        self.head.close(0)


def main(make_session: Callable[[InTaskConnection], Any],
         after_start: Callable[[], None] | None = None) -> None:
    """Run a worker process; ``make_session(connection)`` gives the session its
    tasks' Ray-style calls go through (passed in: sessions build on the runtime,
    not the other way round).  ``after_start`` is called once the worker has
    registered and then waited ``IDLE_CALL_SECONDS`` for a task in vain (in the
    main thread: an import there races no task's imports)."""
    sys.setrecursionlimit(RECURSION_LIMIT)
    config = child_setup()
    worker = Worker(config)
    worker.start_output(config["head_address"])
    worker.start()
    # tasks may use the cluster
    context.worker_session = session = make_session(InTaskConnection(worker))
    backend.install(session, in_task=True)
    tracker.on_drop = session.forget
    tracker.reporting = True
    worker.when_idle = after_start
    try:
        worker.run()
    finally:
        worker.close()
        os._exit(0)
