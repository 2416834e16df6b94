"""Small helpers shared by the test modules."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import daskray

#: the size of the cluster every test that uses the shared ``cluster`` fixture runs on
NUM_WORKERS = 2


def start_cluster(**options: Any) -> None:
    """``daskray.init`` of the cluster the tests share: ``NUM_WORKERS`` workers, with
    the scheduler core checking its invariants after every event (``_validate``),
    so each integration test also checks the core.  ``options`` add to or override
    these (e.g. ``resources=...``).  A test that stopped the shared cluster starts
    it again with this."""
    daskray.init(**{"num_workers": NUM_WORKERS, "_validate": True, **options})


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def mark_started(path: str | None) -> None:
    """In a task or an actor call: say that it runs now, by creating ``path``
    (the test waits for it with :func:`wait_for_path` rather than sleeping)."""
    if path is not None:
        open(path, "w").close()


def wait_for_path(path: str | os.PathLike, timeout: float = 20.0) -> None:
    """Wait until ``path`` exists (a task said it runs); fail the test if it does not."""
    assert wait_until(lambda: os.path.exists(path), timeout), \
        f"{path} did not appear within {timeout} s: the task it marks never ran"


def digits_split():
    """scikit-learn's digits as a daskray.ml Dataset: 8 shards, 80/20 split,
    standardized by the training part's statistics; (train, test)."""
    from sklearn.datasets import load_digits

    from daskray.ml import Dataset

    data = load_digits()
    ds = Dataset.from_numpy(data.data, data.target, num_shards=8, seed=0)
    train, test = ds.train_test_split(test_size=0.2, seed=0)
    train, stats = train.standardize()
    test, _ = test.standardize(stats)
    return train, test


def start_dask_cluster() -> Any:
    """A dask.distributed cluster on this machine for the tests of daskray's
    dask.distributed backend: ``NUM_WORKERS`` worker processes (with nannies) of one
    thread each, listening on loopback, dashboard on a free port."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=NUM_WORKERS, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0")


def running_backend() -> str | None:
    """The backend daskray runs on now ("local", "local_mode", "distributed"), or None."""
    if not daskray.is_initialized():
        return None
    return daskray.init(ignore_reinit_error=True).backend


def stop_process(proc: Any, grace: float = 10.0) -> None:
    """Stop a process a test started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
