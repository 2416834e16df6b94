"""Lineage: computing lost results again."""

from __future__ import annotations

from .events import TaskId
from .model import WAITING, READY, PROCESSING, MEMORY, ERRED, TaskState


class Lineage:
    """An object whose only copy was lost runs again with whatever of its inputs
    is gone too; what reads it waits for it again.  What cannot run again
    fails what needs it.

    A part of :class:`SchedulerState`, working on its containers."""

    def _recompute(self, lost: TaskState) -> str | None:
        """Lineage: run a lost object's task again, with whatever of its own inputs
        is gone too; what reads it waits for it again.  None when done so, else why
        it cannot be (a ``put`` object, an actor call, retries used up, ...).

        A dask graph's tasks run again while the graph is held.  A remote call's
        task runs again as Ray's do, each time using one of its ``max_retries``;
        ObjectRefs inside its arguments are pinned again while it runs."""
        redo: dict[TaskId, TaskState] = {}
        stack = [lost]
        while stack:
            ts = stack.pop()
            if ts.id in redo:
                continue
            reason = self._cannot_run_again(ts)
            if reason is not None:
                return reason
            redo[ts.id] = ts
            for d in ts.deps:
                dep = self.tasks.get(d)
                if dep is None or dep.state == ERRED:
                    return f"its input {dep.name if dep else d} is gone or failed"
                if dep.state == MEMORY and dep.inline is None and not dep.holders:
                    stack.append(dep)  # freed or lost as well
        repin = {ts.graph.id: ts.graph for ts in redo.values()
                 if ts.graph.pinned and not ts.graph.pins_held}
        for gs in repin.values():
            for pid in gs.pinned:
                pin = self.tasks.get(pid)
                if pin is None or pin.state == ERRED:
                    return "an object its arguments refer to is gone"
        for gs in repin.values():
            for pid in gs.pinned:
                self.tasks[pid].refs += 1
            gs.pins_held = True
        for ts in redo.values():
            if not ts.graph.fail_fast:
                ts.retries_left -= 1
            self._transition(ts, WAITING)
            ts.holders = set()
            ts.inline = None
            self._drop_shared(ts)
            contained, ts.contained = ts.contained, []  # counted again when it finishes
            self._unref(contained)
            ts.graph.unfinished += 1
            if ts.deps_released:
                ts.deps_released = False
                for d in ts.deps:
                    self.tasks[d].pending_dependents += 1
        readers: dict[TaskId, TaskState] = {}
        for ts in redo.values():
            for d in ts.dependents:
                reader = self.tasks.get(d)
                if reader is None or reader.id in redo:
                    continue
                if reader.state == READY:
                    self._transition(reader, WAITING)
                if reader.state == WAITING:
                    readers[reader.id] = reader
                elif reader.state == PROCESSING and reader.actor is None:
                    # an actor call is dispatched in order and left its actor's
                    # queue: it fails as before rather than run out of order
                    reader.input_lost = True
        for ts in (*redo.values(), *readers.values()):  # counted once, from the states
            ts.waiting_on = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
        for ts in sorted(redo.values(), key=lambda t: t.id):
            if ts.waiting_on == 0:
                self._make_ready(ts)
        return None

    def _rerun_reader(self, ts: TaskState) -> None:
        """``ts`` failed while an input it read was lost and being computed again
        (``input_lost``): it waits for that input and runs again -- or, if computing
        the input again failed, fails with its error."""
        ts.input_lost = False
        failed = next((self.tasks[d] for d in ts.deps if self.tasks[d].state == ERRED), None)
        if failed is not None:
            self._fail(ts, failed.failure)
            return
        ts.waiting_on = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
        if ts.waiting_on:
            self._transition(ts, WAITING)
        else:
            self._make_ready(ts)

    def _cannot_run_again(self, ts: TaskState) -> str | None:
        """Why lineage cannot run ``ts`` again, or None if it can."""
        if ts.body is None:
            return (f"{ts.name} is data of its dask graph" if ts.graph.fail_fast
                    else f"{ts.name} was made by put(), not by a task")
        if ts.actor is not None:
            return f"{ts.name} is an actor call, whose actor's state has moved on"
        if ts.graph.fail_fast:
            if ts.graph.id not in self.graphs:
                return f"the dask graph of {ts.name} was released"
        elif ts.retries_left <= 0:
            return f"task {ts.name} has used up its max_retries"
        return None

    def _object_lost(self, ts: TaskState, message: str) -> None:
        """A finished object is gone: fail what still needs it."""
        failure = (None, "ObjectLostError", message)
        gs = ts.graph
        if gs.fail_fast:
            self._fail_graph(gs, ts, failure)
            return
        self._transition(ts, ERRED)
        ts.failure = failure
        self._notify(ts)
        self._fail_dependents(ts, failure)
        self._release_if_unused(ts)
