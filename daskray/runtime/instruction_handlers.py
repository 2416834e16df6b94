"""Carrying out the scheduler's instructions in the head: one handler per kind.

What an instruction asks of a worker or a driver is queued in the
:class:`~.outbox.Outbox` (sent at the end of the loop turn); processes are started
and killed through :class:`~.supervision.WorkerProcesses`; running tasks are
interrupted through :class:`~.worker_control.WorkerControl`.
"""

from __future__ import annotations

from typing import Any, Callable

from ..scheduler import instructions as I
from . import protocol as P
from . import shared_memory
from .function_tables import FunctionTables
from .outbox import Outbox
from .records import RunTask
from .supervision import WorkerProcesses
from .worker_control import WorkerControl


class InstructionHandlers:
    """The head's hands: ``handle(instruction)``."""

    def __init__(self, outbox: Outbox, tables: FunctionTables, processes: WorkerProcesses,
                 control: WorkerControl, worker_address: dict[str, str],
                 running: Callable[[], bool]) -> None:
        self.outbox = outbox
        self.tables = tables
        self.processes = processes
        self.control = control
        #: joined workers' data-server addresses (the head's, kept up to date by it)
        self.worker_address = worker_address
        #: whether the head still runs: a stopping head starts no process
        self.running = running
        self._handlers: dict[type, Callable[[Any], None]] = {
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
            I.ReplyActorNames: self._do_reply_actor_names,
            I.FreeShared: self._do_free_shared,
            I.StartExtraWorker: self._do_start_extra,
            I.RetireWorker: self._do_retire,
            I.ActorMoved: self._do_actor_moved,
        }

    def handle(self, ins: Any) -> None:
        self._handlers[type(ins)](ins)

    def _do_dispatch(self, ins: I.Dispatch) -> None:
        deps = ins.deps
        if any(src[0] == "peer" for _, src in deps):
            deps = tuple(
                (oid, ("peer", self.worker_address[src[1]]) if src[0] == "peer" else src)
                for oid, src in deps
            )
        table_id, table = self.tables.for_run(ins.worker, ins.graph)
        self.outbox.run(ins.worker,
                        RunTask(ins.task, table_id, ins.body, deps, ins.notify, ins.parent,
                                  ins.depth),
                        table_id, table)

    def _do_free(self, ins: I.FreeObjects) -> None:
        self.outbox.free(ins.worker, ins.objects)

    def _do_cancel(self, ins: I.CancelTasks) -> None:
        self.outbox.to_worker(ins.worker, P.Cancel(ins.tasks))
        self.control.interrupt(ins.worker, ins.tasks, ins.force)

    def _do_forget(self, ins: I.ForgetGraph) -> None:
        table_id, holders = self.tables.forget_graph(ins.graph)
        for wid in holders:
            self.outbox.to_worker(wid, P.Forget((table_id,)))

    def _do_start_actor(self, ins: I.StartActor) -> None:
        if self.running():
            self.processes.spawn(-1, actor=ins.actor, actor_resources=ins.resources,
                                 max_concurrency=ins.max_concurrency, threaded=ins.threaded)

    def _do_stop_actor(self, ins: I.StopActor) -> None:
        wid = self.processes.worker_of_actor.get(ins.actor)
        if wid is not None:
            self.processes.kill(wid)  # its exit is noticed through its pidfd, like any death

    def _do_start_extra(self, ins: I.StartExtraWorker) -> None:
        if self.running():  # in the store namespace ("host") of the worker it is for
            self.processes.spawn(self.processes.slot_of.get(ins.like, 0), extra=ins.worker,
                                 extra_resources=ins.resources)

    def _do_retire(self, ins: I.RetireWorker) -> None:
        """Tell the extra worker to stop; nothing else is sent to it from now on
        (see Outbox.flush): it is idle, and it may close its socket any moment."""
        if ins.worker in self.processes.procs:
            self.processes.retiring.add(ins.worker)
            self.outbox.drop_worker(ins.worker)
            self.outbox.send(ins.worker.encode(), P.Stop())

    def _do_free_shared(self, ins: I.FreeShared) -> None:
        shared_memory.unlink(ins.path)

    def _do_actor_moved(self, ins: I.ActorMoved) -> None:
        self.outbox.to_client(ins.to, P.ActorMoved(ins.actor))

    def _do_reply_actor(self, ins: I.ReplyActor) -> None:
        self.outbox.to_client(ins.to, P.ActorReply(ins.request, ins.handle))

    def _do_reply_actor_names(self, ins: I.ReplyActorNames) -> None:
        self.outbox.to_client(ins.to, P.ActorNames(ins.request, ins.names))

    def _do_notify_ref(self, ins: I.NotifyRef) -> None:
        holder = self.worker_address.get(ins.holder) if ins.holder else None
        self.outbox.to_client(ins.to, P.RefResult(
            ins.ref, ins.inline, holder, ins.object_id, ins.error, ins.kind, ins.message))

    def _do_result(self, ins: I.ReportResult) -> None:
        holder = self.worker_address.get(ins.holder) if ins.holder else None
        self.outbox.to_client(ins.graph[0], P.Result(ins.graph[1], ins.node, ins.inline, holder,
                                                     ins.object_id))

    def _do_error(self, ins: I.ReportError) -> None:
        self.outbox.to_client(ins.graph[0], P.Error(ins.graph[1], ins.node, ins.error, ins.kind,
                                                    ins.message))

    def _do_started(self, ins: I.ReportStarted) -> None:
        self.outbox.to_client(ins.graph[0], P.Started(ins.graph[1], ins.node, ins.worker))

    def _do_finished(self, ins: I.ReportFinished) -> None:
        self.outbox.to_client(ins.graph[0], P.Finished(ins.graph[1], ins.node, ins.worker,
                                                       ins.inline))
