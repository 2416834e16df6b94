"""Graph intake: graphs and ``put`` objects coming in, released and cancelled."""

from __future__ import annotations

from .events import (
    ClientLost, GraphCancelled, GraphId, GraphReleased, GraphSubmitted, ObjectPut, RefKey,
    TaskId, WorkerId,
)
from .instructions import CancelTasks, ForgetGraph, FreeObjects
from .model import WAITING, PROCESSING, MEMORY, ERRED, TaskState, GraphState, WorkerState


class GraphIntake:
    """Graphs come in (a dask graph, one remote call, a ``put``) and go
    (released or cancelled by their client, or with it).

    A part of :class:`SchedulerState`, working on its containers."""

    def _graph_submitted(self, ev: GraphSubmitted) -> None:
        if ev.graph in self.graphs:
            raise ValueError(f"graph {ev.graph} was submitted twice")
        n = len(ev.names)
        base = self._next_task_id
        self._next_task_id += n
        # calls made by a task (its owner is a worker) go first, newest first: a
        # waiting task's children run before older work, depth first, as if the
        # program ran sequentially -- that bounds the stacks of waiting workers
        nested = self._submitting_worker(ev.graph) is not None
        seq = -self._next_graph_seq if nested else self._next_graph_seq
        caller = self.tasks.get(ev.parent) if ev.parent is not None else None
        gs = GraphState(ev.graph, seq, base, n, ev.fail_fast, ev.notify, ev.retry_exceptions,
                        parent=ev.parent if nested else None,
                        depth=caller.graph.depth + 1 if caller is not None else 1)
        self._next_graph_seq += 1
        self.graphs[ev.graph] = gs
        groups = ev.groups or ev.names
        tasks = self.tasks
        external: dict[int, TaskState | None] = {
            i: self._lookup(ref) for i, ref in (ev.external or {}).items()
        }
        for ref in ev.pinned or ():
            pin = self._lookup(ref)
            if pin is not None:
                pin.refs += 1
                gs.pinned.append(pin.id)
                gs.pins_held = True
        new: list[TaskState] = []
        lost_data: list[TaskState] = []
        for i in range(n):
            if external and i in external:
                continue
            if external:
                deps = tuple(
                    (external[d].id if external[d] is not None else -1) if d in external
                    else base + d for d in ev.deps[i]
                )
            else:  # the common case, without a generator per task
                deps = tuple([base + d for d in ev.deps[i]]) if ev.deps[i] else ()
            ts = TaskState(
                base + i, gs, i, ev.names[i], groups[i], ev.bodies[i],
                (gs.seq, ev.priorities[i]), deps,
                retries_left=ev.max_retries,
                resources=ev.resources or None,
            )
            ts.store_key = ts.id
            tasks[ts.id] = ts
            new.append(ts)
            gs.live += 1
            if ts.body is None:
                ts.state = MEMORY
                ts.inline = ev.data.get(i)
                ts.nbytes = len(ts.inline or b"")
                ts.shared = ev.shared.get(i) if ev.shared else None
                held = ev.data_holders.get(i) if ev.data_holders else None
                if held is not None:
                    ts.store_key, ts.nbytes = held[1], held[2]
                    if held[0] in self.workers:
                        ts.holders.add(held[0])
                        self.workers[held[0]].holds.add(ts.id)
                    else:
                        lost_data.append(ts)
            else:
                gs.unfinished += 1
            if not gs.fail_fast:
                self.refs[(gs.id[0], gs.id[1], i)] = ts.id
        for i in ev.wanted:
            if i not in external:
                tasks[base + i].refs += 1  # the client's own reference
                tasks[base + i].report_owner = not gs.fail_fast
                if not gs.fail_fast:
                    self.ref_holders.setdefault(ev.graph[0], set()).add(base + i)
        missing: list[TaskState] = []
        for ts in new:
            for d in ts.deps:
                dep = tasks.get(d)
                if dep is None:
                    missing.append(ts)
                    continue
                dep.dependents.append(ts.id)
                dep.pending_dependents += 1
                if dep.state != MEMORY:
                    ts.waiting_on += 1
        for ts in lost_data:
            if ts.id in tasks:
                self._object_lost(ts, f"the worker that stored data {ts.name} is gone")
        if ev.graph not in self.graphs:
            return
        if ev.create_actor is not None or ev.actor is not None:
            self._bind_actor(ev, gs, new)
        for ts in new:
            if ts.id not in tasks or ts.state != WAITING:
                continue
            if missing and ts in missing:
                self._fail(ts, (None, "ObjectLostError",
                                f"task {ts.name} depends on an object that was already freed"))
                continue
            if ts.waiting_on == 0:  # every input in memory: none failed
                self._make_ready(ts)
                continue
            failed = next((tasks[d] for d in ts.deps if tasks[d].state == ERRED), None)
            if failed is not None:
                self._fail(ts, failed.failure)
        for i in ev.wanted:
            ts = tasks.get(base + i)
            if ts is not None and ts.state == MEMORY and not ts.outcome_early:
                self._report_result(ts) if gs.fail_fast else self._notify(ts)
        if not gs.fail_fast and gs.unfinished == 0:
            self._unpin(gs)

    def _submitting_worker(self, graph: GraphId) -> WorkerState | None:
        """The worker whose task submitted ``graph``, if a task did."""
        owner = graph[0]
        if not isinstance(owner, bytes):
            return None
        ws = self.workers.get(owner.decode(errors="replace"))
        return ws if ws is not None and ws.actor is None else None

    def _lookup(self, ref: RefKey) -> TaskState | None:
        tid = self.refs.get(ref)
        return None if tid is None else self.tasks.get(tid)

    def _object_put(self, ev: ObjectPut) -> None:
        self._graph_submitted(GraphSubmitted(
            ev.graph, [ev.name], [()], [0], [None],
            {0: ev.inline} if ev.inline is not None else {}, [], fail_fast=False,
        ))
        ts = self.tasks[self.refs[(ev.graph[0], ev.graph[1], 0)]]
        ts.shared = ev.shared
        ts.refs += 1  # the owner's ObjectRef
        self.ref_holders.setdefault(ev.graph[0], set()).add(ts.id)
        ts.report_owner = True
        ts.nbytes = ev.nbytes
        if ev.store_key is not None:
            ts.store_key = ev.store_key
        if ev.holder is not None and ev.holder in self.workers:
            ts.holders.add(ev.holder)
            self.workers[ev.holder].holds.add(ts.id)
        if ev.inline is None and not ts.holders:
            self._object_lost(ts, f"the worker that stored {ev.name} is gone")
        else:
            self._notify(ts)

    def _graph_released(self, ev: GraphReleased) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._forget_graph(gs)

    def _graph_cancelled(self, ev: GraphCancelled) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._cancel_graph(gs)

    def _client_lost(self, ev: ClientLost) -> None:
        """The client's process is gone: cancel its dask graphs, drop its ObjectRefs
        (references it passed on to other processes keep their objects alive); the
        actors it created end, unless detached."""
        for gs in [g for g in self.graphs.values() if g.id[0] == ev.client]:
            if gs.fail_fast:
                self._cancel_graph(gs)
        self._drop_holder(ev.client)
        self._client_actors_end(ev.client)

    def _cancel_graph(self, gs: GraphState) -> None:
        """Stop everything of a dask graph: cancel dispatched tasks, free its objects."""
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
        if self.graphs.pop(gs.id, None) is None:
            return
        frees: dict[WorkerId, list[TaskId]] = {}
        dropped = [self.tasks.pop(tid) for tid in range(gs.base, gs.base + gs.size)
                   if tid in self.tasks]
        for ts in dropped:
            for wid in ts.holders:
                ws = self.workers.get(wid)
                if ws is not None and ts.id in ws.holds:
                    ws.holds.discard(ts.id)
                    frees.setdefault(wid, []).append(ts.store_key)
            ts.holders = set()
        for ts in dropped:
            self._drop_shared(ts)
            self._release_deps(ts)
            contained, ts.contained = ts.contained, []
            self._unref(contained)
        self._unpin(gs)
        for wid, tids in frees.items():
            self._out.append(FreeObjects(wid, tuple(tids)))
        self._out.append(ForgetGraph(gs.id))
