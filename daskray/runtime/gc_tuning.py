"""The head's garbage collector, set for a process that holds a large, long-lived state.

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
"""

from __future__ import annotations

import gc

#: allocations (less deallocations) of tracked objects between young collections
YOUNG_THRESHOLD = 10_000


def tune_for_long_lived_state() -> None:
    """Freeze what exists now and make collections rarer (see the module)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
