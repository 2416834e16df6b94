"""daskray on a dask.distributed cluster: joining, remote calls, objects and their
lifetimes, nested calls, dask graphs (beyond the contract tests, which run on both
backends), errors.  Tests that hold on both backends take the
``backend`` fixture and run on each."""

from __future__ import annotations

import gc
import operator
import os

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from distributed import Client

import daskray
from daskray import GetTimeoutError, TaskCancelledError
from helpers import NUM_WORKERS, wait_until

pytestmark = pytest.mark.timeout(120)


@daskray.remote
def inc(x):
    return x + 1


@daskray.remote
def total(refs):
    return sum(daskray.get(list(refs)))


@daskray.remote
def depth(n):
    return 0 if n == 0 else daskray.get(depth.remote(n - 1)) + 1


def test_remote_calls_and_objects(backend):
    assert daskray.get(inc.remote(1)) == 2
    refs = [inc.remote(i) for i in range(10)]
    assert daskray.get(total.remote(refs)) == 55  # refs inside a list arrive as refs
    big = daskray.put(np.arange(1_000_000))
    assert daskray.get(inc.remote(big))[:3].tolist() == [1, 2, 3]  # top-level: its value


def test_nested_calls_deeper_than_the_workers(backend):
    assert daskray.get(depth.remote(8)) == 8


def test_get_timeout(backend, tmp_path):
    @daskray.remote
    def wait_for_file(path):
        import os
        import time

        while not os.path.exists(path):
            time.sleep(0.01)
        return 1

    gate = tmp_path / "go"
    ref = wait_for_file.remote(str(gate))
    with pytest.raises(GetTimeoutError):
        daskray.get(ref, timeout=0.3)
    gate.touch()
    assert daskray.get(ref, timeout=30) == 1


# ================================================================ dask graphs

#: a test of the dask.distributed backend alone (the local runtime has tests of its own)
ON_DASK = pytest.mark.parametrize("backend", ["distributed"], indirect=True)


def test_graphs_read_objectrefs(backend):
    ref = inc.remote(1)
    assert dask.delayed(operator.add)(ref, 10).compute() == 12
    assert dask.compute(ref) == (2,)
    assert daskray.get({"y": (operator.add, ref, 1)}, ["y", ref.key]) == (3, 2)


@ON_DASK
def test_callbacks_see_graphs_that_read_objectrefs(backend):
    ref = inc.remote(1)
    seen = {}
    with Callback(posttask=lambda key, value, dsk, state, worker: seen.__setitem__(key, value)):
        assert daskray.get({"y": (operator.add, ref, 1), "z": (operator.mul, "y", 2)}, "z") == 6
    assert seen == {"y": 3, "z": 6}


@ON_DASK
def test_persist_keeps_results_on_the_dask_cluster_until_dropped(backend, dask_cluster):
    x = da.arange(100, chunks=10) * 2
    (xp,) = dask.persist(x)
    refs = list(dict(xp.dask).values())
    assert len(refs) == 10 and all(isinstance(r, daskray.ObjectRef) for r in refs)
    keys = [r.key for r in refs]

    def known(dask_scheduler, keys=keys):
        return [k for k in keys if k in dask_scheduler.tasks]

    with Client(dask_cluster, set_as_default=False) as client:
        assert client.run_on_scheduler(known) == keys
        assert daskray.get(refs[3]).tolist() == list(range(60, 80, 2))
        assert (xp + 1).sum().compute() == 2 * 4950 + 100
        del xp, refs
        gc.collect()
        assert wait_until(lambda: client.run_on_scheduler(known) == [], timeout=30), \
            "the persisted chunks stayed on the cluster after their collection was dropped"


@daskray.remote
def graph_total(n):
    dsk = {("x", i): (operator.add, i, 1) for i in range(n)}
    dsk["total"] = (sum, list(dsk))
    return daskray.get(dsk, "total")


@ON_DASK
def test_graphs_computed_inside_tasks_leave_the_worker_pool(backend):
    # more outer tasks than the cluster's two threads; each waits for a graph whose
    # tasks need a thread too: they get one only if the waiting tasks give theirs back
    refs = [graph_total.remote(5) for _ in range(6)]
    assert daskray.get(refs, timeout=60) == [15] * 6


def _exit_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the dask worker process dies; its nanny starts another
    return "ran again"


def _exit_always():
    os._exit(1)


def _wait_for_workers(dask_cluster):
    with Client(dask_cluster, set_as_default=False) as client:
        client.wait_for_workers(NUM_WORKERS, timeout=60)


@ON_DASK
def test_graph_task_runs_again_when_its_worker_dies(backend, dask_cluster, tmp_path):
    try:
        dsk = {"x": (_exit_once, str(tmp_path / "died")), "y": (str.upper, "x")}
        assert daskray.get(dsk, "y") == "RAN AGAIN"
    finally:
        _wait_for_workers(dask_cluster)


@ON_DASK
def test_graph_task_that_kills_its_workers_is_a_workercrashederror(backend, dask_cluster):
    try:
        with pytest.raises(daskray.WorkerCrashedError, match="allowed-failures"):
            daskray.get({"x": (_exit_always,), "y": (inc, "x")}, "y")
    finally:
        _wait_for_workers(dask_cluster)
