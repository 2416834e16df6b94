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
from helpers import NUM_WORKERS, start_dask_cluster, stop_process, wait_for_path, wait_until

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


def test_unpicklable_argument_raises_serialization_error_at_submit(backend):
    import threading

    lock = threading.Lock()
    with pytest.raises(daskray.SerializationError, match="inc.*lock") as info:
        inc.remote(lock)
    assert isinstance(info.value, TypeError)
    with pytest.raises(daskray.SerializationError, match="lock"):
        inc.remote([lock])
    with pytest.raises(daskray.SerializationError, match="lock"):
        daskray.put(lock)
    assert inc.remote(1).get(timeout=30) == 2  # nothing was broken by the refusals


@daskray.remote
def spin_until(path, marker=None):
    """Busy in Python (not in one long C call) until ``path`` exists."""
    import os
    import time

    if marker is not None:
        open(marker, "w").close()
    while not os.path.exists(path):
        time.sleep(0.01)
    return "finished"


def test_cancel_stops_a_running_call_and_its_dependents(backend, tmp_path):
    running = spin_until.remote(str(tmp_path / "never"), str(tmp_path / "started"))
    child = inc.remote(running)
    wait_for_path(tmp_path / "started")
    daskray.cancel(running)
    with pytest.raises(TaskCancelledError):
        running.get(timeout=20)
    with pytest.raises(TaskCancelledError):
        child.get(timeout=20)
    # the call stopped: both workers run new calls at once
    gate = tmp_path / "gate"
    both = [spin_until.remote(str(gate), str(tmp_path / f"s{i}")) for i in range(2)]
    for i in range(2):
        wait_for_path(tmp_path / f"s{i}")
    gate.touch()
    assert daskray.get(both, timeout=20) == ["finished", "finished"]


def test_a_finished_call_is_not_cancelled(backend):
    ref = inc.remote(1)
    assert ref.get(timeout=30) == 2
    daskray.cancel(ref)
    assert ref.get(timeout=30) == 2


# ---------------------------------------------------------------- lifetimes (distributed only)

def _scheduler_state(dask_cluster, key):
    """The dask scheduler's state of ``key`` (None once it forgot the key)."""
    task = dask_cluster.scheduler.tasks.get(key)
    return None if task is None else task.state


@daskray.remote
def make_refs(n):
    return [daskray.put(i * 10) for i in range(n)]


@daskray.remote
def read_nested(holder):
    return daskray.get(holder[0])


def test_objects_are_freed_on_the_cluster_when_their_last_ref_is_gone(on_distributed, tmp_path):
    dask_cluster = on_distributed
    put_ref = daskray.put(np.ones(1000))
    call_ref = inc.remote(1)
    assert call_ref.get(timeout=30) == 2
    keys = [put_ref.key, call_ref.key]
    assert [_scheduler_state(dask_cluster, k) for k in keys] == ["memory", "memory"]
    del put_ref, call_ref
    assert wait_until(lambda: all(_scheduler_state(dask_cluster, k) is None for k in keys),
                      timeout=10), [_scheduler_state(dask_cluster, k) for k in keys]

    # equal values put twice are two objects (distributed would merge them by hash)
    a, b = daskray.put(123), daskray.put(123)
    assert a.key != b.key and a != b
    assert daskray.get([a, b]) == [123, 123]

    # refs made by a task and returned in a list stay readable while the list is held
    inner = make_refs.remote(3).get(timeout=30)
    assert daskray.get(inner, timeout=30) == [0, 10, 20]
    inner_keys = [r.key for r in inner]
    del inner
    assert wait_until(lambda: all(_scheduler_state(dask_cluster, k) is None
                                  for k in inner_keys), timeout=10)

    # a ref nested in an argument lives until the call ran, even if dropped at once
    gate = daskray.put("payload")
    reader = read_nested.remote([gate])
    del gate
    assert reader.get(timeout=30) == "payload"

    # a call whose result is dropped at once still runs (Ray's rule), then is freed
    gate = tmp_path / "gate"
    dropped = spin_until.remote(str(gate), str(tmp_path / "ran"))
    key = dropped.key
    del dropped
    wait_for_path(tmp_path / "ran")
    gate.touch()
    assert wait_until(lambda: _scheduler_state(dask_cluster, key) is None, timeout=10)


