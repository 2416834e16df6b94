"""What the dashboard shows, folded from the head's snapshots (plain data, no I/O).

The dashboard's process keeps one :class:`DashboardModel`; each snapshot the head
publishes is applied to it, and the page's sessions and the ``/metrics`` endpoint
read it.  Task events arrive once each (a snapshot carries those since the
previous one): the model keeps the newest :data:`STREAM_EVENTS` for the task
stream and counts all of them by prefix for the progress bars and the metrics.
"""

from __future__ import annotations

from collections import deque

from ..runtime.task_events import ERRED, key_prefix

#: task-stream bars kept (the page shows the newest)
STREAM_EVENTS = 5_000
#: the Prometheus histogram's buckets (seconds)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, float("inf"))


class DashboardModel:
    """The cluster as the dashboard sees it (see the module)."""

    def __init__(self, started: float = 0.0) -> None:
        #: time 0 of the task stream's x axis
        self.started = started
        self.snapshots = 0
        self.workers: list[dict] = []
        self.actors: list[dict] = []
        self.task_states: dict[str, int] = {}
        self.pending_by_prefix: dict[str, dict[str, int]] = {}
        #: (seq, key, worker, start, end, state), newest last
        self.stream: deque[tuple] = deque(maxlen=STREAM_EVENTS)
        self.done_by_prefix: dict[str, int] = {}
        self.erred_by_prefix: dict[str, int] = {}
        #: prefix -> [count per bucket (not cumulative)], and the sum of seconds
        self.durations: dict[str, list] = {}
        self.duration_sums: dict[str, float] = {}
        #: task workers that left the cluster (each was replaced)
        self.worker_restarts = 0
        self._task_workers: set[str] = set()
        #: the object store, measured by the dashboard's process
        self.store: dict[str, int] = {"used": 0, "limit": 0, "spilled": 0}
        self.spills = 0
        self._spilled_names: set[str] = set()
        #: pid -> (cpu percent, memory bytes), measured by the dashboard's process
        self.usage: dict[int, tuple[float, int]] = {}

    # ------------------------------------------------------------------ head snapshots

    def apply(self, snap: dict) -> None:
        """Fold one snapshot of the head into the model."""
        self.snapshots += 1
        if not self.started:
            self.started = snap["time"]
        self._workers_changed(snap["workers"])
        self.workers = snap["workers"]
        self.actors = snap["actors"]
        self.task_states = snap["task_states"]
        self.pending_by_prefix = snap["pending_by_prefix"]
        for event in snap["events"]:
            self._task_ran(event)

    def _workers_changed(self, workers: list[dict]) -> None:
        """Count the task workers that disappeared: each one lost was replaced."""
        now = {w["id"] for w in workers if not w["actor"] and not w["extra"]}
        self.worker_restarts += len(self._task_workers - now)
        self._task_workers = now

    def _task_ran(self, event: tuple) -> None:
        _, key, _, start, end, state = event
        self.stream.append(tuple(event))
        prefix = key_prefix(key)
        counts = self.erred_by_prefix if state == ERRED else self.done_by_prefix
        counts[prefix] = counts.get(prefix, 0) + 1
        if state != ERRED:
            seconds = max(0.0, end - start)
            buckets = self.durations.setdefault(prefix, [0] * len(DURATION_BUCKETS))
            buckets[next(i for i, b in enumerate(DURATION_BUCKETS) if seconds <= b)] += 1
            self.duration_sums[prefix] = self.duration_sums.get(prefix, 0.0) + seconds

    # ------------------------------------------------------------------ own measurements

    def measured_store(self, stats: dict, spilled_names: set[str]) -> None:
        """The store's use (``HostStore.stats``) and the names of the spilled files
        now: a name not seen spilled before counts as one spill."""
        self.store = {"used": stats["used"], "limit": stats["limit"],
                      "spilled": stats["spilled"]}
        self.spills += len(spilled_names - self._spilled_names)
        self._spilled_names = spilled_names

    def measured_usage(self, usage: dict[int, tuple[float, int]]) -> None:
        self.usage = usage

    # ------------------------------------------------------------------ views

    def progress(self) -> list[dict]:
        """Per task prefix: done, running, waiting, erred, and the fraction done
        (of the tasks seen since the dashboard started), by prefix name."""
        prefixes = set(self.done_by_prefix) | set(self.erred_by_prefix) | \
            set(self.pending_by_prefix)
        rows = []
        for prefix in sorted(prefixes):
            pending = self.pending_by_prefix.get(prefix, {})
            row = {"prefix": prefix, "done": self.done_by_prefix.get(prefix, 0),
                   "running": pending.get("running", 0), "waiting": pending.get("waiting", 0),
                   "erred": self.erred_by_prefix.get(prefix, 0)}
            total = row["done"] + row["running"] + row["waiting"] + row["erred"]
            row["fraction"] = (row["done"] + row["erred"]) / total if total else 1.0
            rows.append(row)
        return rows

    def worker_rows(self) -> list[dict]:
        """The workers with their CPU and memory and what they run now."""
        rows = []
        for w in self.workers:
            cpu, memory = self.usage.get(w["pid"], (0.0, 0))
            kind = "actor" if w["actor"] else "extra" if w["extra"] else "task"
            rows.append({**w, "kind": kind, "cpu": cpu, "memory": memory,
                         "current_text": ", ".join(w["current"])[:200]})
        return rows

    def events_after(self, seq: int) -> list[tuple]:
        """The task-stream events after event ``seq`` that are still kept."""
        if not self.stream or self.stream[-1][0] <= seq:
            return []
        return [e for e in self.stream if e[0] > seq]
