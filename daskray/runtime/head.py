"""The head process: a thin loop around the scheduler core.

::

    receive (ROUTER) ──decode, check (intake)──> events ──SchedulerState.handle──>
        instructions ──one handler each──> Outbox (batched per destination) ──send

One poll waits on the socket, the pidfds of the worker processes and of joined
drivers, and the control lines to the workers' data servers.  The head owns its
collaborators, one job each: :class:`~.supervision.WorkerProcesses` starts, reaps
and replaces worker processes; :class:`~.worker_control.WorkerControl` pings them,
interrupts their tasks and kills the hung; :class:`~.clients.Clients` watches
drivers and welcomes them; :class:`~.function_tables.FunctionTables` caches the
graphs' function tables; :class:`~.outbox.Outbox` batches what a loop turn sends.
When the driver that started the cluster exits, however it exits, the head stops
the workers and removes the session directory.

While tasks wait in ``get()``, the scheduler may ask for *extra* workers to use
their CPUs (``StartExtraWorker``) and later retire them (``RetireWorker``); the
head starts and stops those processes, never replaces them, and leaves them out
of the cluster's resources.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any

import zmq

from ..dashboard.process import DashboardProcess
from ..scheduler import events as E
from ..scheduler.state import SchedulerState
from . import protocol as P
from . import shared_memory, transport
from .clients import Clients
from .function_tables import FunctionTables
from .gc_tuning import tune_for_long_lived_state
from .instruction_handlers import InstructionHandlers
from .intake import graph_event, graph_of, put_event, ran_a_task, report_events, request_events
from .outbox import Outbox
from .output_router import OutputRouter, driver_of_task
from .process import child_setup, describe_exit, pidfd
from .status import worker_status
from .store_memory import HostStore
from .supervision import WorkerProcesses, max_extra_workers
from .task_events import TaskEventLog, log_reports
from .worker_control import WorkerControl

#: the head's poll wakes at least this often (heartbeats, due replacements)
TICK_MS = 1000
#: the scheduler hears the time this often (see Tick): it starts extra workers for
#: waits that last, and retires those idle for long enough
TICK_SECONDS = 0.25

class Head:
    """The head's loop: what arrives becomes events, what the scheduler decides
    is carried out; the collaborators it owns do the rest (see the module)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.token = bytes.fromhex(config["token"])
        self.session_dir: str = config["session_dir"]
        self.num_workers: int = config["num_workers"]
        self.parent_pid: int = config["parent_pid"]
        self.shm_prefix: str = config["shm_prefix"]
        self.store_limit: int = config["store_limit"]
        self.ctx = zmq.Context()
        self.sock = transport.router(self.ctx, config["head_address"], self.token)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.processes = WorkerProcesses(config, self.poller)
        shared_memory.configure(HostStore(self.processes.namespace_prefix(0), self.session_dir,
                                          self.store_limit))
        #: complaints about peers, at most one line per kind every few seconds
        self.log = transport.ThrottledLog(prefix="daskray head")
        self.control = WorkerControl(self.ctx, self.token, self.poller, config.get("worker_ttl"))
        self.clients = Clients(self.poller, self.parent_pid, self.shm_prefix)
        self.tables = FunctionTables()
        self.outbox = Outbox(self.sock, self.log)
        self.state = SchedulerState(validate=config.get("validate", False))
        #: the tasks' runs, for daskray.timeline() and the dashboard (bounded)
        self.task_log = TaskEventLog()
        self.peers: dict[bytes, tuple[bytes, str]] = {}  # identity -> (role, name)
        self.worker_address: dict[str, str] = {}  # joined worker -> its data server
        #: every worker was up once and the first driver was welcomed
        self.started = False
        self.running = True
        self.last_tick = 0.0
        #: forwards what tasks print to the drivers that asked
        self.output = OutputRouter(self.outbox.to_client,
                                   lambda task: driver_of_task(self.state.tasks, task))
        #: the live dashboard's process and snapshot publisher, if asked for
        self.dashboard = None if config.get("dashboard_port") is None else \
            DashboardProcess(self.ctx, {**config,
                                        "store_prefix": self.processes.namespace_prefix(0)})
        self.handlers = InstructionHandlers(self.outbox, self.tables, self.processes,
                                            self.control, self.worker_address,
                                            lambda: self.running)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        for slot in range(self.num_workers):
            self.processes.spawn(slot)
        # read while the workers start: it imports dask
        self.state.max_extra_workers = max_extra_workers(self.num_workers)
        parent_fd = pidfd(self.parent_pid)
        if parent_fd is not None:
            self.poller.register(parent_fd, zmq.POLLIN)
        while self.running:
            ready = dict(self.poller.poll(self.poll_timeout_ms()))
            if self.sock in ready:
                self.receive()
            for wid in self.control.ready(ready):
                self.release_dropped(wid, self.control.read_replies(wid))
            for wid in self.processes.exited(ready):
                self.worker_exited(wid)
            for ident in self.clients.exited(ready):
                self.client_gone(ident)
            if (parent_fd is not None and parent_fd in ready) or os.getppid() != self.parent_pid:
                self.running = False
            for wid, tasks in self.control.check(self.processes.procs).items():
                self.release_dropped(wid, tasks)
            self.processes.start_due_replacements()
            self.tick()
            if self.dashboard is not None:
                self.dashboard.publisher.maybe_publish(self, time.monotonic())
            self.outbox.flush(self.processes.procs, self.processes.retiring, self.peers)

    def poll_timeout_ms(self) -> int:
        """How long the loop may sleep in poll: a tick (a finer one while tasks
        wait in get() or extra workers run: the scheduler's clock), or less when
        a replacement is due sooner."""
        tick = (int(TICK_SECONDS * 1000) if self.processes.extra or self.state.blocked
                else TICK_MS)
        if self.dashboard is not None:
            tick = min(tick, self.dashboard.publisher.due_in_ms(time.monotonic()))
        wait = self.processes.seconds_to_next_replacement()
        return tick if wait is None else max(0, min(tick, int(wait * 1000) + 1))

    def tick(self) -> None:
        """Tell the scheduler the time, every ``TICK_SECONDS``."""
        now = time.monotonic()
        if now - self.last_tick >= TICK_SECONDS:
            self.last_tick = now
            self.apply(E.Tick(now))

    def stop(self) -> None:
        """Stop every worker (politely, then by force) and remove the session files."""
        self.running = False
        for wid in self.processes.procs:
            if wid.encode() in self.peers:
                self.outbox.send(wid.encode(), P.Stop())
            else:  # still starting (an extra worker, a replacement): nothing to lose
                self.processes.kill(wid)
        self.processes.wait_all()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.control.close()
        self.sock.close(0)
        self.ctx.term()
        shared_memory.remove_session(self.shm_prefix)
        shutil.rmtree(self.session_dir, ignore_errors=True)

    # ------------------------------------------------------------------ workers

    def worker_ready(self, wid: str, msg: P.WorkerReady) -> None:
        """A worker (or actor process) started and says where its data server is."""
        self.worker_address[wid] = msg.address
        self.control.connect(wid, msg.address)
        self.tables.worker_joined(wid)
        self.apply(E.WorkerJoined(wid, msg.slots, msg.resources, msg.actor))
        if msg.actor is None and wid not in self.processes.extra:
            self.broadcast_workers()
            self.welcome_clients()

    def worker_exited(self, wid: str) -> None:
        """The process ``wid`` exited: forget it; the scheduler hears why, and a
        task worker gets a replacement."""
        proc, returncode = self.processes.reap(wid)
        # its identity authenticates nothing any more (a new peer could take it)
        self.peers.pop(wid.encode(), None)
        self.peers.pop(f"{wid}/output".encode(), None)
        silent = self.control.disconnect(wid)
        cancelled = self.control.take_force_cancel(wid) and returncode == -signal.SIGKILL
        address = self.worker_address.pop(wid, None)
        if address is not None:
            self.control.peer_lost(address)
        self.tables.worker_gone(wid)
        self.outbox.drop_worker(wid)
        if not self.running:
            return
        pid = proc.pid if proc else "?"
        reason = f"pid {pid} {describe_exit(returncode)}" if silent is None else \
            f"pid {pid} stopped answering for {silent:.0f} s and was killed"
        if cancelled:
            reason = f"pid {pid} was ended by daskray.cancel(force=True) of the task it ran"
        actor = self.processes.forget_actor_process(wid)
        if actor is not None:  # the scheduler decides whether it restarts
            self.apply(E.WorkerLost(wid, reason) if wid in self.state.workers
                       else E.ActorStartFailed(actor, reason))
        elif wid in self.processes.extra:
            self.extra_worker_exited(wid, reason)
        elif wid not in self.state.workers and not self.started:
            self.start_up_failed(wid, reason)
        else:
            ws = self.state.workers.get(wid)
            crash_loop = self.processes.crash_loop_death(
                wid, returncode, None if ws is None else bool(ws.processing)) and not cancelled
            self.apply(E.WorkerLost(wid, reason, cancelled))
            self.broadcast_workers()
            self.processes.replace(wid, reason, crash_loop)

    def extra_worker_exited(self, wid: str, reason: str) -> None:
        """Never replaced: the scheduler starts another if need be."""
        self.processes.extra.discard(wid)
        if wid in self.processes.retiring:
            self.processes.retiring.discard(wid)
            return
        print(f"daskray: extra worker {wid} {reason}", file=sys.stderr)
        self.apply(E.WorkerLost(wid, reason))

    def start_up_failed(self, wid: str, reason: str) -> None:
        """A worker died before it ever joined, at start: a start-up failure, not
        bad luck.  The waiting drivers are told, and the head stops."""
        for ident in self.clients.take_waiting():
            self.outbox.to_client(ident, P.Rejected(
                f"worker {wid} ({reason}) during start-up; its error output is above"))
        self.running = False

    def release_dropped(self, wid: str, tasks: list[int]) -> None:
        """Worker ``wid`` dropped these queued tasks unrun (it was told to cancel them)."""
        for task in tasks:
            self.apply(E.TaskReleased(task, wid))

    def task_workers(self) -> dict[str, str]:
        """The joined task workers' data servers (not actors', not extra workers')."""
        return {w: a for w, a in self.worker_address.items()
                if w not in self.processes.actor_of and w not in self.processes.extra}

    def broadcast_workers(self) -> None:
        msg = P.WorkersChanged(self.task_workers())
        for ident, (role, _) in self.peers.items():
            if role == P.ROLE_CLIENT:
                self.outbox.to_client(ident, msg)

    # ------------------------------------------------------------------ clients

    def welcome_clients(self) -> None:
        """Welcome waiting drivers: at start, once every worker is up; later (a
        driver joining), at once, whatever replacements are still starting."""
        if not self.started and len(
                [w for w in self.worker_address if w not in self.processes.actor_of]) \
                < self.num_workers:
            return
        self.started = True
        for ident in self.clients.take_waiting():
            self.outbox.to_client(ident, P.Welcome(dict(self.worker_address), self.session_dir))

    def client_gone(self, ident: bytes) -> None:
        """A driver disconnected or died: cancel its dask graphs, drop its refs."""
        pid = self.clients.forget(ident)
        self.output.forget(ident)
        if self.peers.pop(ident, None) is not None:
            self.outbox.drop_client(ident)
            self.apply(E.ClientLost(ident))
        if pid is not None:  # files it wrote but never told about (killed in a put)
            self.clients.remove_unannounced_files(
                pid, {ts.shared for ts in self.state.tasks.values() if ts.shared})

    def resources(self) -> tuple[dict, dict]:
        """What the task workers offer in all, and what the idle ones offer (a
        worker runs one task at a time); plus the object store's bytes."""
        total: dict = {}
        available: dict = {}
        for ws in self.state.workers.values():
            if ws.actor is not None or ws.extra:  # extra workers stand in for waiting ones
                continue
            idle = not ws.processing and not ws.queue
            for name, amount in ws.resources.items():
                total[name] = total.get(name, 0.0) + float(amount)
                if idle:
                    available[name] = available.get(name, 0.0) + float(amount)
        total["object_store_memory"] = float(self.store_limit)
        available["object_store_memory"] = float(
            max(0, self.store_limit - shared_memory.store().stats()["used"]))
        return total, available

    def state_sizes(self) -> dict[str, int]:
        """The scheduler state's sizes (``SchedulerState.sizes``) and the head's
        own per-graph bookkeeping: what a finished workload must not leave."""
        return {**self.state.sizes(), **self.tables.sizes(),
                "pending replacements": len(self.processes.pending)}

    # ------------------------------------------------------------------ receiving

    def receive(self) -> None:
        """Handle what waits on the socket, a thousand messages at most at a time."""
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.on_frames(frames)

    def on_frames(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        peer = self.peers.get(ident)
        if peer is None:
            self.on_hello(ident, frames)
            return
        try:
            msg = P.decode(transport.join_frames(frames[1:]))
            batched = P.batch_items(msg) if type(msg) is P.Batch else None
        except (P.ProtocolError, ValueError) as exc:
            self.reject(ident, peer, str(exc))
            return
        if batched is None:
            self.on_message(ident, peer, msg)
            return
        for data in batched:  # a driver's burst of messages, in order
            if self.peers.get(ident) is not peer:
                return  # it said goodbye: the rest is of no use
            try:
                msg = P.decode_batched(data)
            except P.ProtocolError as exc:
                self.reject(ident, peer, str(exc))
                continue
            self.on_message(ident, peer, msg)

    def on_message(self, ident: bytes, peer: tuple, msg: Any) -> None:
        """One decoded message of the peer ``ident``."""
        role, name = peer
        if type(msg) is P.WorkerOutput and role == P.ROLE_WORKER:  # its output thread
            self.forward_output(name, msg)
            return
        if role == P.ROLE_WORKER and name not in self.processes.procs:
            return  # a worker that has exited: what it sent last is of no use
        try:
            if role == P.ROLE_WORKER:
                self.on_worker_message(name, msg)
            else:
                self.on_client_message(ident, msg)
        except P.ProtocolError as exc:
            self.reject(ident, peer, str(exc), graph_of(msg))
        except Exception as exc:  # noqa: BLE001 - no message may take the head down
            # well-formed frames with nonsense inside (decode checks the shape only)
            self.log.write(f"failed on a {type(msg).__name__} from {name}",
                           traceback.format_exc(limit=-3))
            self.reject(ident, peer, f"{type(msg).__name__} could not be handled: {exc!r}",
                        graph_of(msg))

    def forward_output(self, name: str, msg: P.WorkerOutput) -> None:
        """Send what a worker's tasks printed to the drivers it is for."""
        try:
            self.output.forward(msg.blocks)
        except Exception as exc:  # noqa: BLE001 - no message may take the head down
            self.log.write(f"dropped malformed output from {name}", repr(exc)[:300])

    def on_hello(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        """The first message of a peer: its hello, or it is ignored."""
        hello = P.check_hello([f.bytes for f in frames[1:]], self.token)
        if hello is None:
            self.log.write("ignored a peer whose first message was not a valid hello")
            return
        self.peers[ident] = hello
        if hello[0] == P.ROLE_CLIENT:
            if self.clients.watch(ident, hello[1]):
                self.client_gone(ident)  # gone before its hello was read
                return
            self.clients.await_welcome(ident)
            self.welcome_clients()

    def reject(self, ident: bytes, peer: tuple, reason: str, graph: Any = None) -> None:
        self.log.write(f"dropped a malformed message from {peer[1]}", reason[:300])
        if peer[0] == P.ROLE_CLIENT or graph is not None:  # a task's call: it waits
            self.outbox.to_client(ident, P.Rejected(reason, graph))

    def on_worker_message(self, wid: str, msg: Any) -> None:
        self.control.heard_from(wid)  # it is alive
        if wid in self.processes.retiring:
            return  # the scheduler forgot it, and the refs it held, when it retired it
        if type(msg) is P.Reports:
            self.on_reports(wid, msg.items)
        elif type(msg) is P.WorkerReady:
            self.worker_ready(wid, msg)
        else:  # code running in a worker may use the cluster like any client
            self.on_client_message(wid.encode(), msg)

    def on_reports(self, wid: str, items: list) -> None:
        """A worker's batch of reports on its tasks (and the refs it holds)."""
        if wid not in self.processes.proven and wid not in self.processes.actor_of \
                and ran_a_task(items):
            self.processes.proven.add(wid)
        log_reports(self.task_log, self.state.tasks, wid, items, time.time(), self.state.refs)
        # one scheduler step for the whole batch: idle workers are filled once
        handle = self.handlers.handle
        for ins in self.state.handle_all(report_events(wid, items)):
            handle(ins)

    def on_client_message(self, ident: bytes, msg: Any) -> None:
        """A driver's message, or a message of the calls of a task in a worker."""
        t = type(msg)
        if t is P.SubmitGraph:
            self.on_graph(ident, msg)
        elif t is P.PutObject:
            if (ident, msg.graph) in self.state.graphs:
                raise P.ProtocolError(f"object {msg.graph} was put twice")
            self.apply(put_event(msg, (ident, msg.graph), self.shm_prefix))
        elif t is P.GetResources:
            self.outbox.to_client(ident, P.ResourcesReply(msg.request, *self.resources()))
        elif t is P.GetTimeline:
            self.outbox.to_client(ident, P.TimelineReply(
                msg.request, [tuple(e) for e in self.task_log.since(msg.since)]))
        elif t is P.GetStateSizes:
            self.outbox.to_client(ident, P.StateSizesReply(msg.request, self.state_sizes()))
        elif t is P.StopCluster:
            if self.peers.get(ident) != (P.ROLE_CLIENT, f"driver:{self.parent_pid}"):
                raise P.ProtocolError("only the driver that started the cluster may stop it")
            self.running = False
        elif t is P.ClientGoodbye:
            self.client_gone(ident)
        elif t is P.GetWorkerStatus:
            pids = {wid: proc.pid for wid, proc in self.processes.procs.items()}
            self.outbox.to_client(ident, P.WorkerStatusReply(
                msg.request, worker_status(self.state, pids)))
        elif t is P.SubscribeOutput:
            self.output.subscribe(ident)
        elif t is P.OutputAck:
            self.output.ack(ident, msg.nbytes)
        else:
            for event in request_events(ident, msg):
                self.apply(event)

    def on_graph(self, ident: bytes, msg: P.SubmitGraph) -> None:
        """A graph (a dask graph, a remote call, an actor's creation or call)."""
        gid = (ident, msg.graph)
        if gid in self.state.graphs:
            raise P.ProtocolError(f"graph {msg.graph} was submitted twice")
        from_task = ident.decode(errors="replace") in self.processes.procs
        event = graph_event(msg, gid, msg.parent if from_task else None, self.shm_prefix)
        self.tables.add(gid, msg.table_id, msg.function_table)
        self.apply(event)

    # ------------------------------------------------------------------ instructions

    def apply(self, event: Any) -> None:
        """Feed ``event`` to the scheduler and carry out what it decides."""
        handle = self.handlers.handle
        for ins in self.state.handle(event):
            handle(ins)


def main() -> None:
    config = child_setup()
    head = Head(config)
    tune_for_long_lived_state()
    code = 0
    try:
        head.run()
    except BaseException:
        traceback.print_exc()
        print("daskray: the head process failed; the cluster is stopping", file=sys.stderr)
        code = 1
    finally:
        head.stop()
        os._exit(code)