@daskray.remote
def crash_worker():
    import os

    os._exit(1)


def test_a_call_whose_workers_keep_dying_raises_worker_crashed_error(on_distributed):
    """distributed re-runs it allowed-failures times (3), then daskray's error."""
    with pytest.raises(daskray.WorkerCrashedError, match="died"):
        crash_worker.remote().get(timeout=90)
    assert inc.remote(1).get(timeout=60) == 2  # the cluster recovers


@daskray.remote
def where_am_i():
    ctx = daskray.get_runtime_context()
    return ctx.get_worker_id(), ctx.get_node_id(), ctx.get_task_id(), ctx.get_job_id()


def test_joining_tells_the_dask_cluster(on_distributed):
    dask_cluster = on_distributed
    # an earlier test may have killed a worker: its nanny brings it back
    assert wait_until(lambda: len(dask_cluster.scheduler.workers) == NUM_WORKERS, timeout=60)
    ctx = daskray.init(ignore_reinit_error=True)
    assert ctx.backend == "distributed" and ctx["dashboard_url"] == ctx.dashboard_url
    assert ctx.address_info["address"] == dask_cluster.scheduler_address
    workers = dask_cluster.scheduler_info["workers"]
    assert daskray.cluster_resources() == {"CPU": float(len(workers))}
    assert sorted(n["NodeID"] for n in daskray.nodes()) == sorted(workers)
    worker, node, task, job = where_am_i.remote().get(timeout=30)
    assert worker in workers and node == worker and task.startswith("daskray-ref-")
    assert job is None
    assert daskray.get_runtime_context().get_job_id() is not None
    with pytest.raises(daskray.ClusterError, match="object store"):
        daskray.object_store_stats()
    with pytest.raises(ValueError, match="num_workers"):
        daskray.shutdown()
        daskray.init(num_workers=3, address=dask_cluster.scheduler_address)


