"""The head process: a thin loop around the scheduler core.

::

    receive (ROUTER) ──decode──> events ──SchedulerState.handle──> instructions
        ──batch per destination──> send

The head also supervises the worker processes it started: each worker's pidfd
sits in the same poll as the socket, so a dead worker is noticed at once, its
work is failed (or, later, retried) and a replacement is started.  When the
driver that started the cluster exits, however it exits, the head stops the
workers and removes the session directory.

While tasks wait in ``get()``, the scheduler may ask for *extra* workers to use
their CPUs (``StartExtraWorker``) and later retire them (``RetireWorker``); the
head starts and stops those processes, never replaces them, and leaves them out
of the cluster's resources.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any

import zmq

from ..scheduler import events as E
from ..scheduler import instructions as I
from ..scheduler.state import SchedulerState
from . import protocol as P
from . import settings, shared_memory, transport
from . import store_memory
from .store_memory import HostStore
from .process import alive, child_setup, describe_exit, pidfd, spawn
from .serialization import table_id

STOP_GRACE_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.5
#: the head's poll wakes at least this often (heartbeats, due replacements)
TICK_MS = 1000
#: crash-loop deaths in a minute (``Head.crash_loop_death``) whose replacements
#: start at once; past them, each replacement waits (:func:`replacement_delay`)
REPLACEMENTS_AT_ONCE_PER_MINUTE = 10
#: the first delayed replacement waits this long, each next one twice as long
REPLACEMENT_BACKOFF_BASE = 0.1
#: the longest wait, unless dask config ``daskray.worker-replacement-backoff-max`` says
REPLACEMENT_BACKOFF_MAX = 30.0


def replacement_delay(recent_deaths: int, cap: float) -> float:
    """Seconds to wait before replacing a worker, given the crash-loop deaths of
    task workers in the last minute, this one included (a task that kills every
    worker it runs on, retried; workers that cannot start): none for the first
    ``REPLACEMENTS_AT_ONCE_PER_MINUTE``, then doubling from
    ``REPLACEMENT_BACKOFF_BASE``, never more than ``cap``.  A crash loop then
    costs little, and the cluster never stays without workers."""
    excess = recent_deaths - REPLACEMENTS_AT_ONCE_PER_MINUTE
    if excess <= 0:
        return 0.0
    return min(cap, REPLACEMENT_BACKOFF_BASE * 2.0 ** min(excess - 1, 64))


def replacement_backoff_max() -> float:
    """The longest wait before a replacement starts: dask config
    ``daskray.worker-replacement-backoff-max`` (a duration), default 30 s."""
    return settings.duration("daskray.worker-replacement-backoff-max",
                             REPLACEMENT_BACKOFF_MAX, 0, "30s")


#: the scheduler hears the time this often (see Tick): it starts extra workers for
#: waits that last, and retires those idle for long enough
TICK_SECONDS = 0.25
#: extra workers per worker when ``daskray.max-extra-workers`` is not set
EXTRA_WORKERS_PER_WORKER = 2


def max_extra_workers(num_workers: int) -> int:
    """How many extra workers may stand in for workers whose tasks wait in get()
    at once: dask config ``daskray.max-extra-workers``, by default
    ``EXTRA_WORKERS_PER_WORKER`` per worker."""
    return settings.whole_number("daskray.max-extra-workers",
                                 EXTRA_WORKERS_PER_WORKER * num_workers, 0, 4)


class Head:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.token = bytes.fromhex(config["token"])
        self.session_dir: str = config["session_dir"]
        self.num_workers: int = config["num_workers"]
        self.parent_pid: int = config["parent_pid"]
        self.ctx = zmq.Context()
        self.address = config["head_address"]
        self.shm_prefix: str = config["shm_prefix"]
        self.store_limit: int = config["store_limit"]
        #: >1 stands in for several hosts: worker slot i writes to store namespace
        #: i % n, the driver and the head are in namespace 0
        self.store_namespaces: int = config.get("store_namespaces", 1)
        shared_memory.configure(HostStore(self.namespace_prefix(0), self.session_dir,
                                          self.store_limit))
        self.sock = transport.router(self.ctx, self.address, self.token)
        #: complaints about peers, at most one line per kind every few seconds
        self.log = transport.ThrottledLog(prefix="daskray head")
        self.state = SchedulerState(validate=config.get("validate", False))
        #: extra workers running, and those of them told to stop
        self.extra_workers: set[str] = set()
        self.retiring: set[str] = set()
        self.last_tick = 0.0
        self.peers: dict[bytes, tuple[bytes, str]] = {}  # identity -> (role, name)
        self.procs: dict[str, Any] = {}  # worker id -> Popen
        self.worker_fds: dict[int, str] = {}
        self.client_fds: dict[int, bytes] = {}  # pidfd -> a joined driver's identity
        self.client_pid: dict[bytes, int] = {}  # a joined driver's identity -> its pid
        #: seconds of silence after which a worker is killed as hung (None: never)
        self.worker_ttl: float | None = config.get("worker_ttl")
        #: worker id -> when the oldest ping it has not answered was sent
        self.unanswered_since: dict[str, float] = {}
        self.last_ping = 0.0
        self.hung: dict[str, float] = {}  # worker id -> seconds silent when it was killed
        self.worker_address: dict[str, str] = {}
        self.worker_control: dict[str, zmq.Socket] = {}
        self.control_of: dict[zmq.Socket, str] = {}  # control socket -> its worker
        self.tables: dict[bytes, bytes] = {}  # table id -> cloudpickled function table
        self.table_users: dict[bytes, int] = {}  # table id -> live graphs using it
        self.graph_table: dict[Any, bytes] = {}  # graph id -> its table id
        self.tables_sent: dict[str, set] = {}  # worker id -> table ids it has
        self.waiting_clients: list[bytes] = []
        #: every worker was up once and the first driver was welcomed
        self.started = False
        self.next_worker = 0
        self.slot_of: dict[str, int] = {}
        #: task workers that finished (or failed) a task: their deaths are no crash loop
        self.proven: set[str] = set()
        #: when crash-loop deaths (crash_loop_death) happened, in the last minute
        self.crash_loop_deaths: list[float] = []
        self.backoff_max = replacement_backoff_max()
        #: replacements waiting out their backoff: (when due, slot), soonest first
        self.pending_replacements: list[tuple[float, int]] = []
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.running = True
        # per-destination batches, flushed once per loop turn
        self.runs: dict[str, list] = {}
        self.run_tables: dict[str, dict] = {}
        self.client_out: dict[bytes, list] = {}
        self.worker_out: dict[str, list] = {}
        self.frees: dict[str, list] = {}  # worker id -> objects to free, sent at flush
        self._instruction_handlers = {
            I.Dispatch: self._do_dispatch,
            I.FreeObjects: self._do_free,
            I.CancelTasks: self._do_cancel,
            I.ForgetGraph: self._do_forget,
            I.ReportResult: self._do_result,
            I.ReportError: self._do_error,
            I.ReportStarted: self._do_started,
            I.ReportFinished: self._do_finished,
            I.NotifyRef: self._do_notify_ref,
            I.StartActor: self._do_start_actor,
            I.StopActor: self._do_stop_actor,
            I.ReplyActor: self._do_reply_actor,
            I.FreeShared: self._do_free_shared,
            I.StartExtraWorker: self._do_start_extra,
            I.RetireWorker: self._do_retire,
        }
        self.actor_of: dict[str, str] = {}  # worker id -> the actor it hosts
        self.worker_of_actor: dict[str, str] = {}  # actor id -> its current process

    # ------------------------------------------------------------------ workers

    def namespace_prefix(self, slot: int) -> str:
        """The file prefix of the store a worker in ``slot`` writes to."""
        if self.store_namespaces == 1:
            return self.shm_prefix
        return store_memory.namespace_prefix(self.shm_prefix, max(slot, 0) % self.store_namespaces)

    def spawn_worker(self, slot: int, actor: str | None = None,
                     actor_resources: dict | None = None, max_concurrency: int = 1,
                     threaded: bool = False, extra: str | None = None,
                     extra_resources: dict | None = None) -> str:
        """Start the worker for ``slot`` (0..num_workers-1: which resources it has),
        or, with ``actor``, the process of that actor, or, with ``extra`` (the id
        the scheduler chose), an extra worker with ``extra_resources`` in the store
        namespace of ``slot``."""
        self.next_worker += 1
        wid = extra or (f"w{self.next_worker}" if actor is None else f"a{self.next_worker}")
        self.slot_of[wid] = slot
        resources = self.config.get("resources") or []
        if actor is not None:
            self.actor_of[wid] = actor
            self.worker_of_actor[actor] = wid
        if extra is not None:
            self.extra_workers.add(wid)
        proc = spawn("daskray.runtime.start_worker", {
            "actor": actor,
            "max_concurrency": max_concurrency,
            "threaded": threaded,
            "resources": (actor_resources or {}) if actor is not None
            else (extra_resources or {}) if extra is not None
            else resources[slot] if slot < len(resources) else {},
            "worker_id": wid,
            "token": self.token.hex(),
            "session_dir": self.session_dir,
            "head_address": self.address,
            "shm_prefix": self.namespace_prefix(slot),
            "store_limit": self.store_limit,
        })
        self.procs[wid] = proc
        fd = pidfd(proc.pid)
        if fd is not None:
            self.worker_fds[fd] = wid
            self.poller.register(fd, zmq.POLLIN)
        return wid

    def worker_exited(self, wid: str) -> None:
        proc = self.procs.pop(wid, None)
        # its identity authenticates nothing any more (a new peer could take it)
        self.peers.pop(wid.encode(), None)
        for fd, w in list(self.worker_fds.items()):
            if w == wid:
                self.poller.unregister(fd)
                os.close(fd)
                del self.worker_fds[fd]
        returncode = proc.wait() if proc is not None else None
        if proc is not None:  # what it had written for readers dies with it
            prefix = self.namespace_prefix(self.slot_of.get(wid, 0))
            shared_memory.remove_session(f"{prefix}w-{proc.pid}-")
        control = self.worker_control.pop(wid, None)
        if control is not None:
            self.poller.unregister(control)
            self.control_of.pop(control, None)
            control.close(0)
        address = self.worker_address.pop(wid, None)
        if address is not None:  # a read from it still in flight must not wait it out
            for sock in self.worker_control.values():
                sock.send_multipart([self.token, P.PEER_LOST, address.encode()])
        self.tables_sent.pop(wid, None)
        self._drop_outgoing(wid)
        if not self.running:
            return
        reason = f"pid {proc.pid if proc else '?'} {describe_exit(returncode)}"
        silent = self.hung.pop(wid, None)
        if silent is not None:
            reason = (f"pid {proc.pid if proc else '?'} stopped answering for {silent:.0f} s "
                      "and was killed")
        self.unanswered_since.pop(wid, None)
        actor = self.actor_of.pop(wid, None)
        if actor is not None:  # the scheduler decides whether it restarts
            if self.worker_of_actor.get(actor) == wid:
                del self.worker_of_actor[actor]
            if wid in self.state.workers:
                self.apply(E.WorkerLost(wid, reason))
            else:
                self.apply(E.ActorStartFailed(actor, reason))
            return
        if wid in self.extra_workers:  # never replaced: the scheduler starts one if need be
            self.extra_workers.discard(wid)
            if wid in self.retiring:
                self.retiring.discard(wid)
            else:
                print(f"daskray: extra worker {wid} {reason}", file=sys.stderr)
                self.apply(E.WorkerLost(wid, reason))
            return
        if wid not in self.state.workers and not self.started:
            # died before it ever joined, at start: a start-up failure, not bad luck
            for ident in self.waiting_clients:
                self.client_out.setdefault(ident, []).append(P.Rejected(
                    f"worker {wid} ({reason}) during start-up; its error output is above"))
            self.waiting_clients = []
            self.running = False
            return
        crash_loop = self.crash_loop_death(wid, returncode)
        self.apply(E.WorkerLost(wid, reason))
        self.broadcast_workers()
        self.replace_worker(wid, reason, crash_loop)

    def crash_loop_death(self, wid: str, returncode: int | None) -> bool:
        """Whether a task worker's death may be a crash loop's: it had finished
        no task, and either was running one (which may be what kills every
        worker) or exited on its own before it joined (it cannot start).  Workers
        killed after doing work, while idle, or while starting (the OOM killer,
        a chaos test) are no crash loop.  Asked before the scheduler forgets it."""
        if wid in self.proven:
            self.proven.discard(wid)
            return False
        ws = self.state.workers.get(wid)
        if ws is not None:
            return bool(ws.processing)
        return returncode != -signal.SIGKILL

    def replace_worker(self, wid: str, reason: str, crash_loop: bool) -> None:
        """Start the dead task worker's replacement: at once, or, when workers
        keep dying in a crash loop, once its backoff has passed
        (``start_due_replacements``, from the loop's tick).  Work waits for it
        meanwhile."""
        now = time.monotonic()
        self.crash_loop_deaths = [t for t in self.crash_loop_deaths if now - t < 60]
        delay = 0.0
        if crash_loop:
            self.crash_loop_deaths.append(now)
            delay = replacement_delay(len(self.crash_loop_deaths), self.backoff_max)
        slot = self.slot_of.get(wid, 0)
        if delay == 0:
            print(f"daskray: worker {wid} {reason}; starting a replacement", file=sys.stderr)
            self.spawn_worker(slot)
            return
        print(f"daskray: worker {wid} {reason}; workers keep dying before they finish a task "
              f"({len(self.crash_loop_deaths)} in the last minute), so its replacement starts "
              f"in {delay:.1f} s", file=sys.stderr)
        self.pending_replacements.append((now + delay, slot))
        self.pending_replacements.sort()

    def start_due_replacements(self) -> None:
        """Start the replacements whose backoff has passed."""
        now = time.monotonic()
        while self.pending_replacements and self.pending_replacements[0][0] <= now:
            _, slot = self.pending_replacements.pop(0)
            self.spawn_worker(slot)

    def poll_timeout_ms(self) -> int:
        """How long the loop may sleep in poll: a tick (a finer one while tasks
        wait in get() or extra workers run: the scheduler's clock), or less when
        a replacement is due sooner."""
        tick = int(TICK_SECONDS * 1000) if self.extra_workers or self.state.blocked else TICK_MS
        if not self.pending_replacements:
            return tick
        wait = self.pending_replacements[0][0] - time.monotonic()
        return max(0, min(tick, int(wait * 1000) + 1))

    def broadcast_workers(self) -> None:
        msg = P.WorkersChanged({w: a for w, a in self.worker_address.items()
                                if w not in self.actor_of and w not in self.extra_workers})
        for ident, (role, _) in self.peers.items():
            if role == P.ROLE_CLIENT:
                self.client_out.setdefault(ident, []).append(msg)

    # ------------------------------------------------------------------ receiving

    def on_frames(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        peer = self.peers.get(ident)
        if peer is None:
            hello = P.check_hello([f.bytes for f in frames[1:]], self.token)
            if hello is None:
                self.log.write("ignored a peer whose first message was not a valid hello")
                return
            self.peers[ident] = hello
            if hello[0] == P.ROLE_CLIENT:
                self.watch_client(ident, hello[1])
                self.waiting_clients.append(ident)
                self.welcome_clients()
            return
        try:
            msg = P.decode(transport.join_frames(frames[1:]))
        except (P.ProtocolError, ValueError) as exc:
            self.reject(ident, peer, str(exc))
            return
        role, name = peer
        if role == P.ROLE_WORKER and name not in self.procs:
            return  # a worker that has exited: what it sent last is of no use
        try:
            if role == P.ROLE_WORKER:
                self.on_worker_message(name, msg)
            else:
                self.on_client_message(ident, msg)
        except P.ProtocolError as exc:
            self.reject(ident, peer, str(exc), _graph_of(msg))
        except Exception as exc:  # noqa: BLE001 - no message may take the head down
            # well-formed frames with nonsense inside (decode checks the shape only)
            self.log.write(f"failed on a {type(msg).__name__} from {name}",
                           traceback.format_exc(limit=-3))
            self.reject(ident, peer, f"{type(msg).__name__} could not be handled: {exc!r}",
                        _graph_of(msg))

    def watch_client(self, ident: bytes, name: str) -> None:
        """Notice when a driver other than the cluster's owner exits, however it
        exits: its ObjectRefs must not keep objects alive (``client_gone``)."""
        _, _, pid = name.partition(":")
        if not pid.isdigit() or int(pid) == self.parent_pid:
            return
        self.client_pid[ident] = int(pid)
        fd = pidfd(int(pid))
        if fd is not None:
            self.client_fds[fd] = ident
            self.poller.register(fd, zmq.POLLIN)
        elif not alive(int(pid)):  # gone before its hello was read
            self.client_gone(ident)

    def client_gone(self, ident: bytes) -> None:
        """A driver disconnected or died: cancel its dask graphs, drop its refs."""
        for fd, who in list(self.client_fds.items()):
            if who == ident:
                self.poller.unregister(fd)
                os.close(fd)
                del self.client_fds[fd]
        if self.peers.pop(ident, None) is not None:
            self.waiting_clients = [c for c in self.waiting_clients if c != ident]
            self.client_out.pop(ident, None)
            self.apply(E.ClientLost(ident))
        pid = self.client_pid.pop(ident, None)
        if pid is not None:  # files it wrote but never told about (killed in a put)
            known = {ts.shared for ts in self.state.tasks.values() if ts.shared}
            for writer in ("put", "g"):
                for path in glob.glob(f"{glob.escape(self.shm_prefix)}{writer}-{pid}-*"):
                    if path not in known:
                        shared_memory.unlink(path)

    def reject(self, ident: bytes, peer: tuple, reason: str, graph: Any = None) -> None:
        self.log.write(f"dropped a malformed message from {peer[1]}", reason[:300])
        if peer[0] == P.ROLE_CLIENT or graph is not None:  # a task's call: it waits
            self.client_out.setdefault(ident, []).append(P.Rejected(reason, graph))

    def on_worker_message(self, wid: str, msg: Any) -> None:
        self.unanswered_since.pop(wid, None)  # it is alive
        if wid in self.retiring:
            return  # the scheduler forgot it, and the refs it held, when it retired it
        if type(msg) is P.Reports:
            if wid not in self.proven and wid not in self.actor_of and any(
                    item[0] in ("f", "e") for item in msg.items):
                self.proven.add(wid)
            apply = self.apply
            for item in msg.items:
                kind = item[0]
                if kind == "f":
                    apply(E.TaskFinished(item[1], wid, item[2], item[3], item[4], item[5]))
                elif kind == "e":
                    apply(E.TaskErred(item[1], wid, item[2]))
                elif kind == "s":
                    apply(E.TaskStarted(item[1], wid))
                elif kind == "r":
                    apply(E.TaskReleased(item[1], wid))
                elif kind == "refs":
                    apply(E.RefsChanged(item[1], item[2], wid.encode()))
                elif kind == "blocked":
                    apply(E.WorkerBlocked(wid, item[1], item[2], *item[3:5]))
        elif type(msg) is P.WorkerReady:
            if wid not in self.procs:
                return
            self.worker_address[wid] = msg.address
            control = self.worker_control[wid] = transport.dealer(self.ctx, msg.address, self.token)
            self.poller.register(control, zmq.POLLIN)
            self.control_of[control] = wid
            self.tables_sent[wid] = set()
            self.apply(E.WorkerJoined(wid, msg.slots, msg.resources, msg.actor))
            if msg.actor is None and wid not in self.extra_workers:
                self.broadcast_workers()
                self.welcome_clients()
        else:  # code running in a worker may use the cluster like any client
            self.on_client_message(wid.encode(), msg)

    def on_client_message(self, ident: bytes, msg: Any) -> None:
        t = type(msg)
        if t is P.SubmitGraph:
            gid = (ident, msg.graph)
            if gid in self.state.graphs:
                raise P.ProtocolError(f"graph {msg.graph} was submitted twice")
            event = E.GraphSubmitted(
                gid, msg.names, msg.deps, msg.priorities, msg.bodies, msg.data,
                msg.wanted, msg.groups, msg.fail_fast, msg.notify, msg.external,
                msg.pinned, msg.max_retries, msg.retry_exceptions, msg.resources,
                msg.actor, msg.create_actor, msg.data_holders,
                msg.parent if ident.decode(errors="replace") in self.procs else None,
                msg.shared,
            )
            if any(not _in_session(p, self.shm_prefix) for p in (msg.shared or {}).values()):
                raise P.ProtocolError("graph message: a shared file is not of this session")
            check_graph(event)
            if msg.table_id not in self.tables:  # kept for every graph that names it
                if type(msg.function_table) is not bytes \
                        or table_id(msg.function_table) != msg.table_id:
                    raise P.ProtocolError("graph message: the function table does not match "
                                          "its id")
                self.tables[msg.table_id] = msg.function_table
            self.table_users[msg.table_id] = self.table_users.get(msg.table_id, 0) + 1
            self.graph_table[gid] = msg.table_id
            self.apply(event)
        elif t is P.PutObject:
            gid = (ident, msg.graph)
            if gid in self.state.graphs:
                raise P.ProtocolError(f"object {msg.graph} was put twice")
            if msg.shared is not None and not _in_session(msg.shared, self.shm_prefix):
                raise P.ProtocolError("put: the shared file is not of this session")
            self.apply(E.ObjectPut(gid, msg.name, msg.inline, msg.holder, msg.nbytes,
                                   msg.store_key, msg.shared))
        elif t is P.RefsUpdate:
            self.apply(E.RefsChanged(msg.added, msg.dropped, ident))
        elif t is P.SubscribeRefs:
            self.apply(E.Subscribe(ident, msg.refs))
        elif t is P.CancelRefs:
            for ref in msg.refs:
                self.apply(E.CancelRef(ref))
        elif t is P.KillActorRequest:
            self.apply(E.KillActor(msg.actor))
        elif t is P.GetActor:
            self.apply(E.LookupActor(ident, msg.name, msg.request))
        elif t is P.GetResources:
            total, available = self.resources()
            self.client_out.setdefault(ident, []).append(
                P.ResourcesReply(msg.request, total, available))
        elif t is P.GetStateSizes:
            self.client_out.setdefault(ident, []).append(
                P.StateSizesReply(msg.request, self.state_sizes()))
        elif t is P.ReleaseGraph:
            self.apply(E.GraphReleased((ident, msg.graph)))
        elif t is P.CancelGraph:
            self.apply(E.GraphCancelled((ident, msg.graph)))
        elif t is P.StopCluster:
            if self.peers.get(ident) != (P.ROLE_CLIENT, f"driver:{self.parent_pid}"):
                raise P.ProtocolError("only the driver that started the cluster may stop it")
            self.running = False
        elif t is P.ClientGoodbye:
            self.client_gone(ident)

    def on_control_reply(self, wid: str, control: zmq.Socket) -> None:
        """A worker's data server answered an interrupt: queued tasks it dropped."""
        while True:
            try:
                frames = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.unanswered_since.pop(wid, None)
            if len(frames) == 2 and frames[0] == P.DROPPED:
                for task in frames[1].split(b","):
                    if task.isdigit():
                        self.apply(E.TaskReleased(int(task), wid))

    def check_heartbeats(self) -> None:
        """Ping every worker's data server (a thread of its own, so it answers while
        a task runs) every ``HEARTBEAT_SECONDS``; kill a worker that has not
        answered a ping sent ``worker_ttl`` seconds ago (stopped, or hung with the
        GIL held).  Its exit then goes the usual way: its tasks run again
        elsewhere and a replacement starts.  Silence counts from the oldest
        unanswered ping, after reading every answer already there, so a head
        that was busy itself does not take its workers for dead."""
        now = time.monotonic()
        if self.worker_ttl is None or now - self.last_ping < HEARTBEAT_SECONDS:
            return
        self.last_ping = now
        for wid, control in list(self.worker_control.items()):
            self.on_control_reply(wid, control)  # answers that came meanwhile
        for wid, control in self.worker_control.items():
            asked = self.unanswered_since.get(wid)
            proc = self.procs.get(wid)
            if asked is not None and now - asked > self.worker_ttl and proc is not None:
                if wid not in self.hung:
                    self.hung[wid] = now - asked
                    print(f"daskray: worker {wid} pid {proc.pid} has not answered for "
                          f"{now - asked:.0f} s (distributed.scheduler.worker-ttl); "
                          "killing it", file=sys.stderr)
                    proc.kill()
                continue
            if asked is None:
                self.unanswered_since[wid] = now
            control.send_multipart([self.token, P.PING, b""])

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
        return {**self.state.sizes(), "function tables": len(self.tables),
                "graph tables": len(self.graph_table),
                "pending replacements": len(self.pending_replacements)}

    def welcome_clients(self) -> None:
        """Welcome waiting drivers: at start, once every worker is up; later (a
        driver joining), at once, whatever replacements are still starting."""
        if not self.started and len(
                [w for w in self.worker_address if w not in self.actor_of]) < self.num_workers:
            return
        self.started = True
        for ident in self.waiting_clients:
            self.client_out.setdefault(ident, []).append(
                P.Welcome(dict(self.worker_address), self.session_dir))
        self.waiting_clients = []

    # ------------------------------------------------------------------ instructions

    def apply(self, event: Any) -> None:
        handlers = self._instruction_handlers
        for ins in self.state.handle(event):
            handlers[type(ins)](ins)

    def _do_dispatch(self, ins: I.Dispatch) -> None:
        wid = ins.worker
        deps = ins.deps
        if any(src[0] == "peer" for _, src in deps):
            deps = tuple(
                (oid, ("peer", self.worker_address[src[1]]) if src[0] == "peer" else src)
                for oid, src in deps
            )
        table_id = self.graph_table[ins.graph]
        sent = self.tables_sent[wid]
        if table_id not in sent:
            sent.add(table_id)
            self.run_tables.setdefault(wid, {})[table_id] = self.tables[table_id]
        self.runs.setdefault(wid, []).append(
            (ins.task, table_id, ins.body, deps, ins.notify, ins.parent, ins.depth))

    def _do_free(self, ins: I.FreeObjects) -> None:
        # gathered into one Free per worker and loop turn, sent after its Runs (a
        # Run stores the inline inputs it carries, even of a task then dropped)
        self.frees.setdefault(ins.worker, []).extend(ins.objects)

    def _do_cancel(self, ins: I.CancelTasks) -> None:
        self._flush_runs(ins.worker)
        self.worker_out.setdefault(ins.worker, []).append(P.Cancel(ins.tasks))
        control = self.worker_control.get(ins.worker)
        if control is not None:
            control.send_multipart(
                [self.token, P.INTERRUPT, b",".join(str(t).encode() for t in ins.tasks)])

    def _do_forget(self, ins: I.ForgetGraph) -> None:
        table_id = self.graph_table.pop(ins.graph, None)
        if table_id is None:
            return
        self.table_users[table_id] -= 1
        if self.table_users[table_id] > 0:
            return
        del self.table_users[table_id]
        del self.tables[table_id]
        for wid, sent in self.tables_sent.items():
            if table_id in sent:
                sent.discard(table_id)
                self._flush_runs(wid)
                self.worker_out.setdefault(wid, []).append(P.Forget((table_id,)))

    def _do_start_actor(self, ins: I.StartActor) -> None:
        if self.running:
            self.spawn_worker(-1, actor=ins.actor, actor_resources=ins.resources,
                              max_concurrency=ins.max_concurrency, threaded=ins.threaded)

    def _do_stop_actor(self, ins: I.StopActor) -> None:
        wid = self.worker_of_actor.get(ins.actor)
        proc = self.procs.get(wid) if wid else None
        if proc is not None and proc.poll() is None:
            proc.kill()  # its exit is noticed through its pidfd, like any death

    def _do_start_extra(self, ins: I.StartExtraWorker) -> None:
        if self.running:  # in the store namespace ("host") of the worker it is for
            self.spawn_worker(self.slot_of.get(ins.like, 0), extra=ins.worker,
                              extra_resources=ins.resources)

    def _do_retire(self, ins: I.RetireWorker) -> None:
        """Tell the extra worker to stop; nothing else is sent to it from now on
        (see flush): it is idle, and it may close its socket any moment."""
        if ins.worker in self.procs:
            self.retiring.add(ins.worker)
            self._drop_outgoing(ins.worker)
            self._send(ins.worker.encode(), P.Stop())

    def _do_free_shared(self, ins: I.FreeShared) -> None:
        shared_memory.unlink(ins.path)

    def _do_reply_actor(self, ins: I.ReplyActor) -> None:
        self.client_out.setdefault(ins.to, []).append(P.ActorReply(ins.request, ins.handle))

    def _do_notify_ref(self, ins: I.NotifyRef) -> None:
        holder = self.worker_address.get(ins.holder) if ins.holder else None
        self.client_out.setdefault(ins.to, []).append(P.RefResult(
            ins.ref, ins.inline, holder, ins.object_id, ins.error, ins.kind, ins.message))

    def _do_result(self, ins: I.ReportResult) -> None:
        holder = self.worker_address.get(ins.holder) if ins.holder else None
        self.client_out.setdefault(ins.graph[0], []).append(
            P.Result(ins.graph[1], ins.node, ins.inline, holder, ins.object_id))

    def _do_error(self, ins: I.ReportError) -> None:
        self.client_out.setdefault(ins.graph[0], []).append(
            P.Error(ins.graph[1], ins.node, ins.error, ins.kind, ins.message))

    def _do_started(self, ins: I.ReportStarted) -> None:
        self.client_out.setdefault(ins.graph[0], []).append(
            P.Started(ins.graph[1], ins.node, ins.worker))

    def _do_finished(self, ins: I.ReportFinished) -> None:
        self.client_out.setdefault(ins.graph[0], []).append(
            P.Finished(ins.graph[1], ins.node, ins.worker, ins.inline))

    # ------------------------------------------------------------------ sending

    def _drop_outgoing(self, wid: str) -> None:
        """Forget what this loop turn would have sent to worker ``wid`` (it is gone
        or retiring: nothing may reach it any more)."""
        self.runs.pop(wid, None)
        self.run_tables.pop(wid, None)
        self.worker_out.pop(wid, None)
        self.frees.pop(wid, None)

    def _flush_runs(self, wid: str) -> None:
        """Queue pending Run items before a later message to the same worker,
        so the worker sees them in the order the scheduler decided."""
        items = self.runs.pop(wid, None)
        if items:
            tables = self.run_tables.pop(wid, {})
            self.worker_out.setdefault(wid, []).append(P.Run(items, tables))

    def _send(self, ident: bytes, msg: Any) -> None:
        try:
            self.sock.send_multipart([ident, P.encode(msg)], copy=False)
        except zmq.ZMQError as exc:  # the peer is gone; its loss is handled elsewhere
            self.log.write("could not send to a peer that left", f"{ident!r}: {exc}")

    def flush(self) -> None:
        for wid in list(self.runs):
            self._flush_runs(wid)
        for wid, objects in self.frees.items():  # last: a Run may carry one of them inline
            if wid in self.procs:
                self.worker_out.setdefault(wid, []).append(P.Free(tuple(objects)))
        self.frees = {}
        for wid, msgs in self.worker_out.items():
            if wid in self.retiring:
                continue
            ident = wid.encode()
            for msg in msgs:
                self._send(ident, msg)
        self.worker_out = {}
        for ident, msgs in self.client_out.items():
            if ident not in self.peers:
                continue  # a driver that left: nothing can reach it
            if self.retiring and ident.decode(errors="replace") in self.retiring:
                continue  # a task on a retiring extra worker called: it has ended
            for msg in msgs:
                self._send(ident, msg)
        self.client_out = {}

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        for slot in range(self.num_workers):
            self.spawn_worker(slot)
        # read while the workers start: it imports dask
        self.state.max_extra_workers = max_extra_workers(self.num_workers)
        parent_fd = pidfd(self.parent_pid)
        if parent_fd is not None:
            self.poller.register(parent_fd, zmq.POLLIN)
        sock = self.sock
        while self.running:
            ready = dict(self.poller.poll(self.poll_timeout_ms()))
            if sock in ready:
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.on_frames(frames)
            for control in [s for s in ready if s in self.control_of]:
                self.on_control_reply(self.control_of[control], control)
            for fd in [fd for fd in ready if fd in self.worker_fds]:
                self.worker_exited(self.worker_fds[fd])
            for fd in [fd for fd in ready if fd in self.client_fds]:
                self.client_gone(self.client_fds[fd])
            if (parent_fd is not None and parent_fd in ready) or os.getppid() != self.parent_pid:
                self.running = False
            self.check_heartbeats()
            self.start_due_replacements()
            self.tick()
            self.flush()

    def tick(self) -> None:
        """Tell the scheduler the time, every ``TICK_SECONDS``."""
        now = time.monotonic()
        if now - self.last_tick >= TICK_SECONDS:
            self.last_tick = now
            self.apply(E.Tick(now))

    def stop(self) -> None:
        """Stop every worker (politely, then by force) and remove the session files."""
        self.running = False
        for wid, proc in self.procs.items():
            if wid.encode() in self.peers:
                self._send(wid.encode(), P.Stop())
            else:  # still starting (an extra worker, a replacement): nothing to lose
                proc.kill()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                proc.kill()
                proc.wait()
        for sock in self.worker_control.values():
            sock.close(0)
        self.sock.close(0)
        self.ctx.term()
        shared_memory.remove_session(self.shm_prefix)
        shutil.rmtree(self.session_dir, ignore_errors=True)


def _graph_of(msg: Any) -> int | None:
    """The graph a rejected message submitted, whose caller waits for an answer."""
    graph = msg.graph if type(msg) is P.SubmitGraph else None
    return graph if isinstance(graph, int) else None


def _in_session(path: Any, prefix: str) -> bool:
    """Whether ``path`` names a shared-memory file of this session (and nothing else)."""
    return (isinstance(path, str) and path.startswith(prefix)
            and os.path.dirname(path) == os.path.dirname(prefix) and "/" not in path[len(prefix):])


def check_graph(ev: E.GraphSubmitted) -> None:
    """Reject a graph message whose parts do not fit together, before the
    scheduler sees it: a malformed message must not take the cluster down."""
    n = len(ev.names) if isinstance(ev.names, list) else -1
    if n < 0 or not all(isinstance(x, list) and len(x) == n
                        for x in (ev.deps, ev.priorities, ev.bodies)):
        raise P.ProtocolError("graph message: names, deps, priorities and bodies must be lists of one length")
    if ev.groups and (not isinstance(ev.groups, list) or len(ev.groups) != n):
        raise P.ProtocolError("graph message: groups must be a list as long as names")
    if not isinstance(ev.data, dict) or not isinstance(ev.wanted, list):
        raise P.ProtocolError("graph message: data must be a dict and wanted a list")
    for i, (deps, body) in enumerate(zip(ev.deps, ev.bodies)):
        if not isinstance(deps, (tuple, list)) or not all(
                type(d) is int and 0 <= d < i for d in deps):
            raise P.ProtocolError(f"graph message: node {i} has bad dependencies {deps!r:.80}")
        if body is None and deps or body is not None and not isinstance(body, bytes):
            raise P.ProtocolError(f"graph message: node {i} has a bad body (bytes, or None for data)")
    if not all(type(i) is int and 0 <= i < n for i in ev.wanted):
        raise P.ProtocolError("graph message: wanted names a node that does not exist")
    if not all(type(p) is int for p in ev.priorities):
        raise P.ProtocolError("graph message: priorities must be integers")
    for node, held in (ev.data_holders or {}).items():
        if not (type(node) is int and 0 <= node < n and ev.bodies[node] is None
                and isinstance(held, tuple) and len(held) == 3):
            raise P.ProtocolError(f"graph message: bad stored data node {node!r:.40}")


def main() -> None:
    config = child_setup()
    head = Head(config)
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

