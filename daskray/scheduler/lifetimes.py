"""Lifetimes of objects: ObjectRef counts, pins, and freeing what nothing needs."""

from __future__ import annotations

from typing import Iterable

from .events import RefsChanged, TaskId
from .instructions import ForgetGraph, FreeObjects, FreeShared
from .model import MEMORY, ERRED, TaskState, GraphState


class RefLifetimes:
    """An object lives while references to it are held (ObjectRefs in processes,
    pins by pending tasks, refs inside other objects) or a dependent has not
    finished; then its copies, its shared-memory file and, for remote graphs,
    its task are freed.

    A part of :class:`SchedulerState`, working on its containers."""

    def _refs_changed(self, ev: RefsChanged) -> None:
        held = self.ref_holders.setdefault(ev.holder, set())
        for ref in ev.added:
            ts = self._lookup(ref)
            if ts is not None and ts.id not in held:
                held.add(ts.id)
                ts.refs += 1
        for ref in ev.dropped:
            ts = self._lookup(ref)
            if ts is not None and ts.id in held:
                held.discard(ts.id)
                ts.refs -= 1
                self._release_if_unused(ts)

    def _drop_holder(self, holder: bytes) -> None:
        """Process ``holder`` is gone, and with it its ObjectRefs."""
        self._unref(self.ref_holders.pop(holder, ()))

    def _unpin(self, gs: GraphState) -> None:
        if gs.pins_held:
            gs.pins_held = False
            self._unref(gs.pinned)

    def _unref(self, tids: Iterable[TaskId]) -> None:
        """Drop one reference to each of these objects (freeing what is then unused)."""
        for tid in tids:
            ts = self.tasks.get(tid)
            if ts is not None:
                ts.refs -= 1
                self._release_if_unused(ts)

    def _drop_shared(self, ts: TaskState) -> None:
        """The value of ``ts`` in shared memory is no longer needed: remove its file."""
        if ts.shared is not None:
            self._out.append(FreeShared(ts.shared))
            ts.shared = None

    def _release_deps(self, ts: TaskState) -> None:
        """``ts`` no longer needs its inputs (it finished, failed or was dropped)."""
        if ts.deps_released:
            return
        if ts.actor is not None and self._constructor_of_live_actor(ts):
            return  # a restart re-runs the constructor with the same arguments
        ts.deps_released = True
        for d in ts.deps:
            dep = self.tasks.get(d)
            if dep is not None:
                dep.pending_dependents -= 1
                self._release_if_unused(dep)

    def _release_if_unused(self, ts: TaskState) -> None:
        """Free the object of ``ts`` when nothing needs it; forget a remote task.
        A dask graph's data stays until the graph goes: lineage may need it to
        compute a lost result again (it was all in memory when the graph came)."""
        if ts.pending_dependents > 0 or ts.refs > 0 or ts.state not in (MEMORY, ERRED):
            return
        if ts.body is None and ts.graph.fail_fast and ts.graph.id in self.graphs:
            return
        if ts.actor is not None and not self._drop_actor_of(ts):
            return  # a detached actor keeps its constructor, to re-run on restart
        for wid in ts.holders:
            ws = self.workers.get(wid)
            if ws is not None:
                ws.holds.discard(ts.id)
                self._out.append(FreeObjects(wid, (ts.store_key,)))
        ts.holders = set()
        ts.inline = None
        self._drop_shared(ts)
        contained, ts.contained = ts.contained, []
        self._unref(contained)
        gs = ts.graph
        if gs.fail_fast or self.tasks.get(ts.id) is not ts:
            return
        if ts.state == MEMORY and ts.body is not None and any(
                d in self.tasks and self.tasks[d].graph is gs for d in ts.dependents):
            return  # lineage: the call behind a num_returns=k call's results stays known
        del self.tasks[ts.id]
        self.refs.pop((gs.id[0], gs.id[1], ts.node), None)
        gs.live -= 1
        if gs.live == 0 and self.graphs.pop(gs.id, None) is not None:
            self._unpin(gs)
            self._out.append(ForgetGraph(gs.id))
            return
        for d in ts.deps:  # an input kept for this one's lineage may go now
            dep = self.tasks.get(d)
            if dep is not None and dep.graph is gs:
                self._release_if_unused(dep)
