"""The garbage collector: the head's, set for a process that holds a large,
long-lived state; and the driver's, paused while it turns a dask graph into a message.

The head keeps a record per task (a :class:`~daskray.scheduler.model.TaskState` and
the lists and sets inside it): taking in a 20,000-task graph allocates some 140,000
objects the cyclic collector tracks, and none of them is garbage.  With Python's
default thresholds (700, 10, 10) the collector runs every 700 allocations and,
as the state grows, scans all of it again and again -- on the W1 benchmark (20,000
tiny tasks) more than half of the scheduler core's time, measured on a 2-core
machine.

So the head, once started, moves what it has imported into the permanent
generation (``gc.freeze``: never scanned again) and runs the young collection
every ``YOUNG_THRESHOLD`` allocations, so full collections of the task state
come ``YOUNG_THRESHOLD / 700`` times less often.  Cyclic garbage is still
collected, in larger batches; reference counting frees everything else at once,
as before.  Only the head does this: workers and the driver run the user's code,
whose collector is the user's.

The driver only pauses its collector, for as long as ``daskray.get`` takes to
turn a dask graph into the message it sends (:func:`paused`): that allocates some
ten objects per task, none of them garbage, and each full collection meanwhile
scans the whole dask graph the user holds as well.  On the W1 benchmark the
pause saves about a fifth of that time (0.25 s of 1.1 s, measured on a 2-core
machine).  The collector's state is restored afterwards, and what the user's
code runs on the cluster is not affected.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

#: allocations (less deallocations) of tracked objects between young collections
YOUNG_THRESHOLD = 10_000


def tune_for_long_lived_state() -> None:
    """Freeze what exists now and make collections rarer (see the module)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (unless it was off already); the
    collector is switched back on when the block ends, however it ends."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
