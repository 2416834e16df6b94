"""Workers joining and leaving the cluster."""

from __future__ import annotations

from .events import WorkerJoined, WorkerLost
from .model import READY, PROCESSING, MEMORY, TaskState, WorkerState


class Membership:
    """Workers join and leave: a new one is filled with work; a lost one's tasks run
    again elsewhere (or fail), and objects it alone held are computed again
    (lineage) or fail what needs them.

    A part of :class:`SchedulerState`, working on its containers."""

    def _worker_joined(self, ev: WorkerJoined) -> None:
        if ev.worker in self.workers:
            return
        resources = {"CPU": ev.slots, **(ev.resources or {})}
        ws = self.workers[ev.worker] = WorkerState(ev.worker, ev.slots, resources)
        like = self.extras_starting.pop(ev.worker, None)
        if like is not None:
            self._extra_joined(ws, like)
            return
        if ev.actor is None:
            if resources not in self.worker_shapes:
                self.worker_shapes.append(resources)
            self._room.add(ev.worker)
            waiting, self.awaiting_resources = self.awaiting_resources, []
            for tid in waiting:
                ts = self.tasks.get(tid)
                if ts is not None and ts.state == READY:
                    self._place(ts)
            return
        self._actor_process_joined(ws, ev.actor)

    def _worker_lost(self, ev: WorkerLost) -> None:
        like = self.extras_starting.pop(ev.worker, None)
        if like is not None:  # an extra worker that died before it joined
            self.extra_failures += 1
            waiting = self.workers.get(like)
            if waiting is not None and waiting.stand_in == ev.worker:
                waiting.stand_in = None
            return
        ws = self.workers.pop(ev.worker, None)
        if ws is None:
            return
        self._forget_waiting(ws)
        self._drop_holder(ev.worker.encode())
        crashed: list[tuple[TaskState, str]] = []
        cancelled: list[TaskState] = []
        if ws.actor is not None:
            crashed = self._actor_lost(ws, ev.reason)
        for tid in sorted(ws.processing) if ws.actor is None else ():
            ts = self.tasks.get(tid)
            if ts is None or ts.state != PROCESSING or ts.worker != ws.id:
                continue
            ts.worker = None
            self._task_ended(ts)  # its run ended with the worker
            if ev.force_cancelled and not ts.cancel_requested:
                self._transition(ts, READY)  # queued behind the cancelled task, or its caller
                self._place(ts)
            elif ts.retries_left > 0 and not ts.cancel_requested:
                ts.retries_left -= 1
                self._transition(ts, READY)
                self._place(ts)
            elif ts.cancel_requested:  # daskray.cancel(force=True) killed it
                cancelled.append(ts)
            else:
                crashed.append((ts, (
                    f"worker {ws.id} died ({ev.reason}) while running task {ts.name}. "
                    "The task may have used too much memory or crashed the interpreter; "
                    "run it with daskray.init(local_mode=True) to debug it."
                )))
        lost: list[tuple[TaskState, str]] = []
        for tid in ws.holds:
            ts = self.tasks.get(tid)
            if ts is None or ts.state != MEMORY:
                continue
            ts.holders.discard(ws.id)
            if not ts.holders and ts.inline is None and (ts.pending_dependents or ts.refs):
                lost.append((ts, (
                    f"worker {ws.id} died ({ev.reason}) holding the result of task "
                    f"{ts.name}, which is still needed."
                )))
        for _, tid in ws.queue:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == READY:
                self._place(ts)
        for ts, message in crashed:
            if ts.id in self.tasks and ts.state == PROCESSING:
                self._fail(ts, (None, "WorkerCrashedError", message))
        for ts in cancelled:
            if ts.id in self.tasks and ts.state == PROCESSING:
                self._fail(ts, (None, "TaskCancelledError", (
                    f"task {ts.name} was cancelled while running: its worker {ws.id} was "
                    "stopped (daskray.cancel(force=True))")))
        for ts, message in lost:
            if ts.id not in self.tasks or ts.state != MEMORY:
                continue  # already being recomputed, for another lost object
            reason = self._recompute(ts)
            if reason is not None:
                self._object_lost(ts, f"{message} It cannot be computed again: {reason}.")
        self._ready_grew = True
