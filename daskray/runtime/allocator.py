"""The worker processes' C heap: reuse freed memory between tasks, return it when idle.

Array and DataFrame tasks allocate and free buffers of a few MiB to a few tens of
MiB, one after the other.  glibc's malloc serves such sizes with a fresh ``mmap``
and gives them back with ``munmap`` on free (above its mmap threshold), or trims
them off the top of the heap, so the next task's buffer page-faults all over
again: 2-3x the cost of writing to memory already mapped (measured on a 2-core machine).  On
W3 (an 8000x8000 array in 8 MB chunks) that is ~16,000 page faults per compute
per worker; with the settings below it is a few hundred.

So a worker keeps allocations below ``MMAP_THRESHOLD`` on its heap and keeps up
to ``TRIM_THRESHOLD`` of free memory at the heap's top, and when it has been idle
for ``IDLE_SECONDS`` it hands every free page back to the system
(``malloc_trim``), as dask.distributed's "trim memory" does on demand, so an idle
worker does not sit on the memory of its last computation.

Only glibc has these knobs; elsewhere nothing changes, and a knob the user set
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or their
``GLIBC_TUNABLES``) keeps the user's value.  The idle trim runs on glibc
whatever the knobs: it only returns memory nobody uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: allocations below this come from the heap, where freed memory is reused
MMAP_THRESHOLD = 64 * 1024 * 1024
#: free memory at the heap's top is kept up to this much while the worker is busy
TRIM_THRESHOLD = 256 * 1024 * 1024
#: a worker with no task for this long returns its free heap memory
IDLE_SECONDS = 1.0

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt
        libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def _user_set(variable: str, tunable: str) -> bool:
    """Whether the user set this malloc knob themselves (their setting wins)."""
    return variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


_libc = _glibc()


#: (mallopt option, our value, the environment variable and the tunable that set it)
_KNOBS = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)


def knobs_to_set() -> list[tuple[int, int]]:
    """(mallopt option, value) for each knob the user has not set themselves."""
    return [(option, value) for option, value, variable, tunable in _KNOBS
            if not _user_set(variable, tunable)]


def tune_for_reuse() -> bool:
    """Set this process's malloc to reuse freed buffers (the knobs the user has
    not set); whether every knob now has our value."""
    if _libc is None:
        return False
    knobs = knobs_to_set()
    return all([bool(_libc.mallopt(option, value)) for option, value in knobs]) and (
        len(knobs) == len(_KNOBS))


def available() -> bool:
    """Whether this process's malloc is glibc's, which these functions tune."""
    return _libc is not None


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (a few ms; call when idle)."""
    if _libc is not None:
        _libc.malloc_trim(0)
