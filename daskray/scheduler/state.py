"""The scheduler: an I/O-free state machine.

Events in, instructions out; :meth:`SchedulerState.handle` is the only way state
changes.  No sockets, no pickle, no threads, no clock: time arrives inside events
(task durations) and payloads are opaque bytes.

State
-----
::

    tasks        :: {task id: TaskState}        every node of every live graph
    graphs       :: {graph id: GraphState}
    workers      :: {worker id: WorkerState}
    ready        :: heap[(priority, task id)]   ready tasks free to run anywhere
    durations    :: DurationEstimates           per task group

    TaskState.state in  waiting ─> ready ─> processing ─> memory ─> (forgotten)
                                      ^          │
                                      └──────────┘  (worker lost before it ran)
                        any ─> erred / cancelled ─> (forgotten)

    WorkerState.processing :: {task id}     dispatched, not yet reported back
    WorkerState.queue      :: heap          ready tasks placed on this worker
                                            (their large inputs live there)
    WorkerState.holds      :: {task id}     results kept by the worker

A task id is also the id of the object holding its result.  Data nodes are born
in ``memory`` with their value inline.  An object is freed as soon as its last
dependent has finished, unless the client asked for it; the client's results go
when it releases the graph.

Invariants (checked after every event when ``validate=True``):

* a ``processing`` task is in exactly its worker's ``processing`` set;
* ``waiting_on`` counts the task's inputs not in memory;
* a ``memory`` object has its value inline or at least one holder;
* a worker holds only objects that are in memory (or about to be freed).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from . import policy
from .events import (
    ClientLost, Event, GraphCancelled, GraphId, GraphReleased, GraphSubmitted,
    TaskErred, TaskFinished, TaskId, TaskReleased, TaskStarted, WorkerId,
    WorkerJoined, WorkerLost,
)
from .instructions import (
    CancelTasks, Dispatch, ForgetGraph, FreeObjects, Instruction, ReportError,
    ReportFinished, ReportResult, ReportStarted,
)

WAITING, READY, PROCESSING, MEMORY, ERRED, CANCELLED = (
    "waiting", "ready", "processing", "memory", "erred", "cancelled",
)

#: allowed (from, to) transitions; anything else is a bug and raises
TRANSITIONS = {
    (WAITING, READY), (READY, PROCESSING), (PROCESSING, MEMORY), (PROCESSING, READY),
    (PROCESSING, ERRED),
    (WAITING, CANCELLED), (READY, CANCELLED), (PROCESSING, CANCELLED), (MEMORY, CANCELLED),
    (ERRED, CANCELLED),
}


class InvalidTransition(RuntimeError):
    """The scheduler tried a transition its table does not allow: a bug in daskray."""


@dataclass(slots=True, eq=False)
class TaskState:
    id: TaskId
    graph: "GraphState"
    node: int
    name: str
    group: str
    body: bytes | None
    priority: tuple
    deps: tuple[TaskId, ...]
    state: str = WAITING
    dependents: list[TaskId] = field(default_factory=list)
    waiting_on: int = 0
    #: dependents that have not finished yet; at 0 the object may be freed
    pending_dependents: int = 0
    wanted: bool = False
    worker: WorkerId | None = None
    est: float = 0.0
    holders: set[WorkerId] = field(default_factory=set)
    inline: bytes | None = None
    nbytes: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class GraphState:
    id: GraphId
    seq: int
    base: TaskId
    size: int
    fail_fast: bool
    notify: bool
    #: wanted nodes not yet reported
    outstanding: int = 0


@dataclass(slots=True, eq=False)
class WorkerState:
    id: WorkerId
    slots: int
    processing: set[TaskId] = field(default_factory=set)
    queue: list[tuple[tuple, TaskId]] = field(default_factory=list)
    holds: set[TaskId] = field(default_factory=set)
    queued_estimate: float = 0.0


class SchedulerState:
    """See the module docstring."""

    def __init__(self, validate: bool = False) -> None:
        self.tasks: dict[TaskId, TaskState] = {}
        self.graphs: dict[GraphId, GraphState] = {}
        self.workers: dict[WorkerId, WorkerState] = {}
        self.ready: list[tuple[tuple, TaskId]] = []
        self.durations = policy.DurationEstimates()
        self.validate = validate
        self._next_task_id = 0
        self._next_graph_seq = 0
        self._out: list[Instruction] = []
        #: the global ready heap got tasks during this event: fill workers at its end
        self._ready_grew = False
        #: workers that got room or work during this event: filled at its end
        self._room: set[WorkerId] = set()
        self._handlers = {
            WorkerJoined: self._worker_joined,
            WorkerLost: self._worker_lost,
            GraphSubmitted: self._graph_submitted,
            TaskStarted: self._task_started,
            TaskFinished: self._task_finished,
            TaskErred: self._task_erred,
            TaskReleased: self._task_released,
            GraphReleased: self._graph_released,
            GraphCancelled: self._graph_cancelled,
            ClientLost: self._client_lost,
        }

    # ------------------------------------------------------------------ the one entry

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what must be done because of it."""
        self._out = out = []
        self._handlers[type(event)](event)
        if self._ready_grew:
            self._ready_grew = False
            self._fill_round_robin()
        if self._room:
            for wid in self._room:
                ws = self.workers.get(wid)
                if ws is not None:
                    self._fill(ws)
            self._room = set()
        if self.validate:
            self.validate_state()
        return out

    # ------------------------------------------------------------------ workers

    def _worker_joined(self, ev: WorkerJoined) -> None:
        if ev.worker in self.workers:
            return
        self.workers[ev.worker] = WorkerState(ev.worker, ev.slots)
        self._room.add(ev.worker)

    def _worker_lost(self, ev: WorkerLost) -> None:
        ws = self.workers.pop(ev.worker, None)
        if ws is None:
            return
        failed: dict[GraphId, tuple[TaskState, str]] = {}
        for tid in ws.processing:
            ts = self.tasks.get(tid)
            if ts is None or ts.state != PROCESSING or ts.worker != ws.id:
                continue
            failed.setdefault(ts.graph.id, (ts, (
                f"worker {ws.id} died ({ev.reason}) while running task {ts.name}. "
                "The task may have used too much memory or crashed the interpreter; "
                "run it with daskray.init(local_mode=True) to debug it."
            )))
        for tid in ws.holds:
            ts = self.tasks.get(tid)
            if ts is None or ts.state != MEMORY:
                continue
            ts.holders.discard(ws.id)
            if not ts.holders and ts.inline is None and (ts.pending_dependents or ts.wanted):
                failed.setdefault(ts.graph.id, (ts, (
                    f"worker {ws.id} died ({ev.reason}) holding the result of task "
                    f"{ts.name}, which is still needed."
                )))
        for _, tid in ws.queue:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == READY:
                heapq.heappush(self.ready, (ts.priority, tid))
                self._ready_grew = True
        for gid, (ts, message) in failed.items():
            gs = self.graphs.get(gid)
            if gs is None:
                continue
            self._out.append(ReportError(gid, ts.node, kind="WorkerCrashedError", message=message))
            self._cancel_graph(gs)
        self._ready_grew = True

    # ------------------------------------------------------------------ graphs

    def _graph_submitted(self, ev: GraphSubmitted) -> None:
        if ev.graph in self.graphs:
            raise ValueError(f"graph {ev.graph} was submitted twice")
        n = len(ev.names)
        base = self._next_task_id
        self._next_task_id += n
        gs = GraphState(ev.graph, self._next_graph_seq, base, n, ev.fail_fast, ev.notify)
        self._next_graph_seq += 1
        self.graphs[ev.graph] = gs
        groups = ev.groups or ev.names
        tasks = self.tasks
        new: list[TaskState] = []
        for i in range(n):
            deps = tuple(base + d for d in ev.deps[i])
            ts = TaskState(
                base + i, gs, i, ev.names[i], groups[i], ev.bodies[i],
                (gs.seq, ev.priorities[i]), deps,
            )
            tasks[ts.id] = ts
            new.append(ts)
            if ts.body is None:
                ts.state = MEMORY
                ts.inline = ev.data.get(i)
                ts.nbytes = len(ts.inline or b"")
        for ts in new:
            for d in ts.deps:
                dep = tasks[d]
                dep.dependents.append(ts.id)
                dep.pending_dependents += 1
                if dep.state != MEMORY:
                    ts.waiting_on += 1
        for i in ev.wanted:
            ts = tasks[base + i]
            if not ts.wanted:
                ts.wanted = True
                gs.outstanding += 1
        for ts in new:
            if ts.state == MEMORY and ts.wanted:
                self._report_result(ts)
            elif ts.state == WAITING and ts.waiting_on == 0:
                self._make_ready(ts)

    def _graph_released(self, ev: GraphReleased) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._forget_graph(gs)

    def _graph_cancelled(self, ev: GraphCancelled) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._cancel_graph(gs)

    def _client_lost(self, ev: ClientLost) -> None:
        for gs in [g for g in self.graphs.values() if g.id[0] == ev.client]:
            self._cancel_graph(gs)

    def _cancel_graph(self, gs: GraphState) -> None:
        """Stop everything of a graph: cancel dispatched tasks, free its objects."""
        to_cancel: dict[WorkerId, list[TaskId]] = {}
        for tid in range(gs.base, gs.base + gs.size):
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == PROCESSING and ts.worker in self.workers:
                to_cancel.setdefault(ts.worker, []).append(tid)
        for wid, tids in to_cancel.items():
            self._out.append(CancelTasks(wid, tuple(tids)))
        self._forget_graph(gs)

    def _forget_graph(self, gs: GraphState) -> None:
        """Drop every trace of a graph.  Dispatched tasks stay counted on their
        worker until it reports them back (finished, erred or released)."""
        self.graphs.pop(gs.id, None)
        frees: dict[WorkerId, list[TaskId]] = {}
        for tid in range(gs.base, gs.base + gs.size):
            ts = self.tasks.pop(tid, None)
            if ts is None:
                continue
            for wid in ts.holders:
                ws = self.workers.get(wid)
                if ws is not None and tid in ws.holds:
                    ws.holds.discard(tid)
                    frees.setdefault(wid, []).append(tid)
            if ts.state == PROCESSING:
                # stays in ws.processing until the worker answers; its estimate too
                pass
            ts.state = CANCELLED
        for wid, tids in frees.items():
            self._out.append(FreeObjects(wid, tuple(tids)))
        for ws in self.workers.values():
            self._out.append(ForgetGraph(ws.id, gs.id))

    # ------------------------------------------------------------------ tasks

    def _task_started(self, ev: TaskStarted) -> None:
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.graph.notify:
            self._out.append(ReportStarted(ts.graph.id, ts.node, ev.worker))

    def _task_finished(self, ev: TaskFinished) -> None:
        ws = self.workers.get(ev.worker)
        ts = self.tasks.get(ev.task)
        if ws is not None:
            self._unqueue(ws, ev.task)
        if ts is None or ts.state != PROCESSING or ts.worker != ev.worker:
            # a task of a forgotten graph: its result is of no use
            if ws is not None:
                self._out.append(FreeObjects(ws.id, (ev.task,)))
                self._room.add(ws.id)
            return
        self.durations.observe(ts.group, ev.duration)
        self._transition(ts, MEMORY)
        ts.worker = None
        ts.nbytes = ev.nbytes
        ts.inline = ev.inline
        if ws is not None:
            ts.holders.add(ws.id)
            ws.holds.add(ts.id)
        gs = ts.graph
        if gs.notify:
            self._out.append(ReportFinished(gs.id, ts.node, ev.worker, ev.inline))
        if ts.wanted:
            self._report_result(ts)
        for d in ts.deps:
            dep = self.tasks[d]
            dep.pending_dependents -= 1
            if dep.pending_dependents == 0 and not dep.wanted:
                self._free(dep)
        for d in ts.dependents:
            dependent = self.tasks[d]
            dependent.waiting_on -= 1
            if dependent.waiting_on == 0 and dependent.state == WAITING:
                self._make_ready(dependent)
        if not ts.dependents and not ts.wanted:
            self._free(ts)
        if ws is not None:
            self._room.add(ws.id)

    def _task_erred(self, ev: TaskErred) -> None:
        ws = self.workers.get(ev.worker)
        if ws is not None:
            self._unqueue(ws, ev.task)
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.worker == ev.worker:
            self._transition(ts, ERRED)
            gs = ts.graph
            self._out.append(ReportError(gs.id, ts.node, error=ev.error))
            if gs.fail_fast:
                self._cancel_graph(gs)
        if ws is not None:
            self._room.add(ws.id)

    def _task_released(self, ev: TaskReleased) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        self._unqueue(ws, ev.task)
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.worker == ev.worker:
            # released without being cancelled by us: run it elsewhere
            self._transition(ts, READY)
            ts.worker = None
            heapq.heappush(self.ready, (ts.priority, ts.id))
            self._ready_grew = True
        self._room.add(ws.id)

    # ------------------------------------------------------------------ helpers

    def _transition(self, ts: TaskState, new: str) -> None:
        if (ts.state, new) not in TRANSITIONS:
            raise InvalidTransition(
                f"task {ts.name} (id {ts.id}) cannot go from {ts.state} to {new}; "
                f"history: {ts.history}"
            )
        if self.validate:
            ts.history.append((ts.state, new))
        ts.state = new

    def _make_ready(self, ts: TaskState) -> None:
        self._transition(ts, READY)
        held: dict[WorkerId, int] = {}
        for d in ts.deps:
            dep = self.tasks[d]
            if dep.inline is None:
                for w in dep.holders:
                    held[w] = held.get(w, 0) + dep.nbytes
        target = None
        if held:
            load = {w: len(ws.processing) + len(ws.queue) for w, ws in self.workers.items()}
            target = policy.best_holder(held, load, self.workers)
        if target is None:
            heapq.heappush(self.ready, (ts.priority, ts.id))
            self._ready_grew = True
            return
        heapq.heappush(self.workers[target].queue, (ts.priority, ts.id))
        self._room.add(target)

    def _next_task(self, ws: WorkerState) -> TaskState | None:
        """Pop the best ready task for ``ws``: its own queue or the global one,
        whichever has the higher priority; when both are empty and the worker is
        idle, take the longest other worker's queued work."""
        tasks = self.tasks
        for heap in (ws.queue, self.ready):
            while heap and (heap[0][1] not in tasks or tasks[heap[0][1]].state != READY):
                heapq.heappop(heap)
        if ws.queue and (not self.ready or ws.queue[0] <= self.ready[0]):
            return tasks[heapq.heappop(ws.queue)[1]]
        if self.ready:
            return tasks[heapq.heappop(self.ready)[1]]
        if ws.processing:
            return None
        victims = sorted(
            (w for w in self.workers.values() if w is not ws and w.queue),
            key=lambda w: len(w.queue), reverse=True,
        )
        for victim in victims:
            while victim.queue:
                _, tid = heapq.heappop(victim.queue)
                ts = tasks.get(tid)
                if ts is not None and ts.state == READY:
                    return ts
        return None

    def _fill_round_robin(self) -> None:
        """Share new ready work out one task per worker per round, least loaded first."""
        while self.ready:
            progressed = False
            for ws in sorted(self.workers.values(), key=lambda w: len(w.processing)):
                if policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate):
                    ts = self._next_task(ws)
                    if ts is not None:
                        self._dispatch(ts, ws)
                        progressed = True
            if not progressed:
                return

    def _fill(self, ws: WorkerState) -> None:
        """Dispatch tasks to ``ws`` while it has room."""
        while policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate):
            ts = self._next_task(ws)
            if ts is None:
                return
            self._dispatch(ts, ws)

    def _dispatch(self, ts: TaskState, ws: WorkerState) -> None:
        self._transition(ts, PROCESSING)
        ts.worker = ws.id
        ts.est = self.durations.estimate(ts.group)
        ws.processing.add(ts.id)
        ws.queued_estimate += ts.est
        deps = []
        for d in ts.deps:
            dep = self.tasks[d]
            if ws.id in dep.holders:
                deps.append((d, ("local",)))
            elif dep.inline is not None:
                deps.append((d, ("inline", dep.inline)))
            else:
                deps.append((d, ("peer", next(iter(dep.holders)))))
        self._out.append(
            Dispatch(ws.id, ts.id, ts.graph.id, ts.body, tuple(deps), ts.graph.notify)
        )

    def _unqueue(self, ws: WorkerState, tid: TaskId) -> None:
        if tid in ws.processing:
            ws.processing.discard(tid)
            ts = self.tasks.get(tid)
            ws.queued_estimate = max(0.0, ws.queued_estimate - (ts.est if ts else 0.0))
            if not ws.processing:
                ws.queued_estimate = 0.0

    def _report_result(self, ts: TaskState) -> None:
        ts.graph.outstanding -= 1
        holder = None if ts.inline is not None else next(iter(ts.holders), None)
        self._out.append(ReportResult(ts.graph.id, ts.node, ts.inline, holder, ts.id))

    def _free(self, ts: TaskState) -> None:
        """Release the object of a finished task nobody needs any more."""
        for wid in ts.holders:
            ws = self.workers.get(wid)
            if ws is not None:
                ws.holds.discard(ts.id)
                self._out.append(FreeObjects(wid, (ts.id,)))
        ts.holders = set()
        ts.inline = None

    # ------------------------------------------------------------------ checks

    def validate_state(self) -> None:
        """Check the invariants of the module docstring; raise AssertionError if broken."""
        for tid, ts in self.tasks.items():
            assert ts.id == tid
            if ts.state == PROCESSING:
                assert ts.worker in self.workers, (ts.name, ts.worker)
                assert tid in self.workers[ts.worker].processing, ts.name
                others = [w for w in self.workers.values() if w.id != ts.worker]
                assert all(tid not in w.processing for w in others), ts.name
            if ts.state == WAITING:
                missing = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
                assert ts.waiting_on == missing, (ts.name, ts.waiting_on, missing)
            if ts.state == MEMORY and (ts.pending_dependents or ts.wanted):
                assert ts.inline is not None or ts.holders, ts.name
        for ws in self.workers.values():
            for tid in ws.holds:
                ts = self.tasks.get(tid)
                assert ts is not None and ws.id in ts.holders, (ws.id, tid)

    # ------------------------------------------------------------------ introspection

    def summary(self) -> dict[str, int]:
        """Counts for ``daskray status`` and tests."""
        counts: dict[str, int] = {}
        for ts in self.tasks.values():
            counts[ts.state] = counts.get(ts.state, 0) + 1
        counts["graphs"] = len(self.graphs)
        counts["workers"] = len(self.workers)
        return counts

