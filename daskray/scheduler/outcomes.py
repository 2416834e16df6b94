"""What becomes of a task: worker reports, failures, and telling the clients."""

from __future__ import annotations

from typing import Any

from .events import CancelRef, Subscribe, TaskErred, TaskFinished, TaskReleased, TaskStarted
from .instructions import (
    CancelTasks, FreeObjects, NotifyRef, ReportError, ReportFinished, ReportResult,
    ReportStarted,
)
from .model import WAITING, READY, PROCESSING, MEMORY, ERRED, Failure, TaskState, GraphState


class TaskOutcomes:
    """Workers report tasks started, finished, erred or released; a failure fails
    the whole dask graph or, for remote graphs, what depends on the task;
    owners and subscribers hear of every object ready or failed.

    A part of :class:`SchedulerState`, working on its containers."""

    def _task_started(self, ev: TaskStarted) -> None:
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.graph.notify:
            self._out.append(ReportStarted(ts.graph.id, ts.node, ev.worker))

    def _task_finished(self, ev: TaskFinished) -> None:
        ws = self.workers.get(ev.worker)
        ts = self.tasks.get(ev.task)
        if ws is not None:
            self._unqueue(ws, ev.task)
            self._room.add(ws.id)
        if ts is None or ts.state != PROCESSING or ts.worker != ev.worker:
            # a task of a forgotten graph: its result is of no use
            if ws is not None:
                self._out.append(FreeObjects(ws.id, (ev.task,)))
            return
        self.durations.observe(ts.group, ev.duration)
        self._transition(ts, MEMORY)
        ts.worker = None
        ts.input_lost = False
        ts.nbytes = ev.nbytes
        ts.inline = ev.inline
        if ws is not None:
            ts.holders.add(ws.id)
            ws.holds.add(ts.id)
        for ref in ev.contained:
            inner = self._lookup(ref)
            if inner is not None:
                inner.refs += 1
                ts.contained.append(inner.id)
        gs = ts.graph
        gs.unfinished -= 1
        if gs.notify:
            self._out.append(ReportFinished(gs.id, ts.node, ev.worker, ev.inline))
        if gs.fail_fast:
            if ts.refs:
                self._report_result(ts)
        else:
            self._notify(ts)
        self._release_deps(ts)
        for d in ts.dependents:
            dependent = self.tasks.get(d)
            if dependent is None:
                continue
            dependent.waiting_on -= 1
            if dependent.waiting_on == 0 and dependent.state == WAITING:
                self._make_ready(dependent)
        if not gs.fail_fast and gs.unfinished == 0:
            self._unpin(gs)
        self._task_ended(ts)
        self._release_if_unused(ts)

    def _task_erred(self, ev: TaskErred) -> None:
        ws = self.workers.get(ev.worker)
        if ws is not None:
            self._unqueue(ws, ev.task)
            self._room.add(ws.id)
        ts = self.tasks.get(ev.task)
        if ts is None or ts.state != PROCESSING or ts.worker != ev.worker:
            return
        ts.worker = None
        self._task_ended(ts)  # whether it runs again or not, this run ended
        if ts.input_lost and not ts.cancel_requested:  # it read an input that was lost
            self._rerun_reader(ts)
            return
        if ts.graph.retry_exceptions and ts.retries_left > 0 and not ts.cancel_requested:
            ts.retries_left -= 1
            self._transition(ts, READY)
            self._place(ts)
            return
        self._fail(ts, (ev.error, None, None))

    def _task_released(self, ev: TaskReleased) -> None:
        if type(ev.task) is str:  # a call sent straight to an actor, by its key
            self._direct_dropped(ev)
            return
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        self._unqueue(ws, ev.task)
        self._room.add(ws.id)
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.worker == ev.worker:
            ts.worker = None
            if ts.cancel_requested:
                self._fail(ts, (None, "TaskCancelledError",
                                f"task {ts.name} was cancelled before it ran"))
            else:  # released without being cancelled by us: run it elsewhere
                self._transition(ts, READY)
                self._place(ts)

    def _cancel_ref(self, ev: CancelRef) -> None:
        """Cancel the task behind the ref, unless it finished; with ``recursive``,
        also every unfinished task it started, and theirs (Ray's rule)."""
        ts = self._lookup(ev.ref)
        if ts is None or ts.state in (MEMORY, ERRED):
            return
        stack = [ts]
        while stack:
            task = stack.pop()
            if ev.recursive:
                stack.extend(self._started_by(task))
            self._cancel_task(task, ev.force)

    def _started_by(self, ts: TaskState) -> list[TaskState]:
        """The unfinished tasks of the calls ``ts``'s code made."""
        return [child for gs in self.graphs.values() if gs.parent == ts.id
                for child in map(self.tasks.get, range(gs.base, gs.base + gs.size))
                if child is not None and child.state not in (MEMORY, ERRED)]

    def _cancel_task(self, ts: TaskState, force: bool) -> None:
        """Drop ``ts`` if it has not started; interrupt it where it runs (``force``:
        kill that worker's process; never an actor's, whose state would go)."""
        if ts.state in (MEMORY, ERRED):
            return
        ts.cancel_requested = True
        if ts.state == PROCESSING:
            # a call sent straight to an actor runs there under its store key
            self._out.append(CancelTasks(ts.worker, (ts.store_key if ts.direct else ts.id,),
                                         force and ts.actor is None))
        else:
            self._fail(ts, (None, "TaskCancelledError",
                            f"task {ts.name} was cancelled before it ran"))

    def _fail(self, ts: TaskState, failure: Failure) -> None:
        """Task ``ts`` failed: report it; fail its graph (dask) or its dependents."""
        if ts.graph.fail_fast:
            self._fail_graph(ts.graph, ts, failure)
            return
        self._fail_one(ts, failure)
        self._fail_dependents(ts, failure)
        self._release_if_unused(ts)

    def _fail_one(self, ts: TaskState, failure: Failure) -> None:
        gs = ts.graph
        self._transition(ts, ERRED)
        ts.failure = failure
        gs.unfinished -= 1
        self._notify(ts)
        self._release_deps(ts)
        if gs.unfinished == 0:
            self._unpin(gs)

    def _fail_dependents(self, ts: TaskState, failure: Failure) -> None:
        """Fail, with the same error, everything waiting on ``ts`` (iteratively)."""
        stack = list(ts.dependents)
        failed: list[TaskState] = []
        while stack:
            dep = self.tasks.get(stack.pop())
            if dep is None or dep.state not in (WAITING, READY):
                continue
            if dep.graph.fail_fast:
                if dep.graph.id in self.graphs:
                    self._fail_graph(dep.graph, dep, failure)
                continue
            self._fail_one(dep, failure)
            failed.append(dep)
            stack.extend(dep.dependents)
        for dep in failed:
            self._release_if_unused(dep)

    def _fail_graph(self, gs: GraphState, ts: TaskState, failure: Failure) -> None:
        blob, kind, message = failure
        self._out.append(ReportError(gs.id, ts.node, error=blob, kind=kind, message=message))
        self._cancel_graph(gs)

    def _subscribe(self, ev: Subscribe) -> None:
        for ref in ev.refs:
            ts = self._lookup(ref)
            if ts is None:
                self._out.append(NotifyRef(ev.client, ref, None, None, -1, None, "ObjectLostError",
                                           f"object {ref} does not exist (any more): every "
                                           "reference to it was dropped, or its cluster ended"))
            elif ts.state in (MEMORY, ERRED):
                self._notify_one(ts, ev.client)
            else:
                ts.subscribers.add(ev.client)

    def _notify(self, ts: TaskState) -> None:
        """Tell the owner of a remote object (and subscribers) it is ready or failed."""
        if ts.report_owner:
            self._notify_one(ts, ts.graph.id[0])
        for client in ts.subscribers:
            self._notify_one(ts, client)
        ts.subscribers = set()

    def _notify_one(self, ts: TaskState, client: Any) -> None:
        ref = (ts.graph.id[0], ts.graph.id[1], ts.node)
        if ts.state == ERRED:
            blob, kind, message = ts.failure
            self._out.append(NotifyRef(client, ref, None, None, ts.store_key, blob, kind, message))
        else:
            holder = None if ts.inline is not None else next(iter(ts.holders), None)
            self._out.append(
                NotifyRef(client, ref, ts.inline, holder, ts.store_key, None, None, None))

    def _report_result(self, ts: TaskState) -> None:
        holder = None if ts.inline is not None else next(iter(ts.holders), None)
        self._out.append(ReportResult(ts.graph.id, ts.node, ts.inline, holder, ts.store_key))
