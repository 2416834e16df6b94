"""Tasks waiting in ``get()``: nesting on the waiting stack, and extra workers."""

from __future__ import annotations

from typing import Iterable

from . import policy
from .events import WorkerBlocked, TaskId, Tick, WorkerId, WorkerLost
from .instructions import RetireWorker, StartExtraWorker
from .model import WAITING, READY, MEMORY, ERRED, TaskState, WorkerState, fits


class WaitingTasks:
    """See "Tasks waiting in get()" in the docstring of ``scheduler.state``.

    A part of :class:`SchedulerState`, working on its containers."""

    def _worker_blocked(self, ev: WorkerBlocked) -> None:
        """A task on the worker started or stopped waiting in get(): while one waits,
        the worker runs only what it waits for (_fill_nested), and an extra worker
        may use its CPU (_review_waiting)."""
        ws = self.workers.get(ev.worker)
        if ws is None or ws.actor is not None:
            return
        if ev.blocked:
            ws.waiting.append(ev.task)
            ws.nest = ev.nest
            if ev.task is not None:
                self.awaits[ev.task] = self._await_ids(ev.awaits)
            self.blocked.add(ws.id)
        else:
            if ev.task in ws.waiting:  # the innermost: those below wait on it
                del ws.waiting[len(ws.waiting) - 1 - ws.waiting[::-1].index(ev.task)]
                self.awaits.pop(ev.task, None)
            ws.nest = True  # the one below had room for it
            if not ws.waiting:
                self.blocked.discard(ws.id)
                ws.lending_since = None
                self._release_stand_in(ws)
        self._room.add(ws.id)

    def _await_ids(self, keys: Iterable) -> list[TaskId]:
        """The tasks behind the ObjectRefs a waiting task waits for (those known)."""
        ids = []
        for key in keys:
            try:
                ts = self._lookup(tuple(key))
            except TypeError:  # not a ref key: nothing to wait for
                continue
            if ts is not None:
                ids.append(ts.id)
        return ids

    def _tick(self, ev: Tick) -> None:
        """Time passes: waiting workers with nothing to run start counting how long."""
        self.now = ev.now
        for wid in self.blocked:
            ws = self.workers[wid]
            if ws.lending_since is None and self._lending(ws):
                ws.lending_since = ev.now

    def _next_nested(self, ws: WorkerState) -> TaskState | None:
        """For a worker whose tasks wait in get(): the first ready task (in the order
        awaited) the innermost waiting task waits for, directly or as an input of a
        task it waits for, that ``ws`` can run -- wherever it is queued.  It runs on
        that task's stack, which cannot deadlock: the waiting task could not go on
        before it finished anyway.  Anything else could wait for a task below it on
        the stack, which cannot resume before it returns."""
        awaited = self.awaits.get(ws.waiting[-1])
        if not awaited:
            return None
        tasks = self.tasks
        done = 0
        for tid in awaited:  # finished ones, from the front: they are what it has
            ts = tasks.get(tid)
            if ts is not None and ts.state not in (MEMORY, ERRED):
                break
            done += 1
        del awaited[:done]
        seen: set[TaskId] = set()
        stack = awaited[::-1]
        while stack:
            tid = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            ts = tasks.get(tid)
            if ts is None:
                continue
            if ts.state == READY:
                if ts.actor is None and fits(ts.resources, ws):
                    return ts  # its entry in a queue is dropped there as stale
            elif ts.state == WAITING:
                stack.extend(reversed(ts.deps))
        return None

    def _fill_nested(self, ws: WorkerState) -> None:
        """A worker whose innermost task waits and which runs nothing else: give it
        a task to run on top of that one, if there is one (see _next_nested)."""
        if ws.nest and self._lending(ws):
            ts = self._next_nested(ws)
            if ts is not None:
                self._dispatch(ts, ws, nested_for=ws.waiting[-1])

    def _lending(self, ws: WorkerState) -> bool:
        """Whether every task dispatched to ``ws`` waits in get(): its CPU is idle.
        (A waiting task is one of its dispatched ones until it has stopped waiting.)"""
        waiting = ws.waiting
        return bool(waiting) and len(ws.processing) <= len(waiting) - waiting.count(None)

    def _review_waiting(self) -> None:
        """While tasks wait in get(), keep the cluster going: waiting workers run
        what their innermost task waits for; idle workers take the work queued on
        waiting ones; a waiting worker with nothing to run lends its CPU to an
        extra worker when ready work waits for one; idle extras retire."""
        if self._readied and self.blocked:  # workers with room were filled already
            self._readied = False
            for wid in sorted(self.blocked):
                self._fill_nested(self.workers[wid])
            for ws in list(self.workers.values()):
                if not ws.processing and not ws.waiting and self._takes_work(ws):
                    self._fill(ws)
        for wid in sorted(self.blocked):
            ws = self.workers[wid]
            if not self._lending(ws):
                ws.lending_since = None
            elif ws.stand_in is None:
                self._find_stand_in(ws)
        self._retire_idle_extras()

    def _find_stand_in(self, ws: WorkerState) -> None:
        """Let an extra worker alike use the CPU of waiting worker ``ws``, if ready
        work waits for a CPU: a spare one, or -- once ``ws`` has had nothing to run
        for ``policy.EXTRA_START_DELAY`` (short waits are not worth a process) -- a
        new one, while under the cap."""
        starting = [name for name, like in self.extras_starting.items() if like == ws.id]
        if starting:  # started for it before, and still on its way: it will do
            ws.stand_in = starting[0]
            return
        spares = [self.workers[e] for e in sorted(self.extras)
                  if self.workers[e].standin_for is None and not self.workers[e].waiting
                  and self.workers[e].resources == ws.resources]
        can_start = (len(self.extras) + len(self.extras_starting) < self.max_extra_workers
                     and self.extra_failures < policy.MAX_EXTRA_START_FAILURES
                     and ws.lending_since is not None
                     and self.now - ws.lending_since >= policy.EXTRA_START_DELAY)
        if not (spares or can_start) or not self._work_waiting(ws):
            return
        if spares:
            extra = min(spares, key=lambda e: len(e.processing))
            extra.standin_for = ws.id
            extra.idle_since = self.now
            ws.stand_in = extra.id
            self._fill(extra)
            return
        self._next_extra += 1
        name = f"x{self._next_extra}"
        self.extras_starting[name] = ws.id
        ws.stand_in = name
        resources = {k: v for k, v in ws.resources.items() if k != "CPU"}
        self._out.append(StartExtraWorker(name, resources, ws.id))

    def _work_waiting(self, ws: WorkerState) -> bool:
        """Whether a ready task a worker like ``ws`` could run waits for a CPU (it
        would have been dispatched had one been free)."""
        tasks = self.tasks
        for heap in (self.ready, *(w.queue for w in self.workers.values())):
            for _, tid in heap:
                ts = tasks.get(tid)
                if (ts is not None and ts.state == READY and ts.actor is None
                        and fits(ts.resources, ws)):
                    return True
        return False

    def _extra_joined(self, ws: WorkerState, like: WorkerId) -> None:
        """Extra worker ``ws``, started for worker ``like``, joined: it stands in
        for it if it still waits, else it is a spare (see _review_waiting)."""
        ws.extra = True
        ws.idle_since = self.now
        self.extras.add(ws.id)
        self.extra_failures = 0
        waiting = self.workers.get(like)
        if waiting is not None and waiting.stand_in == ws.id:
            ws.standin_for = waiting.id
            self._room.add(ws.id)

    def _release_stand_in(self, ws: WorkerState) -> None:
        """Worker ``ws`` no longer waits (or is gone): its stand-in, joined or still
        starting, takes no new work for it."""
        name, ws.stand_in = ws.stand_in, None
        extra = self.workers.get(name) if name is not None else None
        if extra is not None and extra.standin_for == ws.id:
            self._unbind(extra)

    def _unbind(self, extra: WorkerState) -> None:
        """Extra worker ``extra`` stands in for nobody now: it finishes what it was
        sent, and what was queued for it goes elsewhere."""
        extra.standin_for = None
        queue, extra.queue = extra.queue, []
        for _, tid in queue:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == READY:
                self._place(ts)

    def _forget_waiting(self, ws: WorkerState) -> None:
        """Worker ``ws`` is gone: so are its waiting tasks and its stand-in ties."""
        for tid in ws.waiting:
            self.awaits.pop(tid, None)
        self.blocked.discard(ws.id)
        self.extras.discard(ws.id)
        if ws.stand_in is not None:
            self._release_stand_in(ws)
        stood_for = self.workers.get(ws.standin_for) if ws.standin_for is not None else None
        if stood_for is not None and stood_for.stand_in == ws.id:
            stood_for.stand_in = None

    def _retire_idle_extras(self) -> None:
        """Retire the extra workers out of work: at once when no task waits any
        more, else after ``policy.EXTRA_IDLE_SECONDS`` (a spare is kept that long
        for the next worker whose task waits) -- but not one holding the only copy
        of an object still needed."""
        for wid in sorted(self.extras):
            extra = self.workers[wid]
            if extra.processing or extra.waiting or any(
                    tid in self.tasks and self.tasks[tid].state == READY for _, tid in extra.queue):
                continue
            idle_long = self.now - extra.idle_since >= policy.EXTRA_IDLE_SECONDS
            if not idle_long and (extra.standin_for is not None or self.blocked):
                continue
            if self._holds_only_copy(extra):
                continue
            if extra.standin_for is not None:
                self._release_stand_in(self.workers[extra.standin_for])
            self._worker_lost(WorkerLost(wid, "retired: it was idle"))
            self._out.append(RetireWorker(wid))

    def _holds_only_copy(self, ws: WorkerState) -> bool:
        """Whether ``ws`` is the only holder of an object something still needs."""
        for tid in ws.holds:
            ts = self.tasks.get(tid)
            if (ts is not None and ts.inline is None and ts.holders == {ws.id}
                    and (ts.pending_dependents or ts.refs)):
                return True
        return False
