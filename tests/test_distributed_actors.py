"""Actors on the dask.distributed backend: order under load, handles in tasks and in
other actors, restarts after the actor's dask worker is killed (also every worker at
once, and with the call's task dying with the actor), max_task_retries, kill,
exit_actor, names from two callers, a detached actor outliving its driver, async
methods and max_concurrency, the end of an actor held by another, and what a gone
actor leaves on the scheduler.  tests/test_actors.py runs the rest on both backends."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import daskray
import daskray.distributed_backend.actors
from daskray.refs import dask_key_of
from helpers import NUM_WORKERS, mark_started, wait_for_path, wait_until

pytestmark = pytest.mark.timeout(120)


@daskray.remote
class Log:
    def __init__(self):
        self.seen = []

    def add(self, caller, i):
        self.seen.append((caller, i))
        return i

    def entries(self):
        return list(self.seen)


@daskray.remote
def add_from_task(log, caller, n):
    return daskray.get([log.add.remote(caller, i) for i in range(n)], timeout=60)


def test_each_callers_calls_run_in_submission_order_under_load(on_distributed):
    log = Log.remote()
    tasks = [add_from_task.remote(log, f"task{t}", 200) for t in range(2)]
    mine = [log.add.remote("driver", i) for i in range(200)]
    assert daskray.get(mine, timeout=60) == list(range(200))
    assert daskray.get(tasks, timeout=60) == [list(range(200))] * 2
    entries = daskray.get(log.entries.remote(), timeout=30)
    for caller in ("driver", "task0", "task1"):
        assert [i for c, i in entries if c == caller] == list(range(200)), caller


@daskray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def worker(self):
        return daskray.get_runtime_context().get_worker_id()

    def sleep(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return seconds

    def quit(self):
        daskray.exit_actor()


@daskray.remote
class Forwarder:
    def forward(self, counter, k):
        return daskray.get(counter.incr.remote(k), timeout=30)


@daskray.remote
def incr_in_task(counter, k):
    return daskray.get(counter.incr.remote(k), timeout=30)


def test_an_actor_is_called_from_a_task_and_from_another_actor(on_distributed):
    c = Counter.remote(0)
    f = Forwarder.remote()
    assert daskray.get(incr_in_task.remote(c, 2), timeout=30) == 2
    assert daskray.get(f.forward.remote(c, 3), timeout=30) == 5
    assert daskray.get(c.incr.remote(), timeout=30) == 6


def test_a_plain_method_call_in_a_dask_task_runs_on_the_actor(on_distributed):
    """``dask.delayed(handle.method)`` computed by distributed itself: the method
    called plainly inside a dask worker's task."""
    import dask

    c = Counter.remote(10)
    client = daskray.api._runtime.distributed.client
    assert client.compute(dask.delayed(c.incr)(5)).result(timeout=30) == 15
    assert c.incr(1) == 16


