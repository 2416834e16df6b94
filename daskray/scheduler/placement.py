"""Placement: where ready tasks go and when workers get them."""

from __future__ import annotations

import heapq

from . import policy
from .events import TaskId, WorkerId
from .instructions import Dispatch
from .model import READY, PROCESSING, TaskState, WorkerState, fits, covers


class Placement:
    """Ready tasks are placed (``policy.best_holder``), shared out round robin,
    dispatched while a worker has room (``policy.has_capacity``), with their
    siblings; an idle worker steals queued work.

    A part of :class:`SchedulerState`, working on its containers."""

    def _make_ready(self, ts: TaskState) -> None:
        self._transition(ts, READY)
        self._place(ts)

    def _place(self, ts: TaskState) -> None:
        """Queue a ready task: on the worker holding most of its large inputs (or the
        least loaded one able to run it), else in the global ready heap.  A call of
        an actor waits in its actor's own queue instead."""
        if ts.actor is not None:
            self._queue_call(ts)
            return
        self._readied = True
        held: dict[WorkerId, int] = {}
        tasks = self.tasks
        for d in ts.deps:
            dep = tasks[d]
            if dep.inline is None:
                for w in dep.holders:
                    held[w] = held.get(w, 0) + dep.nbytes
        if not held and not ts.resources and ts.graph.fail_fast:
            # the common case (small inputs, no resources, a dask graph): no
            # worker is better than another, the global heap shares it out
            heapq.heappush(self.ready, (ts.priority, ts.id))
            self._ready_grew = True
            return
        candidates = [w for w in self.workers.values()
                      if self._takes_work(w) and fits(ts.resources, w)]
        if ts.resources and not candidates:
            if not self.worker_shapes or any(
                    covers(shape, ts.resources) for shape in self.worker_shapes):
                self.awaiting_resources.append(ts.id)  # the worker that has them comes back
            else:
                ts.cancel_requested = True  # no retry can help
                self._fail(ts, (None, "DaskrayError", (
                    f"task {ts.name} needs resources {ts.resources}, but no worker has "
                    "them; declare them with daskray.init(resources=...)")))
            return
        load = None
        target = None
        if held:
            load = {w.id: len(w.processing) + len(w.queue) for w in candidates}
            target = policy.best_holder(held, load, load.keys())
        if target is None and ts.resources:
            target = min(candidates, key=lambda w: len(w.processing) + len(w.queue)).id
        if target is None and not ts.graph.fail_fast:
            parent = self._submitting_worker(ts.graph.id)
            if parent is not None and self._takes_work(parent) and fits(ts.resources, parent):
                target = parent.id  # idle workers still take it from there
        if target is None:
            heapq.heappush(self.ready, (ts.priority, ts.id))
            self._ready_grew = True
            return
        heapq.heappush(self.workers[target].queue, (ts.priority, ts.id))
        self._room.add(target)

    def _next_task(self, ws: WorkerState) -> TaskState | None:
        """Pop the best ready task for ``ws``: its own queue or the global one,
        whichever has the higher priority; when both are empty and the worker is
        idle, take the longest other worker's queued work it can run."""
        tasks = self.tasks
        for heap in (ws.queue, self.ready):
            self._drop_stale(heap)
        if ws.queue and (not self.ready or ws.queue[0] <= self.ready[0]):
            return tasks[heapq.heappop(ws.queue)[1]]
        if self.ready:
            return tasks[heapq.heappop(self.ready)[1]]
        if ws.processing:
            return None
        victims = sorted(
            (w for w in self.workers.values()
             if w is not ws and w.queue and w.actor is None),
            key=lambda w: len(w.queue), reverse=True,
        )
        for victim in victims:
            for i, (_, tid) in enumerate(victim.queue):
                ts = tasks.get(tid)
                if ts is not None and ts.state == READY and fits(ts.resources, ws):
                    victim.queue[i] = victim.queue[-1]
                    victim.queue.pop()
                    heapq.heapify(victim.queue)
                    return ts
        return None

    def _drop_stale(self, heap: list) -> None:
        """Pop the heap's top entries that are no longer ready tasks (forgotten,
        dispatched or waiting again): heaps are cleaned lazily, from the top."""
        tasks = self.tasks
        while heap and (heap[0][1] not in tasks or tasks[heap[0][1]].state != READY):
            heapq.heappop(heap)

    def _takes_work(self, ws: WorkerState) -> bool:
        """Whether ready work may be queued on ``ws``: not an actor's process, nor an
        extra worker that stands in for no waiting worker."""
        return ws.actor is None and (not ws.extra or ws.standin_for is not None)

    def _fill_round_robin(self) -> None:
        """Share new ready work out one task (with its siblings) per worker per
        round, least loaded first."""
        while self.ready:
            progressed = False
            for ws in sorted(self.workers.values(), key=lambda w: len(w.processing)):
                if (self._takes_work(ws) and not ws.waiting
                        and policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate)):
                    ts = self._next_task(ws)
                    if ts is not None:
                        self._dispatch_with_siblings(ts, ws)
                        progressed = True
            if not progressed:
                return

    def _dispatch_with_siblings(self, ts: TaskState, ws: WorkerState) -> None:
        """Dispatch ``ts``, and place on the same worker the next tasks of the
        global ready heap that feed a task ``ts`` feeds too (``x[i, j]`` and
        ``x[j, i]`` of ``x + x.T``, the inputs of one reduction): computed on one
        worker, their results need not move to meet.  Placed, not dispatched: the
        worker takes them as it has room, and an idle worker may still take them
        away, so a worker never hoards them behind a long task."""
        self._dispatch(ts, ws)
        if not ts.dependents or ws.waiting:  # nested: only the waiting task's calls
            return
        feeds = set(ts.dependents)
        for _ in range(policy.MAX_SIBLINGS):
            ready = self.ready
            self._drop_stale(ready)
            if not ready:
                return
            sibling = self.tasks[ready[0][1]]
            if feeds.isdisjoint(sibling.dependents) or not fits(sibling.resources, ws):
                return
            heapq.heappop(ready)
            heapq.heappush(ws.queue, (sibling.priority, sibling.id))
            self._room.add(ws.id)

    def _fill(self, ws: WorkerState) -> None:
        """Dispatch tasks to ``ws`` while it has room (an actor's process: its calls;
        a worker whose task waits: what that task waits for)."""
        if ws.actor is not None:
            self._fill_actor_process(ws)
            return
        if ws.waiting:
            self._fill_nested(ws)
            return
        if not self._takes_work(ws):
            return
        while policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate):
            ts = self._next_task(ws)
            if ts is None:
                return
            self._dispatch_with_siblings(ts, ws)

    def _dispatch(self, ts: TaskState, ws: WorkerState, nested_for: TaskId | None = None) -> None:
        """Send ``ts`` to ``ws``; ``nested_for``: the waiting task it is to run on top of."""
        self._transition(ts, PROCESSING)
        ts.worker = ws.id
        ts.est = self.durations.estimate(ts.group)
        ws.processing.add(ts.id)
        ws.queued_estimate += ts.est
        deps = []
        for d in ts.deps:
            dep = self.tasks[d]
            key = dep.store_key
            if ws.id in dep.holders:
                deps.append((key, ("local",)))
            elif dep.inline is not None:
                deps.append((key, ("inline", dep.inline)))
                # the worker keeps what it was sent, so later tasks read it locally
                dep.holders.add(ws.id)
                ws.holds.add(d)
            else:
                deps.append((key, ("peer", next(iter(dep.holders)))))
        self._out.append(
            Dispatch(ws.id, ts.id, ts.graph.id, ts.body, tuple(deps), ts.graph.notify,
                     ts.graph.parent if nested_for is None else nested_for, ts.graph.depth)
        )

    def _unqueue(self, ws: WorkerState, tid: TaskId) -> None:
        if ws.actor is not None:
            self._call_returned(ws, tid)
        if tid in ws.processing:
            ws.processing.discard(tid)
            ts = self.tasks.get(tid)
            ws.queued_estimate = max(0.0, ws.queued_estimate - (ts.est if ts else 0.0))
            if not ws.processing:
                ws.queued_estimate = 0.0
                ws.idle_since = self.now
