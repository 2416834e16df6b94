"""Ray-style remote functions and objects on a real daskray cluster (issue 4).

``@daskray.remote``, ``.remote()`` -> ``ObjectRef``, ``get`` / ``put`` / ``wait`` /
``cancel``, ``await ref``, refs as dask collections, nested tasks, retries, custom
resources, ``local_mode`` and the bad input of the issue's list.

Most tests share the session's two-worker ``cluster``; the ones that need another
cluster (custom resources, ``local_mode``, a shut-down cluster) stop it and leave a
fresh two-worker one running when they end.  Task functions live at module level
so tracebacks show this file.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import psutil
import pytest

import daskray
from helpers import NUM_WORKERS, start_cluster, wait_until
import daskray.api

pytestmark = pytest.mark.usefixtures("cluster")

MB = 1 << 20


# =========================================================================== tasks


@daskray.remote
def add(x, y):
    return x + y


@daskray.remote
def inc(x):
    return x + 1


@daskray.remote
def getpid():
    return os.getpid()


@daskray.remote
def sleep_then(seconds, value=None):
    # in short sleeps: a cancel on the dask.distributed backend stops a task between
    # Python steps, not inside one long C call, and a 30 s sleep left running would
    # hold a dask worker's only thread into the next tests
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    return value


@daskray.remote
def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


@daskray.remote
def write_pid_then_sleep(path, seconds):
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


@daskray.remote
def raise_value_error(x):
    raise ValueError(f"boom-marker {x}")  # THE-USERS-LINE


class CustomError(Exception):
    pass


@daskray.remote
def raise_custom(code):
    exc = CustomError("custom-marker")
    exc.code = code  # an attribute: it must come back too
    raise exc


@daskray.remote
def identity(x):
    return x


@daskray.remote
def array_digest(arr):
    return (type(arr).__name__, arr.dtype.str, arr.shape,
            hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())


@daskray.remote
def describe_args(*args, **kwargs):
    """Which arguments arrived as ObjectRefs, and what the nested ones hold."""
    def show(v):
        if isinstance(v, daskray.ObjectRef):
            return ("ref", v.get())
        if isinstance(v, list):
            return ("list", [show(x) for x in v])
        if isinstance(v, dict):
            return ("dict", {k: show(x) for k, x in v.items()})
        return ("value", v)
    return [show(a) for a in args], {k: show(v) for k, v in kwargs.items()}


@daskray.remote
def sleep_then_get_nested(seconds, box):
    time.sleep(seconds)  # the driver drops its refs meanwhile
    return [r.get() for r in box]


@daskray.remote
def sleep_then_sum(seconds, arr):
    time.sleep(seconds)
    return float(arr.sum())


@daskray.remote
def plus_sum(x, arr):
    return x + float(arr.sum())


@daskray.remote
def make_array(nbytes, fill):
    return np.full(nbytes // 8, fill, dtype=np.float64)


@daskray.remote
def sum_array(arr):
    return float(arr.sum())


@daskray.remote(num_returns=3)
def three(x):
    return x, x + 1, x + 2


@daskray.remote
def two_values():
    return 1, 2


@daskray.remote
def fail_first_n_times(counter_path, n):
    path = Path(counter_path)
    count = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(count))
    if count <= n:
        raise RuntimeError(f"flaky failure number {count}")
    return count


@daskray.remote
def crash_worker_once(marker_path):
    marker = Path(marker_path)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@daskray.remote
def fib(n):
    if n < 2:
        return n
    return sum(daskray.get([fib.remote(n - 1), fib.remote(n - 2)]))


@daskray.remote
def put_and_return_ref(value):
    return [daskray.put(value)]


@daskray.remote
def submit_children_and_wait(n):
    refs = [inc.remote(i) for i in range(n)]
    ready, not_ready = daskray.wait(refs, num_returns=n, timeout=30)
    return len(ready), len(not_ready), daskray.get(refs)


def add_offset(block, offset):
    return block + offset


def plain_add(x, y):
    return x + y


# =========================================================================== helpers




def wait_for_file(path: Path, timeout: float) -> str:
    assert wait_until(lambda: path.exists() and path.read_text().strip(), timeout), (
        f"no task wrote {path} within {timeout} s")
    return path.read_text().strip()


def worker_processes() -> list[psutil.Process]:
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    return [p for p in head.children() if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def wait_for_workers(n=NUM_WORKERS, timeout=30.0):
    """After a crash: the head has started a replacement and it joined."""
    client = daskray.api._runtime.cluster.client
    assert wait_until(lambda: len(client.workers) >= n, timeout), client.workers


def cancel_quietly(*refs):
    for ref in refs:
        daskray.cancel(ref)
    for ref in refs:
        try:
            ref.get(timeout=20)
        except Exception:
            pass


def fresh_cluster(**kwargs):
    if daskray.is_initialized():
        daskray.shutdown()
    daskray.init(**kwargs)


@pytest.fixture
def custom_cluster(cluster):
    """Start a cluster of one's own (``start(**init_kwargs)``); the shared one is
    running again afterwards."""
    yield fresh_cluster
    if daskray.is_initialized():
        daskray.shutdown()
    start_cluster()


@daskray.remote
def _config_value(key):
    return dask.config.get(key, None)


@pytest.mark.timeout(60)
def test_workers_start_with_the_drivers_dask_config(custom_cluster):
    # as dask.distributed's workers do: what is set when the cluster starts
    with dask.config.set({"daskray-test.marker": 42, "daskray-test.nested": {"a": [1, "x"]},
                          "daskray-test.function": len}):
        custom_cluster(num_workers=2)
    assert daskray.get(_config_value.remote("daskray-test.marker"), timeout=30) == 42
    assert daskray.get(_config_value.remote("daskray-test.nested.a"), timeout=30) == [1, "x"]
    # a value JSON cannot carry stays behind rather than failing the start
    assert daskray.get(_config_value.remote("daskray-test.function"), timeout=30) is None


@daskray.remote
def _nested_compute():
    return dask.delayed(sum)([1, 2, 3]).compute()


@pytest.mark.timeout(60)
def test_the_drivers_scheduler_setting_is_not_passed_to_workers(custom_cluster):
    with dask.config.set(scheduler="daskray"):  # meaningless in a worker
        custom_cluster(num_workers=2)
        assert daskray.get(_nested_compute.remote(), timeout=30) == 6


@pytest.fixture
def pin_cluster(custom_cluster):
    """Two workers; only the first has the custom resource ``pin``."""
    custom_cluster(num_workers=2, resources=[{"pin": 1}, {}])
    yield


@daskray.remote
def _runtime_context_is_local_mode():
    return daskray.get_runtime_context().is_local_mode()


@pytest.fixture
def local_mode(custom_cluster):
    custom_cluster(local_mode=True)
    yield


# =========================================================================== basic calls


@pytest.mark.timeout(60)
def test_the_shared_cluster_checks_the_core_invariants(cluster):
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    config = json.loads(head.environ()["DASKRAY_CONFIG"])
    assert config["validate"] is True  # SchedulerState(validate=True) in the head


@pytest.mark.timeout(60)
def test_remote_call_returns_ref_at_once_and_get_gives_value(backend):
    ref = add.remote(2, 3)
    assert isinstance(ref, daskray.ObjectRef)
    assert ref.get() == 5
    assert daskray.get(ref) == 5
    assert daskray.get([ref, add.remote(ref, 1)]) == [5, 6]
    assert add.remote(x=1, y=2).get() == 3  # keyword arguments
    assert add.remote(1, y=ref).get() == 6  # a ref passed by keyword is resolved too

    start = time.monotonic()
    slow = sleep_then.remote(1.0, "slow")
    assert time.monotonic() - start < 0.5  # submitting does not wait for the task
    assert slow.get(timeout=30) == "slow"


@pytest.mark.timeout(60)
def test_decorator_options_and_per_call_options(backend):
    @daskray.remote(num_cpus=1, max_retries=1, name="my-task")
    def mul(a, b):
        return a * b

    assert mul.remote(6, 7).get(timeout=30) == 42
    assert mul.options(name="renamed", num_cpus=0.5).remote(2, 3).get(timeout=30) == 6
    assert inc.options(max_retries=0, retry_exceptions=False).remote(1).get(timeout=30) == 2
    # options() makes a copy: the function itself keeps its options
    assert mul._options == {"num_cpus": 1, "max_retries": 1, "name": "my-task"}
    # a remote function keeps its name and docstring
    assert mul.__name__ == "mul"
    assert describe_args.__doc__.startswith("Which arguments")


@pytest.mark.timeout(60)
def test_hundred_refs_depending_on_one_come_back_in_order(backend):
    task = add.remote(2, 3)
    refs = [add.remote(task, i) for i in range(100)]
    assert daskray.get(refs, timeout=30) == [5 + i for i in range(100)]
    # and a chain of 100, each depending on the previous
    ref = inc.remote(0)
    for _ in range(99):
        ref = inc.remote(ref)
    assert ref.get(timeout=30) == 100


@pytest.mark.timeout(60)
def test_put_large_numpy_array_read_bit_exact_by_tasks(backend):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal(3 * MB)  # 24 MB of float64, every bit pattern random
    expected = ("ndarray", arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
    ref = daskray.put(arr)
    assert isinstance(ref, daskray.ObjectRef)
    # read by several tasks, on both workers
    digests = daskray.get([array_digest.remote(ref) for _ in range(4)], timeout=30)
    assert digests == [expected] * 4
    back = ref.get(timeout=30)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()
    # small objects too, and any picklable value
    small = daskray.put({"a": [1, 2.5, "x"], "b": None})
    assert small.get() == {"a": [1, 2.5, "x"], "b": None}
    assert identity.remote(small).get(timeout=30) == {"a": [1, 2.5, "x"], "b": None}


# =========================================================================== wait


@pytest.mark.timeout(60)
def test_wait_splits_ready_and_not_ready_in_input_order(backend):
    fast_a = sleep_then.remote(0, "a")
    fast_b = sleep_then.remote(0, "b")
    assert daskray.get([fast_a, fast_b], timeout=30) == ["a", "b"]
    slow = sleep_then.remote(30, "slow")
    try:
        ready, not_ready = daskray.wait([slow, fast_b, fast_a], num_returns=2, timeout=20)
        assert ready == [fast_b, fast_a] and not_ready == [slow]
        ready, not_ready = daskray.wait([fast_a, slow, fast_b], num_returns=2, timeout=20)
        assert ready == [fast_a, fast_b] and not_ready == [slow]
        # at most num_returns are ready, even when more are
        ready, not_ready = daskray.wait([fast_b, fast_a], num_returns=1)
        assert ready == [fast_b] and not_ready == [fast_a]

        # the timeout: returns what is ready then, without raising
        start = time.monotonic()
        ready, not_ready = daskray.wait([fast_a, slow], num_returns=2, timeout=0.3)
        elapsed = time.monotonic() - start
        assert ready == [fast_a] and not_ready == [slow]
        assert 0.25 <= elapsed < 3, elapsed
        ready, not_ready = daskray.wait([slow], timeout=0.1)
        assert ready == [] and not_ready == [slow]
    finally:
        cancel_quietly(slow)


@pytest.mark.timeout(60)
def test_wait_without_timeout_returns_when_num_returns_are_ready(backend):
    refs = [sleep_then.remote(0.2 * i, i) for i in range(4)]
    ready, not_ready = daskray.wait(refs, num_returns=3)
    assert len(ready) == 3 and len(not_ready) == 1
    assert sorted(ready + not_ready, key=refs.index) == refs
    assert [r for r in refs if r in ready] == ready  # input order kept
    assert daskray.get(refs, timeout=30) == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_wait_bad_input(backend):
    ref = inc.remote(1)
    with pytest.raises(TypeError):
        daskray.wait([ref, 3])
    with pytest.raises(ValueError):
        daskray.wait([ref, ref])
    with pytest.raises(ValueError):
        daskray.wait([ref], num_returns=2)


# =========================================================================== cancel


@pytest.mark.timeout(60)
def test_cancel_task_queued_in_the_head(tmp_path):
    # both workers busy, and their prefetch slots taken: the next task waits in the head
    blockers = [write_pid_then_sleep.remote(str(tmp_path / f"b{i}"), 30) for i in range(2)]
    fillers = [sleep_then.remote(0, i) for i in range(2)]
    try:
        for i in range(2):
            wait_for_file(tmp_path / f"b{i}", 20)
        queued = inc.remote(1)
        daskray.cancel(queued)
        start = time.monotonic()
        with pytest.raises(daskray.TaskCancelledError):
            queued.get(timeout=10)
        assert time.monotonic() - start < 2
        with pytest.raises(daskray.TaskCancelledError):  # and it stays cancelled
            daskray.get([queued])
    finally:
        cancel_quietly(*blockers, *fillers)
    assert inc.remote(41).get(timeout=30) == 42


@pytest.mark.timeout(60)
def test_cancel_task_prefetched_on_a_busy_worker_is_prompt(tmp_path):
    blockers = [write_pid_then_sleep.remote(str(tmp_path / f"b{i}"), 20) for i in range(2)]
    try:
        for i in range(2):
            wait_for_file(tmp_path / f"b{i}", 20)
        queued = inc.remote(1)  # queued behind a blocker, on a worker or in the head
        daskray.available_resources()  # a round trip after it: the head has the task now
        daskray.cancel(queued)
        with pytest.raises(daskray.TaskCancelledError):
            queued.get(timeout=5)
    finally:
        cancel_quietly(*blockers)


@pytest.mark.timeout(60)
def test_cancel_running_task_interrupts_it(tmp_path):
    marker = tmp_path / "running"
    ref = write_pid_then_sleep.remote(str(marker), 30)
    pid = int(wait_for_file(marker, 20))
    start = time.monotonic()
    daskray.cancel(ref)
    with pytest.raises(daskray.TaskCancelledError):
        ref.get(timeout=20)
    assert time.monotonic() - start < 5  # interrupted, not left to sleep 30 s
    # the worker was interrupted, not killed, and runs tasks again
    assert psutil.pid_exists(pid)
    assert daskray.get([inc.remote(i) for i in range(4)], timeout=30) == [1, 2, 3, 4]
    # cancelling a finished task changes nothing
    done = inc.remote(1)
    assert done.get(timeout=30) == 2
    daskray.cancel(done)
    assert done.get(timeout=30) == 2
    with pytest.raises(TypeError):
        daskray.cancel("not a ref")


@pytest.mark.timeout(60)
def test_dependents_of_a_cancelled_task_are_cancelled(tmp_path):
    marker = tmp_path / "running"
    ref = write_pid_then_sleep.remote(str(marker), 30)
    child = inc.remote(ref)
    wait_for_file(marker, 20)
    daskray.cancel(ref)
    with pytest.raises(daskray.TaskCancelledError):
        child.get(timeout=20)


# =========================================================================== argument passing


@pytest.mark.timeout(60)
def test_top_level_refs_are_resolved_nested_refs_are_passed_as_refs(backend):
    x = daskray.put(10)
    y = inc.remote(20)
    args, kwargs = describe_args.remote(x, [y, x], {"k": y}, kw=x, nested=[x]).get(timeout=30)
    assert args == [("value", 10), ("list", [("ref", 21), ("ref", 10)]),
                    ("dict", {"k": ("ref", 21)})]
    assert kwargs == {"kw": ("value", 10), "nested": ("list", [("ref", 10)])}


@pytest.mark.timeout(60)
def test_refs_dropped_by_the_driver_stay_alive_while_tasks_need_them(backend):
    big = daskray.put(np.ones(MB // 8 * 4))       # 4 MB: stored on a worker
    small = daskray.put("small value")              # inline
    produced = sleep_then.remote(0.3, "produced")   # not even finished yet
    nested = sleep_then_get_nested.remote(1.0, [small, produced])
    top = sleep_then_sum.remote(1.0, big)
    # not dispatched before its other input is ready, long after ``big`` was dropped
    waiting = plus_sum.remote(sleep_then.remote(1.0, 1.0), big)
    chained = inc.remote(sleep_then.remote(0.5, 1))  # the inner ref is dropped at once
    del big, small, produced
    gc.collect()
    assert nested.get(timeout=30) == ["small value", "produced"]
    assert top.get(timeout=30) == float(MB // 8 * 4)
    assert waiting.get(timeout=30) == 1.0 + MB // 8 * 4
    assert chained.get(timeout=30) == 2


@pytest.mark.timeout(60)
def test_objects_are_freed_when_their_refs_are_dropped():
    """Dropping refs to many 20 MB objects (puts and task results) does not grow the
    workers' memory by their total: the workers free them."""
    size = 20 * MB
    # warm up: allocator arenas, imports
    for fill in range(2):
        r = daskray.put(np.full(size // 8, fill, dtype=np.float64))
        assert sum_array.remote(r).get(timeout=30) == fill * (size // 8)
        del r
    gc.collect()
    time.sleep(0.5)
    procs = worker_processes()
    assert len(procs) == NUM_WORKERS
    before = sum(p.memory_info().rss for p in procs)
    rounds = 20
    for i in range(rounds):
        ref = daskray.put(np.full(size // 8, i, dtype=np.float64))
        made = make_array.remote(size, i)
        assert daskray.get([sum_array.remote(ref), sum_array.remote(made)], timeout=30) == [
            float(i * (size // 8))] * 2
        del ref, made
    gc.collect()
    total = rounds * 2 * size  # 800 MB were stored; without freeing RSS grows that much
    limit = 6 * size

    def grown():
        return sum(p.memory_info().rss for p in procs) - before

    assert wait_until(lambda: grown() < limit, 10, 0.2), (
        f"workers grew by {grown() / MB:.0f} MB after {total / MB:.0f} MB of objects "
        "were stored and all their refs dropped")


# =========================================================================== num_returns


@pytest.mark.timeout(60)
def test_num_returns(backend):
    refs = three.remote(10)
    assert isinstance(refs, list) and len(refs) == 3
    assert all(isinstance(r, daskray.ObjectRef) for r in refs)
    assert len(set(refs)) == 3
    assert daskray.get(refs, timeout=30) == [10, 11, 12]
    assert refs[1].get() == 11
    assert inc.remote(refs[2]).get(timeout=30) == 13

    a, b = two_values.options(num_returns=2).remote()
    assert daskray.get([b, a], timeout=30) == [2, 1]
    one = two_values.remote()  # num_returns=1: the tuple is one object
    assert one.get(timeout=30) == (1, 2)

    wrong = three.options(num_returns=2).remote(0)  # returns 3 values, not 2
    with pytest.raises(ValueError, match="num_returns=2"):
        daskray.get(wrong, timeout=30)


# =========================================================================== retries


@pytest.mark.timeout(60)
def test_retry_exceptions(backend, tmp_path):
    counter = tmp_path / "retried"
    ok = fail_first_n_times.options(retry_exceptions=True, max_retries=3).remote(str(counter), 2)
    assert ok.get(timeout=30) == 3  # failed twice, succeeded on the third run
    assert counter.read_text() == "3"

    counter = tmp_path / "not-retried"
    bad = fail_first_n_times.options(max_retries=3).remote(str(counter), 2)
    with pytest.raises(RuntimeError, match="flaky failure number 1"):
        bad.get(timeout=30)
    assert counter.read_text() == "1"  # application errors are not retried by default

    counter = tmp_path / "too-few-retries"
    bad = fail_first_n_times.options(retry_exceptions=True, max_retries=1).remote(
        str(counter), 2)
    with pytest.raises(RuntimeError, match="flaky failure number 2"):
        bad.get(timeout=30)
    assert counter.read_text() == "2"


@pytest.mark.timeout(60)
def test_max_retries_after_worker_death(tmp_path):
    marker = tmp_path / "crashed-once"
    ref = crash_worker_once.options(max_retries=1).remote(str(marker))
    pid = ref.get(timeout=45)
    killed = int(marker.read_text())
    assert pid != killed and not psutil.pid_exists(killed)
    # the default, 3 retries, too
    marker2 = tmp_path / "crashed-once-default"
    assert crash_worker_once.remote(str(marker2)).get(timeout=45) != int(
        wait_for_file(marker2, 1))
    wait_for_workers()


@pytest.mark.timeout(60)
def test_max_retries_zero_worker_death_is_worker_crashed_error(tmp_path):
    marker = tmp_path / "crashed"
    ref = crash_worker_once.options(max_retries=0).remote(str(marker))
    child = inc.remote(ref)
    with pytest.raises(daskray.WorkerCrashedError, match="died"):
        ref.get(timeout=45)
    with pytest.raises(daskray.WorkerCrashedError):
        child.get(timeout=45)
    wait_for_workers()
    assert inc.remote(1).get(timeout=30) == 2  # the cluster recovers


# =========================================================================== resources


@pytest.mark.timeout(60)
def test_custom_resources_restrict_where_tasks_run(pin_cluster):
    workers = {p.pid for p in worker_processes()}
    assert len(workers) == 2
    pinned_pids = set(daskray.get(
        [sleep_then_pid.options(resources={"pin": 1}).remote(0.1) for _ in range(8)],
        timeout=45))
    assert len(pinned_pids) == 1 and pinned_pids <= workers
    (pin_worker,) = pinned_pids
    # tasks without the resource run on both workers
    free_pids = set(daskray.get([sleep_then_pid.remote(0.3) for _ in range(6)], timeout=45))
    assert free_pids == workers
    # decorator form, and fractional amounts
    pinned = daskray.remote(resources={"pin": 0.5})(os.getpid)
    assert pinned.remote().get(timeout=30) == pin_worker


@daskray.remote
def _resources_inside():
    return daskray.cluster_resources()["CPU"]


@pytest.mark.timeout(60)
def test_cluster_and_available_resources_as_in_ray(pin_cluster):
    total = daskray.cluster_resources()
    assert total["CPU"] == 2.0 and total["pin"] == 1.0 and total["object_store_memory"] > 0
    assert daskray.get(_resources_inside.remote(), timeout=30) == 2.0  # from a task too
    assert wait_until(lambda: daskray.available_resources()["CPU"] == 2.0, 10)
    busy = sleep_then_pid.options(resources={"pin": 1}).remote(2.0)  # on the "pin" worker
    assert wait_until(lambda: daskray.available_resources().get("pin", 0.0) == 0.0, 10)
    assert daskray.available_resources()["CPU"] == 1.0
    daskray.get(busy, timeout=30)
    (node,) = daskray.nodes()
    assert node["Alive"] and node["Resources"]["CPU"] == 2.0


@pytest.mark.timeout(60)
def test_infeasible_resources_raise_a_clear_error(pin_cluster):
    for resources in ({"nope": 1}, {"pin": 2}):
        ref = getpid.options(resources=resources).remote()
        with pytest.raises(daskray.DaskrayError) as info:
            ref.get(timeout=10)
        assert not isinstance(info.value, daskray.GetTimeoutError)
        message = str(info.value)
        assert list(resources)[0] in message and "resources" in message
    assert getpid.remote().get(timeout=30) in {p.pid for p in worker_processes()}


@pytest.mark.timeout(60)
def test_same_resources_on_every_worker(custom_cluster):
    custom_cluster(num_workers=2, resources={"pin": 1})
    pids = set(daskray.get(
        [sleep_then_pid.options(resources={"pin": 1}).remote(0.3) for _ in range(6)],
        timeout=45))
    assert pids == {p.pid for p in worker_processes()}


# =========================================================================== errors


@pytest.mark.timeout(60)
def test_task_exception_type_and_remote_traceback_with_users_line(backend):
    ref = raise_value_error.remote(3)
    with pytest.raises(ValueError, match="boom-marker 3") as info:
        ref.get(timeout=30)
    exc = info.value
    assert type(exc) is ValueError
    assert isinstance(exc.__cause__, daskray.RemoteTraceback)
    text = str(exc.__cause__)
    assert f'File "{__file__}"' in text
    assert "raise_value_error" in text and "THE-USERS-LINE" in text
    assert "ValueError: boom-marker 3" in text
    assert "THE-USERS-LINE" in "".join(traceback.format_exception(exc))
    # daskray.get of a list raises it too
    with pytest.raises(ValueError, match="boom-marker 3"):
        daskray.get([inc.remote(1), ref], timeout=30)

    # a user's own exception class, attributes intact
    with pytest.raises(CustomError, match="custom-marker") as info:
        raise_custom.remote(77).get(timeout=30)
    assert info.value.code == 77


@pytest.mark.timeout(60)
def test_dependents_of_a_failed_task_raise_the_same_error(backend):
    bad = raise_value_error.remote(5)
    child = inc.remote(bad)
    grandchild = add.remote(child, 1)
    nested_only = describe_args.remote([bad])  # a nested ref: the task runs, get() raises
    for ref in (bad, child, grandchild):
        with pytest.raises(ValueError, match="boom-marker 5") as info:
            ref.get(timeout=30)
        assert "THE-USERS-LINE" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="boom-marker 5"):
        nested_only.get(timeout=30)
    # a dependent submitted after the failure is known fails the same way
    late = inc.remote(bad)
    with pytest.raises(ValueError, match="boom-marker 5"):
        late.get(timeout=30)


@pytest.mark.timeout(60)
def test_get_timeout(backend):
    ref = sleep_then.remote(30, "late")
    try:
        start = time.monotonic()
        with pytest.raises(daskray.GetTimeoutError) as info:
            ref.get(timeout=0.5)
        assert 0.45 <= time.monotonic() - start < 3
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(TimeoutError):
            daskray.get([inc.remote(1), ref], timeout=0.2)
    finally:
        cancel_quietly(ref)


@pytest.mark.timeout(30)
def test_calling_a_remote_function_directly_says_use_remote():
    with pytest.raises(TypeError, match=r"add\.remote\("):
        add(1, 2)


@pytest.mark.timeout(30)
def test_invalid_options_raise_at_decoration_time():
    with pytest.raises(ValueError, match="num_cpu"):
        @daskray.remote(num_cpu=1)
        def f1():
            pass
    with pytest.raises(ValueError, match="num_returns"):
        @daskray.remote(num_returns=0)
        def f2():
            pass
    with pytest.raises(ValueError, match="max_retries"):
        @daskray.remote(max_retries="3")
        def f3():
            pass
    with pytest.raises(ValueError, match="num_gpus"):
        daskray.remote(num_gpus=-1)
    with pytest.raises(ValueError, match="resources"):
        daskray.remote(resources={"pin": "one"})
    with pytest.raises(ValueError, match="retry_exceptions"):
        daskray.remote(retry_exceptions="yes")
    with pytest.raises(ValueError, match="bogus"):
        inc.options(bogus=1)
    with pytest.raises(ValueError, match="num_returns"):
        inc.options(num_returns=-2)


@pytest.mark.timeout(60)
def test_unpicklable_argument_raises_serialization_error_at_submit(monkeypatch):
    client = daskray.api._runtime.cluster.client
    sent = []
    real_send = client.send
    monkeypatch.setattr(client, "send", lambda msg: (sent.append(msg), real_send(msg)))
    lock = threading.Lock()
    with pytest.raises(daskray.SerializationError) as info:
        inc.remote(lock)
    message = str(info.value)
    assert "inc" in message and "lock" in message
    assert isinstance(info.value, TypeError)
    with pytest.raises(daskray.SerializationError):
        add.remote(1, y=[lock])
    with pytest.raises(daskray.SerializationError):
        daskray.put(lock)
    assert sent == []  # refused before anything left the driver
    monkeypatch.undo()
    assert inc.remote(1).get(timeout=30) == 2


@pytest.mark.timeout(60)
def test_get_after_shutdown_raises_instead_of_hanging(custom_cluster):
    custom_cluster(num_workers=2)
    done = inc.remote(1)
    assert done.get(timeout=30) == 2
    pending = sleep_then.remote(30)
    daskray.shutdown()
    for ref in (done, pending):
        start = time.monotonic()
        with pytest.raises(daskray.ClusterError, match="init"):
            ref.get(timeout=10)
        assert time.monotonic() - start < 2
    with pytest.raises(daskray.ClusterError):
        daskray.get([done, pending])
    with pytest.raises(daskray.ClusterError):
        inc.remote(1)
    # a ref of an old cluster, on a new cluster: a clear error too, not a hang
    daskray.init(num_workers=2)
    start = time.monotonic()
    with pytest.raises((daskray.ClusterError, daskray.ObjectLostError)):
        done.get(timeout=10)
    assert time.monotonic() - start < 5


@pytest.mark.timeout(30)
def test_get_dispatches_on_its_first_argument(backend):
    ref = inc.remote(1)
    assert daskray.get(ref) == 2
    assert daskray.get([ref]) == [2]
    assert daskray.get((ref, ref)) == [2, 2]
    assert daskray.get({"a": 1, "b": (plain_add, "a", 10)}, "b") == 11
    with pytest.raises(TypeError, match="ObjectRef"):
        daskray.get([ref, 3])
    with pytest.raises(TypeError):
        daskray.get(42)
    with pytest.raises(TypeError):
        daskray.put(ref)


# =========================================================================== ObjectRef


@pytest.mark.timeout(60)
def test_object_ref_is_hashable_picklable_and_comparable(backend):
    a = inc.remote(1)
    b = inc.remote(1)
    assert a != b
    assert a == a and a != "a" and not (a == 1)
    copied = pickle.loads(pickle.dumps(a))
    assert copied == a and hash(copied) == hash(a) and copied is not a
    assert copy.copy(a) == a and copy.deepcopy(a) == a
    assert len({a, b, copied}) == 2
    assert {a: "x"}[copied] == "x"
    assert copied.get(timeout=30) == 2
    assert isinstance(repr(a), str) and "ObjectRef" in repr(a)
    # a ref passes through tasks: as a nested argument, and inside a result
    assert describe_args.remote([copied]).get(timeout=30) == ([("list", [("ref", 2)])], {})
    (inner,) = put_and_return_ref.remote("made in a task").get(timeout=30)
    assert isinstance(inner, daskray.ObjectRef)
    assert inner.get(timeout=30) == "made in a task"
    assert inc.remote(put_and_return_ref.remote(1).get(timeout=30)[0]).get(timeout=30) == 2


@pytest.mark.timeout(60)
def test_await_ref(backend):
    async def main():
        one = await inc.remote(1)
        many = await asyncio.gather(*(add.remote(i, i) for i in range(5)))
        with pytest.raises(ValueError, match="boom-marker 9"):
            await raise_value_error.remote(9)
        return one, many

    assert asyncio.run(main()) == (2, [0, 2, 4, 6, 8])


# =========================================================================== dask


@pytest.mark.timeout(60)
def test_object_ref_is_a_dask_collection():
    ref = add.remote(2, 3)
    assert dask.is_dask_collection(ref)
    assert dask.compute(ref) == (5,)
    assert dask.compute(ref, daskray.put(7)) == (5, 7)
    assert dask.delayed(plain_add)(ref, 1).compute() == 6
    mixed = dask.delayed(plain_add)(ref, dask.delayed(plain_add)(1, 2))
    assert mixed.compute() == 8
    assert dask.delayed(plain_add)(ref, ref).compute(scheduler=daskray.get) == 10


@pytest.mark.timeout(60)
def test_dask_array_graph_uses_a_ref_value_in_map_blocks():
    offset = inc.remote(9)  # 10, computed by a remote task
    x = da.ones((100, 100), chunks=25)
    y = x.map_blocks(add_offset, dask.delayed(offset), dtype=x.dtype)
    assert y.sum().compute() == 100 * 100 * 11
    z = x.map_blocks(add_offset, offset, dtype=x.dtype)  # the ref itself, too
    np.testing.assert_array_equal(z.compute(), np.full((100, 100), 11.0))
    big = daskray.put(np.arange(100.0))  # a large-ish put used by every block
    w = x.map_blocks(lambda b, v: b * v[: b.shape[1]], dask.delayed(big), dtype=x.dtype)
    assert w.sum().compute() == 100 * 4 * np.arange(25.0).sum()


@pytest.mark.timeout(60)
def test_persist_keeps_results_in_the_cluster():
    x = da.arange(1000, chunks=100) * 2
    (p,) = dask.persist(x)
    values = list(p.__dask_graph__().values())
    assert values and all(isinstance(v, daskray.ObjectRef) for v in values)
    assert p.sum().compute() == 2 * sum(range(1000))
    np.testing.assert_array_equal(p.compute(), np.arange(1000) * 2)


# =========================================================================== nested tasks


@pytest.mark.timeout(60)
def test_nested_tasks_submit_wait_and_get(backend):
    assert submit_children_and_wait.remote(5).get(timeout=30) == (5, 0, [1, 2, 3, 4, 5])
    assert fib.remote(7).get(timeout=30) == 13


@pytest.mark.timeout(60)
def test_nested_tasks_fib_on_two_workers(custom_cluster):
    # its own cluster: a stalled run would leave the shared workers stuck for good
    custom_cluster(num_workers=2)
    for _ in range(5):  # a run that finishes takes well under a second
        start = time.monotonic()
        assert fib.remote(12).get(timeout=15) == 144
        assert time.monotonic() - start < 15


# =========================================================================== Ray code


RAY_SCRIPT = """\
import daskray as ray

ray.init()

@ray.remote
def f(x):
    return x * x

futures = [f.remote(i) for i in range(4)]
print(ray.get(futures))

@ray.remote
def g(a, b):
    return a + b

obj = ray.put(10)
ready, not_ready = ray.wait([g.remote(obj, 1)], num_returns=1, timeout=30)
print(ray.get(ready[0]))

@ray.remote(num_returns=2)
def pair():
    return 1, 2

x, y = pair.remote()
print(ray.get([x, y]))
try:
    ray.get(ray.remote(lambda: 1 / 0).remote())
except ZeroDivisionError:
    print("caught")
ray.shutdown()
"""


@pytest.mark.timeout(60)
def test_ray_code_runs_with_import_daskray_as_ray(tmp_path):
    script = tmp_path / "ray_example.py"
    script.write_text(RAY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=50, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[0, 1, 4, 9]", "11", "[1, 2]", "caught"], proc.stdout


# =========================================================================== local mode


@pytest.mark.timeout(60)
def test_local_mode_runs_remote_calls_in_the_driver(local_mode):
    assert daskray.api._runtime.cluster is None
    ref = getpid.remote()
    assert isinstance(ref, daskray.ObjectRef)
    assert ref.get() == os.getpid()
    assert daskray.get([add.remote(ref, 0), inc.remote(daskray.put(1))]) == [os.getpid(), 2]
    assert three.remote(1)[2].get() == 3
    with pytest.raises(ValueError, match="boom-marker 4") as info:
        raise_value_error.remote(4).get()
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "raise_value_error" and f.filename == __file__ for f in frames)
    ready, not_ready = daskray.wait([inc.remote(1), inc.remote(2)], num_returns=1)
    assert len(ready) == 1 and len(not_ready) == 1
    assert fib.remote(8).get() == 21


@pytest.mark.timeout(60)
def test_a_quick_result_is_ready_while_a_long_task_runs_after_it_on_its_worker(custom_cluster):
    """A worker batches its reports between tasks: the quick task's finish report
    must not wait for the end of the long task that follows it (Ray's test_wait)."""
    custom_cluster(num_workers=1)
    quick, slow = sleep_then.remote(0, "quick"), sleep_then.remote(30, "slow")
    start = time.monotonic()
    ready, _ = daskray.wait([quick], timeout=10)
    assert ready == [quick] and time.monotonic() - start < 10
    assert quick.get(timeout=1) == "quick"
    ready, _ = daskray.wait([slow], timeout=0)
    assert ready == []  # the long one runs on
    daskray.cancel(slow)


@pytest.mark.timeout(60)
def test_the_runtime_context_tells_local_mode(custom_cluster):
    custom_cluster(local_mode=True)
    assert daskray.get_runtime_context().is_local_mode()
    assert getpid.remote().get() == os.getpid()  # what local mode means
    custom_cluster(num_workers=1)
    assert not daskray.get_runtime_context().is_local_mode()
    assert daskray.get(_runtime_context_is_local_mode.remote(), timeout=30) is False


@pytest.mark.timeout(60)
def test_local_mode_object_ref_is_a_dask_collection(local_mode):
    ref = inc.remote(1)
    assert dask.compute(ref) == (2,)
    assert dask.delayed(plain_add)(ref, 1).compute() == 3
    x = da.ones((10,), chunks=5)
    assert x.map_blocks(add_offset, dask.delayed(ref), dtype=x.dtype).sum().compute() == 30


@daskray.remote
class _LocalCounter:
    def __init__(self, start, fail=False):
        if fail:
            raise ValueError("constructor-marker")
        self.n = start

    def add(self, k):
        self.n += k
        return self.n

    def pair(self):
        return self.n, -self.n

    async def later(self):
        return self.n * 10

    def boom(self):
        raise KeyError("method-marker")

    def quit(self):
        daskray.exit_actor()


@daskray.remote
def _bump(handle, k):
    return daskray.get(handle.add.remote(k))


@daskray.remote
class _Signal:
    """Ray's test pattern: wait() blocks until another call send()s."""

    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()
        return "released"

    async def send(self):
        self.event.set()


@pytest.mark.timeout(60)
def test_local_mode_actor_ends_with_its_last_handle_unless_named(local_mode):
    import gc
    import weakref

    sessions = daskray.api._runtime.session
    handle = _LocalCounter.remote(1)
    named = _LocalCounter.options(name="kept").remote(2)
    instance = weakref.ref(sessions.actors[handle._actor_id].instance)
    assert daskray.get(handle.add.remote(1)) == 2
    del handle
    gc.collect()
    assert instance() is None  # as on a cluster, where its process stops
    del named
    gc.collect()
    assert daskray.get(daskray.get_actor("kept").add.remote(1)) == 3


@pytest.mark.timeout(60)
def test_local_mode_async_actor_calls_share_one_loop_and_interleave(local_mode):
    signal = _Signal.remote()
    waiting = signal.wait.remote()
    ready, not_ready = daskray.wait([waiting], timeout=0.2)
    assert ready == [] and not_ready == [waiting]
    daskray.get(signal.send.remote())
    assert daskray.get(waiting, timeout=10) == "released"
    again = signal.wait.remote()  # the event is set: returns at once, on the same loop
    assert daskray.get(again, timeout=10) == "released"


@pytest.mark.timeout(60)
def test_local_mode_runs_actors_in_the_driver_in_call_order(local_mode):
    counter = _LocalCounter.options(name="counter").remote(5)
    refs = [counter.add.remote(1) for _ in range(3)]
    assert daskray.get(refs) == [6, 7, 8]
    assert daskray.get(_bump.remote(counter, 10)) == 18  # a handle passed to a task
    assert daskray.get(counter.later.remote()) == 180
    low, high = counter.pair.options(num_returns=2).remote()
    assert (daskray.get(low), daskray.get(high)) == (18, -18)
    assert daskray.get_actor("counter") == counter
    assert daskray.get(daskray.get_actor("counter").add.remote(0)) == 18
    with pytest.raises(KeyError, match="method-marker"):
        daskray.get(counter.boom.remote())
    assert counter.add(1) == 19  # a plain call, as a dask task makes it
    broken = _LocalCounter.remote(0, fail=True)
    with pytest.raises(daskray.ActorError, match="constructor-marker"):
        daskray.get(broken.add.remote(1))
    daskray.kill(counter)
    with pytest.raises(daskray.ActorDiedError, match="killed"):
        daskray.get(counter.add.remote(1))
    quitter = _LocalCounter.remote(0)
    with pytest.raises(daskray.ActorDiedError, match="exit_actor"):
        daskray.get(quitter.quit.remote())
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(quitter.add.remote(1))
    with pytest.raises(ValueError, match="no actor named"):
        daskray.get_actor("counter")


@daskray.remote
def _forty_two():
    return 42


@daskray.remote
def _echo(value):
    return value


@pytest.mark.timeout(60)
def test_an_own_ref_dropped_then_received_back_can_still_be_read(backend):
    import gc

    ref = _forty_two.remote()
    assert daskray.get(ref, timeout=20) == 42
    wrapped = _echo.remote([ref])  # a ref nested in a container stays a ref
    del ref
    gc.collect()
    (inner,) = daskray.get(wrapped, timeout=20)
    assert daskray.get(inner, timeout=20) == 42
