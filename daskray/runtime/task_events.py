"""The head's bounded log of task events, and the Chrome trace made from it.

The head feeds it from the reports its workers already send (no message more per
task): a task's end is when its report arrives, its start that end less the
duration the worker measured (or when its ``StartedReport`` arrived, for a task
that failed).  The log keeps the newest :data:`CAPACITY` events (a ring buffer),
so a long-lived cluster's head does not grow; ``daskray.timeline()`` and the
dashboard read it.  Plain data, no I/O: tested as such (tests/test_timeline.py).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from typing import Any, Iterable, NamedTuple

from .records import (
    DirectErredReport, DirectFinishedReport, ErredReport, FinishedReport, StartedReport,
)

#: events kept (about 200 bytes each: ~20 MB at most)
CAPACITY = 100_000
#: start times of tasks that said they started and have not ended (bounded too:
#: a worker that dies mid-task never reports its end)
MAX_STARTED = 10_000
FINISHED, ERRED = "finished", "erred"


_new_tuple = tuple.__new__


class TaskEvent(NamedTuple):
    """One task run: ``seq`` numbers events in the order they were logged."""

    seq: int
    key: str
    worker: str
    start: float
    end: float
    state: str

    @property
    def prefix(self) -> str:
        return key_prefix(self.key)


@functools.lru_cache(maxsize=65536)
def key_prefix(key: str) -> str:
    """The task prefix of a key, as dask's dashboard groups them ("inc" for
    "('inc-9f2c...', 3)"); a remote function's key is its name already."""
    from dask.utils import key_split  # imported on first use: the head starts fast

    return key_split(key)


class TaskEventLog:
    """The newest ``capacity`` task events (see the module)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.events: deque[TaskEvent] = deque(maxlen=capacity)
        self.started: dict[Any, float] = {}
        self._seq = itertools.count(1)

    def task_started(self, task: Any, now: float) -> None:
        """A worker said it started ``task`` (only some tasks are reported)."""
        if len(self.started) >= MAX_STARTED:
            self.started.pop(next(iter(self.started)))
        self.started[task] = now

    def task_ended(self, task: Any, key: str, worker: str, now: float,
                   duration: float | None, state: str = FINISHED) -> TaskEvent:
        """``task`` (named ``key``) ended on ``worker`` at ``now``, having run
        ``duration`` seconds (None when the worker did not say)."""
        began = self.started.pop(task, None) if self.started else None
        if duration is not None:
            start = now - duration if duration > 0.0 else now
        else:
            start = now if began is None else began
        # tuple.__new__: a NamedTuple's own __new__ is Python code (one event per task)
        event = _new_tuple(TaskEvent, (next(self._seq), key, worker, start, now, state))
        self.events.append(event)
        return event

    def since(self, seq: int) -> list[TaskEvent]:
        """The events logged after event number ``seq`` (as many as are kept)."""
        if not self.events or self.events[-1].seq <= seq:
            return []
        first = self.events[0].seq
        return list(itertools.islice(self.events, max(0, seq - first + 1), None))


def chrome_trace(events: Iterable[Any], origin: float = 0.0) -> list[dict]:
    """Chrome trace events (the ``traceEvents`` list, as ``ray.timeline()``
    returns): one complete ("X") event per task, in microseconds since
    ``origin``, one row (pid, named after the worker) per worker.  ``events``
    are :class:`TaskEvent` or tuples of (key, worker, start, end, state)."""
    rows: dict[str, int] = {}
    trace: list[dict] = []
    for ev in events:
        key, worker, start, end, state = _fields(ev)
        if worker not in rows:
            rows[worker] = len(rows) + 1
            trace.append({"name": "process_name", "ph": "M", "pid": rows[worker], "tid": 0,
                          "args": {"name": f"worker {worker}"}})
        trace.append({
            "name": key_prefix(key), "cat": "task", "ph": "X",
            "ts": (start - origin) * 1e6, "dur": max(0.0, end - start) * 1e6,
            "pid": rows[worker], "tid": 0,
            "args": {"key": key, "worker": worker, "state": state},
            **({"cname": "terrible"} if state == ERRED else {}),
        })
    return trace


def _fields(ev: Any) -> tuple:
    if isinstance(ev, TaskEvent):
        return ev.key, ev.worker, ev.start, ev.end, ev.state
    return tuple(ev)


def log_reports(log: TaskEventLog, tasks: dict, wid: str, items: list, now: float,
                refs: dict | None = None) -> None:
    """Log what a worker's batch of reports says about its tasks' runs
    (``tasks``: the scheduler's tasks by id, read before the reports change them;
    ``refs``: its task ids by ObjectRef key, for calls sent straight to actors)."""
    task_ended = log.task_ended
    for item in items:
        t = type(item)
        if t is FinishedReport:
            ts = tasks.get(item[0])
            if ts is not None:
                task_ended(item[0], ts.name, wid, now, item[3], FINISHED)
        elif (t is DirectFinishedReport or t is DirectErredReport) and refs is not None:
            tid = refs.get(item.ref)
            ts = tasks.get(tid) if tid is not None else None
            if ts is not None:  # (not registered yet: left out)
                done = t is DirectFinishedReport
                task_ended(tid, ts.name, wid, now, item.duration if done else None,
                           FINISHED if done else ERRED)
        elif t is ErredReport:
            ts = tasks.get(item.task)
            if ts is not None:
                log.task_ended(item.task, ts.name, wid, now, None, ERRED)
        elif t is StartedReport:
            log.task_started(item.task, now)
