"""Scheduling policy, kept apart from the bookkeeping so it can be read and tuned alone.

* **placement**: a task whose inputs are large goes to the worker holding most of
  their bytes, then to the least loaded one.  A task whose inputs are all small
  (they travel inline) is not placed at all: it waits in the global ready queue
  and the next worker with room takes it.
* **prefetch**: a worker gets more tasks than it has slots, so it never idles
  waiting for the head, but only as much as ``PREFETCH_SECONDS`` of estimated
  work -- a worker must not hoard long tasks another worker could run.
* **siblings**: a worker taking a task from the global ready queue also takes
  the next ones there that feed a task it feeds (up to ``MAX_SIBLINGS``), so
  inputs meant to meet are made where they meet.
* **durations** are estimated per task group (dask's key prefix, e.g. ``"inc"``)
  from what workers report.
"""

from __future__ import annotations

from typing import Iterable

#: estimated work kept queued on a worker beyond its running tasks, in seconds
PREFETCH_SECONDS = 0.02
#: never queue more tasks than this on one worker.  It binds only for tasks of
#: less than PREFETCH_SECONDS / MAX_PREFETCH (40 us) each: with 128, a worker
#: running 20,000 such tasks (the W1 benchmark) ran dry about 100 times per graph,
#: some 3 ms each, waiting for the head's next batch; with 512 about 35 times
#: (measured on a 2-core machine)
MAX_PREFETCH = 512
#: tasks taken along with one from the global ready queue because they feed the same task
MAX_SIBLINGS = 3
#: guess for a task group never seen finishing
UNKNOWN_DURATION = 0.5
#: weight of the newest observation in the running duration estimate
EWMA_ALPHA = 0.3
#: an input at most this big travels inline through the head (and is kept there)
INLINE_THRESHOLD = 100 * 1024
#: a worker whose tasks wait in get() with nothing to run for this long gets an
#: extra worker to stand in for it (see SchedulerState, tasks waiting in get())
EXTRA_START_DELAY = 0.2
#: an extra worker out of work this long is retired even while tasks still wait
EXTRA_IDLE_SECONDS = 2.0
#: extra workers dying before they joined, in a row, after which no more are started
MAX_EXTRA_START_FAILURES = 3
#: a result at least this big, asked for by another worker, goes to shared memory
#: instead of a socket: one copy on the host however many processes read it
#: (smaller ones are copied: fresh shared pages cost more than a copy)
SHARE_THRESHOLD = 32 * 1024 * 1024


class DurationEstimates:
    """Running average task duration per group."""

    __slots__ = ("_by_group",)

    def __init__(self) -> None:
        self._by_group: dict[str, float] = {}

    def estimate(self, group: str) -> float:
        return self._by_group.get(group, UNKNOWN_DURATION)

    def observe(self, group: str, duration: float) -> None:
        old = self._by_group.get(group)
        self._by_group[group] = (
            duration if old is None else old + EWMA_ALPHA * (duration - old)
        )


def has_capacity(processing: int, slots: int, queued_estimate: float) -> bool:
    """May a worker with ``processing`` dispatched tasks take one more?"""
    if processing <= slots:
        return True
    return processing < slots + MAX_PREFETCH and queued_estimate < PREFETCH_SECONDS * slots


def best_holder(
    input_bytes_by_worker: dict[str, int], load: dict[str, float], candidates: Iterable[str]
) -> str | None:
    """The candidate holding most input bytes; ties go to the least loaded.

    ``None`` when no candidate holds any input (the caller then treats the task
    as free to run anywhere).
    """
    best: str | None = None
    best_key: tuple[int, float] | None = None
    for w in candidates:
        held = input_bytes_by_worker.get(w, 0)
        if held <= 0:
            continue
        key = (held, -load.get(w, 0.0))
        if best_key is None or key > best_key:
            best, best_key = w, key
    return best
