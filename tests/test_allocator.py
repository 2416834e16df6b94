"""Worker heap tuning: freed buffers are reused between tasks, and an idle worker
returns its free memory to the system (daskray/runtime/allocator.py)."""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest

import daskray
from daskray.runtime import allocator

from helpers import wait_until

pytestmark = pytest.mark.skipif(not allocator.available(), reason="needs glibc's malloc")

MB = 1024 * 1024


def _minor_faults() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def churn(rounds: int = 10, live: int = 4) -> int:
    """Page faults taken while allocating and freeing ``live`` 8 MB arrays ``rounds``
    times, as an array task does with its chunks."""
    before = _minor_faults()
    for _ in range(rounds):
        arrays = [np.ones(MB) for _ in range(live)]
        del arrays
    return _minor_faults() - before


def test_a_worker_reuses_freed_buffers_instead_of_faulting_in_fresh_pages(cluster):
    churn_remote = daskray.remote(churn)
    daskray.get(churn_remote.remote(1))
    # untuned glibc trims the 32 MB freed each round and faults ~16,000 pages in again
    faults = daskray.get(churn_remote.remote(), timeout=60)
    assert faults < 1000, f"{faults} page faults for buffers freed and allocated again"


def hold_and_free(megabytes: int) -> tuple[int, int]:
    """Allocate and free ``megabytes`` in 8 MB pieces; (pid, RSS before)."""
    rss = psutil.Process().memory_info().rss
    arrays = [np.ones(MB) for _ in range(megabytes // 8)]
    del arrays
    return os.getpid(), rss


def test_an_idle_worker_gives_its_free_heap_memory_back(cluster):
    pid, rss_before = daskray.get(daskray.remote(hold_and_free).remote(200), timeout=60)
    worker = psutil.Process(pid)
    # the 200 MB stay on the heap for the next task while the worker is busy (under
    # TRIM_THRESHOLD); after IDLE_SECONDS without a task they go back to the system
    assert wait_until(lambda: worker.memory_info().rss < rss_before + 50 * MB,
                      timeout=allocator.IDLE_SECONDS + 10), (
        f"worker RSS {worker.memory_info().rss // MB} MiB, "
        f"{rss_before // MB} MiB before the task")


def test_a_knob_the_user_set_keeps_their_value(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    both = allocator.knobs_to_set()
    assert len(both) == 2
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as distributed's nanny sets it
    assert allocator.knobs_to_set() == [(-3, allocator.MMAP_THRESHOLD)]
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert allocator.knobs_to_set() == [(-1, allocator.TRIM_THRESHOLD)]