def _kill_actor_worker(handle):
    """SIGKILL the dask worker process the actor runs in (its nanny starts a new one)."""
    pid = daskray.get(handle.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_restart_after_its_worker_is_killed(on_distributed, tmp_path):
    c = Counter.options(max_restarts=1).remote(100)
    assert daskray.get(c.incr.remote(5), timeout=30) == 105
    pid = daskray.get(c.pid.remote(), timeout=30)
    in_flight = c.sleep.remote(60, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(daskray.ActorDiedError, match="max_task_retries"):
        daskray.get(in_flight, timeout=60)
    assert daskray.get(c.incr.remote(1), timeout=60) == 101  # the constructor ran again
    assert daskray.get(c.pid.remote(), timeout=30) != pid
    _kill_actor_worker(c)  # the one restart is used up
    with pytest.raises(daskray.ActorDiedError, match="max_restarts"):
        daskray.get(c.incr.remote(), timeout=60)


def test_a_call_made_while_no_dask_worker_is_up_runs_once_they_are_back(on_distributed):
    """Every dask worker killed at once, then a call: it waits for the workers the
    nannies start again, and the actor is made again there (a call's task must not be
    tied to workers that left: distributed never hands such a task to new ones)."""
    c = Counter.options(max_restarts=1).remote(100)
    assert daskray.get(c.incr.remote(5), timeout=30) == 105
    assert daskray.get(c.incr.remote(5), timeout=30) == 110
    client = daskray.api._runtime.distributed.client
    for pid in client.run(os.getpid).values():
        os.kill(pid, signal.SIGKILL)
    assert daskray.get(c.incr.remote(1), timeout=60) == 101  # the constructor ran again


def _wait_for_file(started: str, release: str) -> None:
    """A plain dask task holding its worker's one thread until ``release`` exists."""
    open(started, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_call_whose_task_dies_with_its_actor_is_not_run_again(on_distributed, tmp_path):
    """The call's task on the actor's own worker (the other worker kept busy): killing
    that worker kills both, and distributed runs the task again; with
    max_task_retries=0 the call must not run a second time."""
    client = daskray.api._runtime.distributed.client
    client.wait_for_workers(NUM_WORKERS, timeout=60)  # a test before may have killed some
    c = Counter.options(max_restarts=1).remote(0)
    actor_worker = daskray.get(c.worker.remote(), timeout=30)
    pid = daskray.get(c.pid.remote(), timeout=30)
    others = [w for w in client.scheduler_info(n_workers=-1)["workers"] if w != actor_worker]
    assert others, "the test needs a dask worker besides the actor's"
    started, release = tmp_path / "blocking", tmp_path / "release"
    blocker = client.submit(_wait_for_file, str(started), str(release), workers=others,
                            pure=False)
    try:
        wait_for_path(started)
        in_flight = c.sleep.remote(60, str(tmp_path / "running"))
        wait_for_path(tmp_path / "running")
    finally:
        release.touch()
    assert client.run_on_scheduler(_worker_of, dask_key_of(in_flight._key)) == actor_worker
    blocker.result(timeout=30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(daskray.ActorDiedError, match="max_task_retries"):
        daskray.get(in_flight, timeout=30)
    assert daskray.get(c.incr.remote(), timeout=60) == 1  # the constructor ran again


def _worker_of(key, dask_scheduler=None):
    """On the scheduler: the worker running the task ``key``."""
    return dask_scheduler.tasks[key].processing_on.address


def _scheduler_leftovers(dask_scheduler=None):
    """What the scheduler keeps by name for daskray: task metadata, and locks."""
    return (sorted(map(str, dask_scheduler.task_metadata)),
            sorted(dask_scheduler.extensions["semaphores"].leases))


def test_an_actor_that_is_gone_leaves_nothing_on_the_scheduler(on_distributed):
    """Restarts, a kill and calls record things on the scheduler (task metadata, the
    restart lock): all of it goes with the actor's and its calls' keys, but one lock."""
    client = daskray.api._runtime.distributed.client
    client.wait_for_workers(NUM_WORKERS, timeout=60)  # a test before may have killed some
    metadata_before, locks_before = client.run_on_scheduler(_scheduler_leftovers)
    c = Counter.options(max_restarts=1).remote(0)
    calls = [c.pid.remote(), c.incr.remote()]
    pid, n = daskray.get(calls, timeout=30)
    assert n == 1
    # the calls' keys gone before the kill: a result lost with its worker while still
    # wanted is computed again by distributed, its call run again
    keys = [dask_key_of(ref._key) for ref in calls]
    del calls
    assert wait_until(lambda: not any(client.run_on_scheduler(_scheduler_has, k)
                                      for k in keys), 10)
    os.kill(pid, signal.SIGKILL)
    assert daskray.get(c.incr.remote(), timeout=60) == 1  # restarted
    daskray.kill(c)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(c.incr.remote(), timeout=30)
    del c
    gc.collect()
    assert wait_until(  # (an entry of a test before may have gone meanwhile)
        lambda: set(client.run_on_scheduler(_scheduler_leftovers)[0]) <= set(metadata_before),
        10), client.run_on_scheduler(_scheduler_leftovers)
    locks = client.run_on_scheduler(_scheduler_leftovers)[1]
    assert set(locks) - set(locks_before) <= {daskray.distributed_backend.actors.RESTART_LOCK}


def test_no_restart_without_max_restarts(on_distributed):
    c = Counter.remote(0)
    _kill_actor_worker(c)
    with pytest.raises(daskray.ActorDiedError, match="max_restarts=0"):
        daskray.get(c.incr.remote(), timeout=60)


def test_max_task_retries_sends_the_call_in_flight_to_the_new_host(on_distributed, tmp_path):
    c = Counter.options(max_restarts=1, max_task_retries=1).remote(0)
    pid = daskray.get(c.pid.remote(), timeout=30)
    in_flight = c.sleep.remote(2, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    os.kill(pid, signal.SIGKILL)
    assert daskray.get(in_flight, timeout=60) == 2
    assert daskray.get(c.pid.remote(), timeout=30) != pid


def test_kill_fails_the_call_in_flight_and_later_calls(on_distributed, tmp_path):
    c = Counter.options(max_restarts=2).remote(0)
    in_flight = c.sleep.remote(60, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    start = time.monotonic()
    daskray.kill(c)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(in_flight, timeout=30)
    with pytest.raises(daskray.ActorDiedError, match="kill"):
        daskray.get(c.incr.remote(), timeout=30)
    assert time.monotonic() - start < 10


def test_exit_actor_ends_it_for_good(on_distributed):
    c = Counter.options(max_restarts=2).remote(0)
    assert daskray.get(c.incr.remote(), timeout=30) == 1
    with pytest.raises(daskray.ActorDiedError, match="exit_actor"):
        daskray.get(c.quit.remote(), timeout=30)
    with pytest.raises(daskray.ActorDiedError, match="exit_actor"):
        daskray.get(c.incr.remote(), timeout=30)
    with pytest.raises(TypeError, match="method of an actor"):
        daskray.exit_actor()


@daskray.remote
def make_or_get(name, start):
    c = Counter.options(name=name, get_if_exists=True).remote(start)
    return daskray.get(c.incr.remote(), timeout=30)


def test_named_actor_with_get_if_exists_from_two_callers(on_distributed):
    name = "dist-actors-shared"
    a = Counter.options(name=name, get_if_exists=True).remote(0)
    assert daskray.get(make_or_get.remote(name, 1000), timeout=30) == 1
    b = Counter.options(name=name, get_if_exists=True).remote(1000)
    assert b == a and daskray.get(b.incr.remote(), timeout=30) == 2
    assert daskray.get(daskray.get_actor(name).incr.remote(), timeout=30) == 3
    with pytest.raises(daskray.DaskrayError, match="exists already"):
        Counter.options(name=name).remote(0)
    daskray.kill(a)
    with pytest.raises(ValueError, match=name):
        daskray.get_actor(name)


@daskray.remote
class Holder:
    def store(self, handle):
        self.handle = handle
        return True


def _scheduler_has(key, dask_scheduler=None):
    return key in dask_scheduler.tasks


def test_an_actor_held_by_another_ends_with_it_with_no_cycle_collection(on_distributed):
    """With the workers' cycle collector off: nothing left of a call (its frames,
    kept by the exceptions distributed raises and daskray handles) may hold the
    handle it passed, or the actor would live on."""
    client = daskray.api._runtime.distributed.client
    client.run(gc.disable)
    try:
        c = Counter.remote(0)
        key = dask_key_of(c._creation._key)
        holder = Holder.remote()
        assert daskray.get(holder.store.remote(c), timeout=30)
        del c
        gc.collect()
        assert client.run_on_scheduler(_scheduler_has, key)  # the holder keeps it
        del holder
        gc.collect()
        assert wait_until(lambda: not client.run_on_scheduler(_scheduler_has, key), 10)
    finally:
        client.run(gc.enable)


DETACHED_DRIVER = """
import sys
import daskray

@daskray.remote
class Keeper:
    def __init__(self):
        self.value = "kept"

    def get(self):
        return self.value

daskray.init(address=sys.argv[1], namespace="dist-actors")  # another driver's names: Ray's
k = Keeper.options(name="dist-actors-detached", lifetime="detached").remote()
assert daskray.get(k.get.remote(), timeout=30) == "kept"
daskray.shutdown()
"""


def test_detached_actor_outlives_its_driver(on_distributed, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DETACHED_DRIVER)
    proc = subprocess.run([sys.executable, str(script), on_distributed.scheduler_address],
                          capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    keeper = daskray.get_actor("dist-actors-detached", namespace="dist-actors")
    assert daskray.get(keeper.get.remote(), timeout=30) == "kept"
    daskray.kill(keeper)
    with pytest.raises(ValueError):
        daskray.get_actor("dist-actors-detached", namespace="dist-actors")


@daskray.remote
class Meeting:
    """Calls meet at a barrier (threads) or an event (async): only possible if
    they run at the same time."""

    def __init__(self):
        self.barrier = threading.Barrier(2)

    def meet(self, timeout):
        try:
            self.barrier.wait(timeout)
            return True
        except threading.BrokenBarrierError:
            return False


@daskray.remote
class AsyncMeeting:
    def __init__(self):
        self.arrived = None

    async def meet(self, timeout):
        if self.arrived is None:
            self.arrived = asyncio.Event()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
                return "first"
            except asyncio.TimeoutError:
                return "alone"
        self.arrived.set()
        return "second"


def test_max_concurrency_two_runs_two_calls_at_once(on_distributed):
    a = Meeting.options(max_concurrency=2).remote()
    assert daskray.get([a.meet.remote(20), a.meet.remote(20)], timeout=60) == [True, True]
    one = Meeting.remote()
    assert daskray.get([one.meet.remote(0.5), one.meet.remote(0.5)], timeout=60) == \
        [False, False]


def test_async_methods_interleave(on_distributed):
    a = AsyncMeeting.remote()
    assert daskray.get([a.meet.remote(20), a.meet.remote(20)], timeout=60) == \
        ["first", "second"]
