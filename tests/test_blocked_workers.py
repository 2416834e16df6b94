"""Tasks waiting in ``get()``/``wait()`` never deadlock the cluster (issue: hardening).

A task that waits for objects keeps its worker's stack; its worker runs what the
task waits for on top of it, and an extra worker process stands in for it when
other ready work needs a CPU.  Whoever submitted the producers (the driver, other
tasks) and in whatever order, every run below must finish with the right values
within its timeout, on 1, 2 and 4 workers.  Recursion through ``.remote()`` and
``get()`` goes at least 200 levels deep, and past ``daskray.max-nesting-depth``
the innermost call raises ``NestingLimitError``.

Every test starts a cluster of its own (a stalled run must not leave the shared
one stuck); ``restart_cluster`` leaves the shared one running afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading

import dask
import numpy as np
import psutil
import pytest

import daskray
import daskray.api
from daskray.errors import NestingLimitError
from helpers import wait_until


@pytest.fixture
def start(restart_cluster):
    """``start(num_workers, config={...}, **init_kwargs)``: a cluster of one's own,
    its workers started with the dask ``config`` given."""
    def start_cluster(num_workers: int, config: dict | None = None, **kwargs):
        daskray.shutdown()
        with dask.config.set(config or {}):
            daskray.init(num_workers=num_workers, **kwargs)
    yield start_cluster


def worker_processes() -> int:
    """How many worker processes (actors' included) the head runs now."""
    count = 0
    for proc in psutil.Process(daskray.api._runtime.cluster.head.pid).children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "start_worker" in " ".join(proc.cmdline()):
                count += 1
        except psutil.Error:  # gone meanwhile
            pass
    return count


# =========================================================================== recursion


@daskray.remote
def depth(n):
    return 0 if n == 0 else 1 + daskray.get(depth.remote(n - 1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_recursion_200_calls_deep_finishes(start, num_workers):
    start(num_workers)
    assert depth.remote(200).get(timeout=60) == 200
    assert depth.remote(250).get(timeout=60) == 250


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_recursion_past_the_limit_raises_nesting_limit_error_in_the_driver(start, num_workers):
    start(num_workers, config={"daskray.max-nesting-depth": 20})
    assert depth.remote(19).get(timeout=30) == 19  # 20 calls: the limit itself is fine
    with pytest.raises(NestingLimitError) as info:
        depth.remote(40).get(timeout=30)
    message = str(info.value)
    assert "21 calls deep" in message and "daskray.max-nesting-depth = 20" in message
    assert isinstance(info.value, daskray.DaskrayError)
    assert depth.remote(5).get(timeout=30) == 5  # the cluster goes on


@pytest.mark.timeout(120)
def test_past_the_default_limit_the_error_comes_back_through_every_level_in_time(start):
    start(1)
    assert depth.remote(999).get(timeout=60) == 999  # 1000 calls deep: the default limit
    with pytest.raises(NestingLimitError, match="past daskray.max-nesting-depth = 1000"):
        depth.remote(1200).get(timeout=60)  # 1000 levels re-raise it, each a traceback


# =========================================================================== producers queued


@daskray.remote
class Gate:
    """Opened by a task once it runs: what waits on the gate becomes ready then."""

    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()
        return 0.0

    async def open(self):
        self.event.set()


@daskray.remote
class Relay:
    """Reads a ref for its caller: the caller waits on an actor call, which its
    worker cannot run on its own stack."""

    def fetch(self, box):
        return daskray.get(box[0])


@daskray.remote
def make_big():
    return np.ones(1 << 18)  # 2 MiB: stays on its worker, so readers are queued there


@daskray.remote
def total(arr, offset):
    return float(arr.sum()) + offset


@daskray.remote
def total_where(arr, offset):
    return float(arr.sum()) + offset, os.getpid(), daskray.cluster_resources()


@daskray.remote
def open_and_get(gate, box):
    gate.open.remote()
    return daskray.get(box[0])


@daskray.remote
def open_and_ask(gate, relay, box):
    gate.open.remote()
    return daskray.get(relay.fetch.remote(box)), os.getpid()


@pytest.mark.timeout(60)
def test_a_producer_queued_on_the_waiting_worker_runs_on_top_of_the_waiting_task(start):
    # no extra worker: the one worker itself must run what its task waits for
    start(1, config={"daskray.max-extra-workers": 0})
    big = make_big.remote()
    daskray.wait([big], timeout=30)
    gate = Gate.remote()
    # ready once the gate opens, queued then on the worker holding ``big``,
    # whose task waits for it already
    produced = total.remote(big, gate.wait.remote())
    assert open_and_get.remote(gate, [produced]).get(timeout=30) == float(1 << 18)


@pytest.mark.timeout(60)
def test_work_a_waiting_worker_cannot_run_goes_to_an_extra_worker_that_then_retires(start):
    start(1)
    big = make_big.remote()
    daskray.wait([big], timeout=30)
    gate, relay = Gate.remote(), Relay.remote()
    produced = total_where.remote(big, gate.wait.remote())
    value, waiter_pid = open_and_ask.remote(gate, relay, [produced]).get(timeout=30)
    result, producer_pid, resources = value
    assert result == float(1 << 18)
    assert producer_pid != waiter_pid  # an extra worker ran it
    assert resources["CPU"] == 1.0  # and does not count as the cluster's
    assert daskray.cluster_resources()["CPU"] == 1.0
    assert wait_until(lambda: not psutil.pid_exists(producer_pid), timeout=20)
    assert total.remote(big, 1.0).get(timeout=30) == float(1 << 18) + 1


@pytest.mark.timeout(60)
def test_an_extra_worker_has_the_resources_of_the_worker_it_stands_in_for(start):
    start(2, resources=[{"pin": 1}, {}])
    pinned = {"resources": {"pin": 1}}
    big = make_big.options(**pinned).remote()
    daskray.wait([big], timeout=30)
    gate, relay = Gate.remote(), Relay.remote()
    # only a worker with "pin" may run it: the pinned one waits, the other has none
    produced = total_where.options(**pinned).remote(big, gate.wait.remote())
    value, waiter_pid = open_and_ask.options(**pinned).remote(gate, relay, [produced]).get(
        timeout=30)
    result, producer_pid, resources = value
    assert result == float(1 << 18) and producer_pid != waiter_pid
    assert resources == daskray.cluster_resources()  # the extra one is not counted
    assert resources["pin"] == 1.0 and resources["CPU"] == 2.0


# =========================================================================== ml


@daskray.remote
def passed(shard, _opened):
    return shard


def _search(train, valid):
    from daskray.ml import ASHAScheduler, Trainer, TuneConfig, models, tune

    return Trainer(config=TuneConfig(num_samples=8, seed=3, scheduler=ASHAScheduler(max_t=3)),
                   model=models.SoftmaxRegression, train_config={"epochs": 3, "batch_size": 32},
                   param_space={"lr": tune.loguniform(1e-3, 1.0)}).fit(train, valid=valid).grid


@pytest.mark.timeout(120)
def test_a_search_started_while_its_shards_are_still_being_made_finishes(start):
    """The segment tasks of a Trainer search read the shards with get(): here
    both workers wait in them before the shards' last tasks can run, and those
    are queued on the workers holding their inputs."""
    from daskray.ml import Dataset, Standardization

    start(2)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8000, 16))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    train, valid = Dataset.from_numpy(X, y, num_shards=4, seed=0).train_test_split(0.25, seed=0)
    train, stats = train.standardize()
    valid, _ = valid.standardize(stats)
    expected = _search(train, valid)  # all shards made already
    gate = Gate.remote()
    opened = gate.wait.remote()
    # the same rows again, made once the gate opens: a task copies each shard (a
    # large result, kept on its worker), another one "standardizes" it there
    held = Dataset([passed.remote(shard, opened) for shard in train.shards], train.sizes,
                   train.n_features, train.classes)
    same = Standardization(np.zeros(train.n_features), np.ones(train.n_features))
    gated, _ = held.standardize(same)

    both_busy = []

    def open_once_the_search_runs():  # both workers busy: in its segment tasks
        both_busy.append(wait_until(
            lambda: daskray.available_resources().get("CPU", 0.0) == 0, timeout=60))
        gate.open.remote()

    opener = threading.Thread(target=open_once_the_search_runs, daemon=True)
    opener.start()
    grid = _search(gated, valid)
    opener.join(timeout=60)
    assert both_busy == [True]  # the gate opened while both workers ran segments
    assert [r.config for r in grid] == [r.config for r in expected]
    for got, want in zip(grid, expected):
        assert got.metrics_dataframe.drop(columns="time_total_s").equals(
            want.metrics_dataframe.drop(columns="time_total_s"))
        assert all(np.array_equal(got.checkpoint.params[k], want.checkpoint.params[k])
                   for k in want.checkpoint.params)


# =========================================================================== random DAGs


@daskray.remote
def node_task(j, handles, style):
    """Node ``j``: ``j`` plus the values of its inputs, read with get() (or wait()
    then get()) from the handles given inside a list."""
    refs = [resolve(h) for h in handles]
    if style == "wait" and refs:
        ready, _ = daskray.wait(refs, num_returns=len(refs))
        assert len(ready) == len(refs)
    return j + sum(daskray.get(refs)) if refs else j


@daskray.remote
def publish(specs, first):
    """Submit node tasks, after waiting for node handle ``first`` (if any): the
    producers of nodes exist only once this task has run."""
    if first is not None:
        daskray.get(resolve(first))
    return [node_task.remote(j, handles, style) for j, handles, style in specs]


def resolve(handle):
    """The ref of a node: ("ref", ref), or ("box", ref of a publish task, index)."""
    if handle[0] == "ref":
        return handle[1]
    return daskray.get(handle[1])[handle[2]]


def random_dag(rng: random.Random, n: int) -> tuple[list[list[int]], list[int]]:
    """Inputs of each node (earlier nodes) and the value each node must have."""
    inputs = [sorted(rng.sample(range(j), k=min(j, rng.randint(0, 3)))) for j in range(n)]
    values: list[int] = []
    for j in range(n):
        values.append(j + sum(values[d] for d in inputs[j]))
    return inputs, values


def submit_dag(rng: random.Random, inputs: list[list[int]]) -> dict:
    """Submit every node, in a random order that has each node's inputs before it:
    some from the driver, some from publish tasks that submit them only after
    waiting for another node.  The handle of each node."""
    n = len(inputs)
    handles: dict[int, tuple] = {}
    pending = list(range(n))
    while pending:
        free = [j for j in pending if all(d in handles for d in inputs[j])]
        group = rng.sample(free, k=min(len(free), rng.randint(1, 3)))
        specs = [(j, [handles[d] for d in inputs[j]], rng.choice(["get", "wait"]))
                 for j in group]
        if rng.random() < 0.5:
            for j, hs, style in specs:
                handles[j] = ("ref", node_task.remote(j, hs, style))
        else:
            first = handles[rng.choice(list(handles))] if handles and rng.random() < 0.7 else None
            box = publish.remote(specs, first)
            for i, (j, _, _) in enumerate(specs):
                handles[j] = ("box", box, i)
        pending = [j for j in pending if j not in group]
    return handles


def values_of(handles: dict) -> list:
    refs = [resolve(handles[j]) for j in range(len(handles))]
    return daskray.get(refs, timeout=60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_random_dags_of_tasks_waiting_for_each_other_finish(start, num_workers):
    start(num_workers)
    for seed in range(4):
        rng = random.Random(1000 * num_workers + seed)
        inputs, expected = random_dag(rng, 16)
        handles = submit_dag(rng, inputs)
        assert values_of(handles) == expected, seed
    # the extra workers go once nothing waits any more
    assert wait_until(lambda: worker_processes() == num_workers, timeout=20)