def test_a_worker_without_daskray_is_named_at_init(on_distributed, tmp_path):
    """A dask worker whose Python cannot import daskray: init fails and says so."""
    import subprocess
    import sys

    from distributed import LocalCluster

    # a worker process where ``import daskray`` fails, as where it is not installed
    no_daskray = ("import sys; sys.modules['daskray'] = None; "
                  "from distributed.cli.dask_worker import main; main()")
    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as bare:
        worker = subprocess.Popen(
            [sys.executable, "-c", no_daskray, bare.scheduler_address,
             "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: len(bare.scheduler.workers) == 1, timeout=60)
            daskray.shutdown()
            with pytest.raises(daskray.ClusterError, match="install daskray"):
                daskray.init(address=bare.scheduler_address)
            assert not daskray.is_initialized()
        finally:
            stop_process(worker)


def test_init_with_a_client_leaves_it_open_and_never_takes_a_default_one(on_distributed):
    from distributed import Client

    dask_cluster = on_distributed
    daskray.shutdown()
    with Client(dask_cluster.scheduler_address, set_as_default=True) as client:
        # a default distributed client exists: init() without an address still starts
        # daskray's own runtime, it never joins the dask cluster by itself
        ctx = daskray.init(num_workers=1)
        assert ctx.backend == "local"
        daskray.shutdown()
        ctx = daskray.init(client=client)
        assert ctx.backend == "distributed"
        assert inc.remote(1).get(timeout=30) == 2
        daskray.shutdown()
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3  # still open
        with pytest.raises(ValueError, match="address= or client="):
            daskray.init(client=client, address=dask_cluster.scheduler_address)


@pytest.mark.timeout(180)
def test_joining_over_tls(on_distributed):
    """A cluster whose comms are TLS: joined with security=, refused without it."""
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()  # a self-signed CA and certificate (cryptography)
    daskray.shutdown()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      protocol="tls://", security=security,
                      dashboard_address="127.0.0.1:0") as tls_cluster:
        address = tls_cluster.scheduler_address
        assert address.startswith("tls://")
        with pytest.raises(daskray.ClusterError, match="TLS"):
            daskray.init(address=address)  # no certificates: no connection
        assert not daskray.is_initialized()
        daskray.init(address=address, security=security)
        try:
            assert inc.remote(41).get(timeout=30) == 42
        finally:
            daskray.shutdown()


@daskray.remote
def worker_address():
    return daskray.get_runtime_context().get_worker_id()


@pytest.mark.timeout(180)
def test_resources_place_calls_on_workers_that_declare_them(on_distributed):
    """dask worker resources are daskray's custom resources; num_cpus > 1 asks for the
    resource CPU; a call no worker can take is refused at once, not left waiting."""
    import subprocess
    import sys

    from distributed import LocalCluster

    daskray.shutdown()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as mixed:
        daskray.init(address=mixed.scheduler_address)
        try:
            with pytest.raises(ValueError, match="no dask worker offers"):
                worker_address.options(resources={"special": 1}).remote()
            with pytest.raises(ValueError, match="CPU"):
                worker_address.options(num_cpus=2).remote()
        finally:
            daskray.shutdown()
        special = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", mixed.scheduler_address,
             "--nthreads", "2", "--no-nanny", "--host", "127.0.0.1",
             "--resources", "special=2 CPU=2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: len(mixed.scheduler.workers) == 2, timeout=60)
            special_worker = next(a for a, w in mixed.scheduler.workers.items() if w.resources)
            daskray.init(address=mixed.scheduler_address)
            # CPU: the threads of a worker, or the CPU resource it declares
            assert daskray.cluster_resources() == {"CPU": 1.0 + 2.0, "special": 2.0}
            refs = [worker_address.options(resources={"special": 1}).remote() for _ in range(6)]
            refs.append(worker_address.options(num_cpus=2).remote())
            assert set(daskray.get(refs, timeout=60)) == {special_worker}
        finally:
            daskray.shutdown()
            stop_process(special)


# ================================================================ dask graphs

#: a test of the dask.distributed backend alone (the local runtime has tests of its own)
ON_DASK = pytest.mark.parametrize("backend", ["distributed"], indirect=True)


def test_graphs_read_objectrefs(backend):
    ref = inc.remote(1)
    assert dask.delayed(operator.add)(ref, 10).compute() == 12
    assert dask.compute(ref) == (2,)
    assert daskray.get({"y": (operator.add, ref, 1)}, ["y", ref.key]) == (3, 2)


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
        # read first: the scheduler has the graph once a result of it came back (this
        # other client's question could overtake daskray's submission)
        assert daskray.get(refs[3]).tolist() == list(range(60, 80, 2))
        assert client.run_on_scheduler(known) == keys
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


@pytest.fixture
def killable_dask_cluster(backend):
    """daskray on a dask.distributed cluster of the test's own, for tests that kill
    its workers: distributed's nanny sometimes fails to start a killed worker again
    (seen on a loaded machine), which must not leave the shared cluster short."""
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}), \
            start_dask_cluster() as own:
        daskray.shutdown()
        daskray.init(address=own.scheduler_address)
        try:
            yield own
        finally:
            daskray.shutdown()  # the next test's backend fixture joins the shared one


@ON_DASK
def test_graph_task_runs_again_when_its_worker_dies(killable_dask_cluster, tmp_path):
    dsk = {"x": (_exit_once, str(tmp_path / "died")), "y": (str.upper, "x")}
    assert daskray.get(dsk, "y") == "RAN AGAIN"


@ON_DASK
def test_graph_task_that_kills_its_workers_is_a_workercrashederror(killable_dask_cluster):
    # distributed gives up after allowed-failures + 1 deaths: 2 here rather than the
    # default 4, as each death waits for a nanny to start a new worker process
    killable_dask_cluster.scheduler.allowed_failures = 1
    with pytest.raises(daskray.WorkerCrashedError, match="allowed-failures"):
        daskray.get({"x": (_exit_always,), "y": (inc, "x")}, "y")
