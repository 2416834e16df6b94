"""Actors on a real daskray cluster (issue 5).

``@daskray.remote`` classes and ``daskray.Actor`` subclasses, handles, ordered
method calls that depend on tasks and that tasks depend on, actor methods in
dask graphs, handles passed to tasks and other actors, the actor options
(``max_concurrency``, ``async def`` methods, ``name`` / ``get_if_exists`` /
``get_actor``, ``lifetime="detached"``, ``max_restarts``, ``max_task_retries``),
``kill``, the end of an actor with its last handle, ``ActorPool`` and the errors
(a method raising, a constructor raising, a dead actor).

The tests of what actors do run on both backends (``backend``: the session's
two-worker ``cluster``, then a two-worker dask.distributed cluster); those of how the
local runtime does it (actor processes, its object store) run on it alone and say why.
Actor classes and task functions live at module level so tracebacks show this file.
Tests that kill or wait on processes measure how long the failure took to arrive.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
import threading
import time

import dask
import psutil
import pytest

import daskray
from helpers import mark_started, running_backend, wait_for_path, wait_until
import daskray.api
from daskray.refs import dask_key_of

pytestmark = pytest.mark.usefixtures("cluster")

#: "quickly, not after a timeout": a dead actor's calls must fail within this
QUICK = 5.0


# =========================================================================== helpers


def _head_children():
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    return {p.pid for p in head.children()
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(scope="module", autouse=True)
def no_actor_outlives_this_module(cluster):
    """The cluster is shared with other test files, which count the head's
    children: actor processes started here (and leaked by a daskray bug) are
    stopped when the module ends."""
    if running_backend() != "local":  # only this file's tests on dask were chosen
        yield
        return
    before = _head_children()
    yield
    if running_backend() != "local":
        return  # the tests switched to dask: the cluster watched here stopped, with its processes
    gc.collect()
    extra = lambda: _head_children() - before  # noqa: E731
    if not wait_until(lambda: not extra(), 5):
        for pid in extra():
            kill_if_alive(pid)
        wait_until(lambda: not extra(), 5)




def gone(pid):
    """The process ``pid`` has exited (a zombie not yet reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _scheduler_has(key, dask_scheduler=None):
    return key in dask_scheduler.tasks


def ended(backend, pid, key):
    """The actor is gone: its process exited (local runtime), or the dask scheduler
    forgot its key ``key`` (dask.distributed, where it lives in a dask worker's
    process, which stays)."""
    if backend == "local":
        return gone(pid)
    return not daskray.api._runtime.distributed.client.run_on_scheduler(_scheduler_has, key)


def actor_key(handle):
    return dask_key_of(handle._creation._key)


def kill_if_alive(pid):
    """Clean up an actor process a test started (a daskray bug may have leaked it)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def timed_raises(exc_type, fn):
    """Run ``fn``, expect ``exc_type``; return (exception info, seconds taken)."""
    start = time.monotonic()
    with pytest.raises(exc_type) as info:
        fn()
    return info, time.monotonic() - start


# =========================================================================== tasks


@daskray.remote
def getpid_slow():
    time.sleep(0.2)
    return os.getpid()


@daskray.remote
def slow_value(x, delay, started=None):
    mark_started(started)
    time.sleep(delay)
    return x


@daskray.remote
def add(x, y):
    return x + y


@daskray.remote
def call_incr_in_task(handle, k):
    """A task given a handle: calls the actor and waits for the result."""
    return daskray.get(handle.incr.remote(k))


@daskray.remote
def call_incr_in_task_nested(handles, k):
    """A task given handles inside a container."""
    return [daskray.get(h.incr.remote(k)) for h in handles]


# =========================================================================== actors
#
# Decorated in place at module level, as the issue spells it (the worker gets the
# class by value: ``test_actors.Counter`` names the ActorClass, not the class).


class CustomError(Exception):
    pass


@daskray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.init_pid = os.getpid()

    def incr(self, k=1):
        self.n += k
        return self.n

    def value(self):
        return self.n

    def pid(self):
        return os.getpid()

    def init_pid_(self):
        return self.init_pid

    def sleep(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return seconds

    def sleep_then_pid(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return os.getpid()

    def fail(self, message):
        raise CustomError(message)

    def fail_value(self, message):
        raise ValueError(message)

    def pair(self):
        return self.n, -self.n


@daskray.remote
class Recorder:
    def __init__(self):
        self.log = []

    def append(self, x):
        self.log.append(x)
        return len(self.log)

    def get_log(self):
        return list(self.log)


@daskray.remote
class Caller:
    """An actor that is handed another actor's handle and calls it."""

    def __init__(self):
        self.stored = None

    def call_incr(self, handle, k):
        return daskray.get(handle.incr.remote(k))

    def store(self, handle):
        self.stored = handle
        return True

    def call_stored(self, k):
        return daskray.get(self.stored.incr.remote(k))


@daskray.remote
class Broken:
    def __init__(self, x):
        raise RuntimeError(f"constructor-broken-{x}")

    def method(self):
        return "never"


@daskray.remote(max_restarts=1)
class Restartable:
    def __init__(self, start=0):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def sleep(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return seconds


@daskray.remote(max_restarts=1, max_task_retries=1)
class Retrying:
    def __init__(self):
        self.n = 0

    def pid(self):
        return os.getpid()

    def sleep_then_pid(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return os.getpid()


class BarrierActor:
    """Two calls meet at a barrier: only possible if they run at the same time.
    Made an actor in the tests with different ``max_concurrency`` options."""

    def __init__(self):
        self.barrier = threading.Barrier(2)

    def meet(self, timeout):
        try:
            self.barrier.wait(timeout)
            return True
        except threading.BrokenBarrierError:
            return False

    def ping(self):
        return "pong"

    def pid(self):
        return os.getpid()

    def sleep(self, seconds, started=None):
        mark_started(started)
        time.sleep(seconds)
        return seconds


@daskray.remote
class AsyncActor:
    def __init__(self):
        self.running = 0
        self.peak = 0

    async def work(self, seconds):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(seconds)
        self.running -= 1
        return seconds

    async def get_peak(self):
        return self.peak

    def ping(self):
        return "pong"


@daskray.remote
class Doubler:
    def double(self, v):
        return 2 * v

    def slow_double(self, v):
        time.sleep(0.02 * (10 - v % 10))
        return 2 * v

    def pid(self):
        return os.getpid()


class MyActor(daskray.Actor):
    """The seed's spelling."""

    def __init__(self, value):
        self.value = value

    @daskray.remote
    def add(self, x, y):
        return self.value + x + y

    @daskray.remote
    def pid(self):
        return os.getpid()


# =========================================================================== ordering


@pytest.mark.timeout(60)
def test_decorated_class_inside_a_function(backend):
    @daskray.remote
    class Local:
        def __init__(self, start):
            self.n = start

        def incr(self):
            self.n += 1
            return self.n

    c = Local.remote(5)
    assert daskray.get([c.incr.remote() for _ in range(3)]) == [6, 7, 8]


@pytest.mark.timeout(60)
def test_issue_example_counter_and_dask_delayed(backend):
    c = Counter.remote(5)
    assert isinstance(c, daskray.ActorHandle)
    assert daskray.get([c.incr.remote() for _ in range(3)]) == [6, 7, 8]
    assert dask.delayed(c.incr)(10).compute() == 18
    assert daskray.get(c.value.remote()) == 18


@pytest.mark.timeout(60)
def test_thousand_calls_from_one_handle_return_in_submission_order(backend):
    rec = Recorder.remote()
    refs = [rec.append.remote(i) for i in range(1000)]
    assert daskray.get(refs) == list(range(1, 1001))
    assert daskray.get(rec.get_log.remote()) == list(range(1000))


@pytest.mark.timeout(60)
def test_calls_with_slow_objectref_args_still_run_in_submission_order(backend):
    rec = Recorder.remote()
    daskray.get(rec.get_log.remote())  # the actor is up
    start = time.monotonic()
    refs = [
        rec.append.remote(slow_value.remote("a", 0.6)),
        rec.append.remote("b"),
        rec.append.remote(slow_value.remote("c", 0.3)),
        rec.append.remote("d"),
        rec.append.remote(x=slow_value.remote("e", 0.1)),
    ]
    assert daskray.get(refs) == [1, 2, 3, 4, 5]
    assert time.monotonic() - start >= 0.6  # "b" really waited behind the slow "a"
    assert daskray.get(rec.get_log.remote()) == ["a", "b", "c", "d", "e"]


@pytest.mark.timeout(60)
def test_constructor_arguments_may_be_objectrefs(backend):
    c = Counter.remote(slow_value.remote(40, 0.3))
    assert daskray.get(c.incr.remote(2)) == 42
    d = Counter.remote(start=daskray.put(100))
    assert daskray.get(d.incr.remote()) == 101
    e = Counter.remote(add.remote(1, 2))
    assert daskray.get(e.value.remote()) == 3


@pytest.mark.timeout(60)
def test_handle_is_returned_at_once_while_constructor_args_are_pending(backend):
    start = time.monotonic()
    c = Counter.remote(slow_value.remote(1, 1.0))
    assert time.monotonic() - start < 0.5
    assert daskray.get(c.value.remote()) == 1


# =========================================================================== graph


@pytest.mark.timeout(60)
def test_dask_delayed_actor_method(backend):
    c = Counter.remote(0)
    assert dask.delayed(c.incr)(10).compute() == 10
    # inside a bigger graph, its input from another delayed task
    total = dask.delayed(sum)([dask.delayed(c.incr)(dask.delayed(lambda: 5)()), 100])
    assert total.compute() == 115
    assert daskray.get(c.value.remote()) == 15


@pytest.mark.timeout(60)
def test_plain_method_call_runs_on_the_actor_and_waits(backend):
    c = Counter.remote(1)
    assert c.incr(2) == 3
    assert c.pid() != os.getpid()


@pytest.mark.timeout(60)
def test_actor_result_feeds_a_task_and_task_result_feeds_an_actor(backend):
    c = Counter.remote(10)
    from_actor = c.incr.remote(5)  # 15
    assert daskray.get(add.remote(from_actor, 100)) == 115
    from_task = add.remote(1, 2)
    assert daskray.get(c.incr.remote(from_task)) == 18
    # a chain task -> actor -> task -> actor
    chained = c.incr.remote(add.remote(c.incr.remote(0), 0))  # 18 + 18
    assert daskray.get(chained) == 36


@pytest.mark.timeout(60)
def test_method_with_num_returns(backend):
    c = Counter.remote(3)
    a, b = c.pair.options(num_returns=2).remote()
    assert daskray.get([a, b]) == [3, -3]


@pytest.mark.timeout(60)
def test_objectref_get_method_on_actor_result(backend):
    c = Counter.remote(1)
    assert c.incr.remote(1).get() == 2


# =========================================================================== handles


@pytest.mark.timeout(60)
def test_handle_passed_to_a_task_calls_the_same_instance(backend):
    c = Counter.remote(0)
    assert daskray.get(call_incr_in_task.remote(c, 5)) == 5
    assert daskray.get(call_incr_in_task_nested.remote([c, c], 1)) == [6, 7]
    assert daskray.get(c.value.remote()) == 7


@pytest.mark.timeout(60)
def test_handle_passed_to_another_actor_calls_the_same_instance(backend):
    c = Counter.remote(0)
    caller = Caller.remote()
    assert daskray.get(caller.call_incr.remote(c, 3)) == 3
    assert daskray.get(c.incr.remote(1)) == 4
    assert daskray.get(caller.store.remote(c))
    assert daskray.get(caller.call_stored.remote(10)) == 14
    assert daskray.get(c.value.remote()) == 14
    # the caller's copy of the handle would keep c running after the test (see
    # test_actor_ends_when_the_actor_holding_its_last_handle_ends)
    daskray.kill(c)


@pytest.mark.timeout(60)
def test_handle_pickles_and_compares_by_actor(backend):
    c = Counter.remote(0)
    copy = pickle.loads(pickle.dumps(c))
    assert copy == c and hash(copy) == hash(c)
    assert daskray.get(copy.incr.remote()) == 1
    assert daskray.get(c.incr.remote()) == 2
    assert Counter.remote(0) != c


@pytest.mark.timeout(60)
def test_unknown_method_is_an_attribute_error(backend):
    c = Counter.remote(0)
    with pytest.raises(AttributeError, match="no_such_method"):
        c.no_such_method.remote()


# =========================================================================== processes


@pytest.mark.timeout(60)
def test_actor_runs_in_its_own_process():
    """Local only: on the dask.distributed backend an actor lives in a dask worker's
    process, in threads of its own there (README, "More than one machine")."""
    worker_pids = set(daskray.get([getpid_slow.remote() for _ in range(8)]))
    a, b = Counter.remote(0), Counter.remote(0)
    pid_a, pid_b = daskray.get([a.pid.remote(), b.pid.remote()])
    assert pid_a != os.getpid() and pid_b != os.getpid()
    assert pid_a not in worker_pids and pid_b not in worker_pids
    assert pid_a != pid_b
    # the constructor ran there too
    assert daskray.get(a.init_pid_.remote()) == pid_a
    # and it stays the same process
    assert daskray.get([a.pid.remote() for _ in range(5)]) == [pid_a] * 5


# =========================================================================== errors


@pytest.mark.timeout(60)
def test_method_raising_fails_that_call_and_actor_lives_on(backend):
    c = Counter.remote(0)
    assert daskray.get(c.incr.remote()) == 1
    bad = c.fail.remote("boom-123")
    after = c.incr.remote()
    with pytest.raises(CustomError, match="boom-123"):
        daskray.get(bad)
    assert daskray.get(after) == 2  # state kept, same process
    with pytest.raises(ValueError, match="bad value"):
        daskray.get(c.fail_value.remote("bad value"))
    assert daskray.get(c.incr.remote()) == 3


@pytest.mark.timeout(60)
def test_method_exception_carries_remote_traceback(backend):
    c = Counter.remote(0)
    with pytest.raises(CustomError) as info:
        daskray.get(c.fail.remote("tb-check"))
    assert "fail" in str(info.value.__cause__)


@pytest.mark.timeout(60)
def test_constructor_raising_makes_every_call_raise_actor_error_with_traceback(backend):
    b = Broken.remote("xyz")
    for _ in range(2):
        info, elapsed = timed_raises(daskray.ActorError, lambda: daskray.get(b.method.remote()))
        text = str(info.value)
        assert "constructor-broken-xyz" in text
        assert "RuntimeError" in text
        assert "Traceback (most recent call last)" in text
        assert "__init__" in text
        assert elapsed < QUICK


# =========================================================================== death


@pytest.mark.timeout(60)
def test_sigkill_fails_the_call_in_flight_and_later_calls_quickly(backend, tmp_path):
    c = Counter.remote(0)
    pid = daskray.get(c.pid.remote())
    in_flight = c.sleep.remote(30, str(tmp_path / "running"))
    queued = c.incr.remote()
    wait_for_path(tmp_path / "running")
    os.kill(pid, signal.SIGKILL)
    _, elapsed = timed_raises(daskray.ActorDiedError, lambda: daskray.get(in_flight, timeout=20))
    assert elapsed < QUICK
    _, elapsed = timed_raises(daskray.ActorDiedError, lambda: daskray.get(queued, timeout=20))
    assert elapsed < QUICK
    for _ in range(2):
        _, elapsed = timed_raises(daskray.ActorDiedError,
                                  lambda: daskray.get(c.incr.remote(), timeout=20))
        assert elapsed < QUICK
    assert wait_until(lambda: gone(pid), 5)


@pytest.mark.timeout(60)
def test_max_restarts_next_call_works_on_a_new_process(backend, tmp_path):
    r = Restartable.remote(100)
    pid = daskray.get(r.pid.remote())
    assert daskray.get(r.incr.remote(5)) == 105
    in_flight = r.sleep.remote(30, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    os.kill(pid, signal.SIGKILL)
    # max_task_retries is 0: the call in flight is not retried
    _, elapsed = timed_raises(daskray.ActorDiedError, lambda: daskray.get(in_flight, timeout=20))
    assert elapsed < QUICK
    start = time.monotonic()
    new_pid = daskray.get(r.pid.remote(), timeout=20)
    assert time.monotonic() - start < 10
    assert new_pid != pid
    assert gone(pid)
    # the constructor ran again, with its original arguments: state reset
    assert daskray.get(r.incr.remote(1)) == 101
    # the one restart is used up: the next death is final
    os.kill(new_pid, signal.SIGKILL)
    _, elapsed = timed_raises(daskray.ActorDiedError,
                              lambda: daskray.get(r.incr.remote(), timeout=20))
    assert elapsed < QUICK + 1


@pytest.mark.timeout(60)
def test_max_task_retries_retries_the_call_in_flight_on_the_new_process(backend, tmp_path):
    r = Retrying.remote()
    pid = daskray.get(r.pid.remote())
    in_flight = r.sleep_then_pid.remote(1.0, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    os.kill(pid, signal.SIGKILL)
    new_pid = daskray.get(in_flight, timeout=30)
    assert new_pid != pid
    assert daskray.get(r.pid.remote()) == new_pid


@pytest.mark.timeout(60)
def test_kill_fails_later_calls_quickly_and_ends_the_process(backend, tmp_path):
    c = Counter.remote(0)
    pid = daskray.get(c.pid.remote())
    in_flight = c.sleep.remote(30, str(tmp_path / "running"))
    wait_for_path(tmp_path / "running")
    daskray.kill(c)
    _, elapsed = timed_raises(daskray.ActorDiedError, lambda: daskray.get(in_flight, timeout=20))
    assert elapsed < QUICK
    _, elapsed = timed_raises(daskray.ActorDiedError,
                              lambda: daskray.get(c.incr.remote(), timeout=20))
    assert elapsed < QUICK
    if backend == "local":  # on dask the process is a dask worker's, which stays
        assert wait_until(lambda: gone(pid), 5)


@pytest.mark.timeout(60)
def test_kill_does_not_restart_an_actor_with_max_restarts(backend):
    r = Restartable.remote(0)
    pid = daskray.get(r.pid.remote())
    daskray.kill(r)
    _, elapsed = timed_raises(daskray.ActorDiedError,
                              lambda: daskray.get(r.incr.remote(), timeout=20))
    assert elapsed < QUICK
    if backend == "local":  # on dask the process is a dask worker's, which stays
        assert wait_until(lambda: gone(pid), 5)


def test_kill_rejects_a_non_handle():
    with pytest.raises(TypeError):
        daskray.kill("not a handle")


# =========================================================================== lifetime


@pytest.mark.timeout(60)
def test_actor_ends_when_its_last_handle_is_gone(backend):
    c = Counter.remote(0)
    pid, key = daskray.get(c.pid.remote()), actor_key(c)
    assert psutil.pid_exists(pid)
    del c
    gc.collect()
    assert wait_until(lambda: ended(backend, pid, key), 5)


@pytest.mark.timeout(60)
def test_actor_held_by_another_actor_outlives_the_drivers_handle(backend):
    c = Counter.remote(0)
    pid, key = daskray.get(c.pid.remote()), actor_key(c)
    holder = Caller.remote()
    try:
        assert daskray.get(holder.store.remote(c))
        del c
        gc.collect()
        time.sleep(1.5)
        assert not ended(backend, pid, key)
        assert daskray.get(holder.call_stored.remote(2)) == 2
    finally:
        daskray.kill(holder)
        if backend == "local":  # on dask the process is a dask worker's
            kill_if_alive(pid)  # see the next test: the holder's death does not end it


@pytest.mark.timeout(60)
def test_actor_ends_when_the_actor_holding_its_last_handle_ends(backend):
    c = Counter.remote(0)
    pid, key = daskray.get(c.pid.remote()), actor_key(c)
    holder = Caller.remote()
    try:
        assert daskray.get(holder.store.remote(c))
        del c
        gc.collect()
        time.sleep(0.5)
        assert not ended(backend, pid, key)  # the holder keeps it alive
        del holder  # the holder ends with its last handle ...
        gc.collect()
        assert wait_until(lambda: ended(backend, pid, key), 8)  # ... and with it c's last
    finally:
        if backend == "local":  # on dask the process is a dask worker's
            kill_if_alive(pid)


@pytest.mark.timeout(60)
def test_named_actor_survives_its_handles_and_get_actor_finds_it(backend):
    c = Counter.options(name="test-actors-survivor").remote(7)
    pid, key = daskray.get(c.pid.remote()), actor_key(c)
    del c
    gc.collect()
    time.sleep(1.5)
    assert not ended(backend, pid, key)
    again = daskray.get_actor("test-actors-survivor")
    assert isinstance(again, daskray.ActorHandle)
    assert daskray.get(again.incr.remote()) == 8
    assert daskray.get(again.pid.remote()) == pid
    daskray.kill(again)
    if backend == "local":  # on dask the process is a dask worker's, which stays
        assert wait_until(lambda: gone(pid), 5)
    with pytest.raises(ValueError):
        daskray.get_actor("test-actors-survivor")


def test_get_actor_of_unknown_name_is_a_value_error(backend):
    with pytest.raises(ValueError, match="no-such-actor"):
        daskray.get_actor("no-such-actor")


@pytest.mark.timeout(60)
def test_detached_actor_survives_its_handles(backend):
    c = Counter.options(lifetime="detached").remote(0)
    pid, key, copy = daskray.get(c.pid.remote()), actor_key(c), pickle.dumps(c)
    del c
    gc.collect()
    time.sleep(1.5)
    try:
        assert not ended(backend, pid, key)
    finally:
        if backend == "local":
            os.kill(pid, signal.SIGKILL)  # no handle left to kill it with
        else:  # its process is a dask worker's: end the actor through a handle again
            daskray.kill(pickle.loads(copy))


@pytest.mark.timeout(60)
def test_get_if_exists_returns_the_existing_actor(backend):
    opts = dict(name="test-actors-shared", get_if_exists=True)
    a = Counter.options(**opts).remote(1)
    assert daskray.get(a.incr.remote()) == 2
    b = Counter.options(**opts).remote(100)
    assert b == a
    assert daskray.get(b.incr.remote()) == 3
    assert daskray.get(a.pid.remote()) == daskray.get(b.pid.remote())
    daskray.kill(a)


@pytest.mark.timeout(60)
def test_get_if_exists_in_the_decorator(backend):
    @daskray.remote(name="test-actors-decorated", get_if_exists=True)
    class Single:
        def __init__(self):
            self.calls = 0

        def call(self):
            self.calls += 1
            return self.calls

    a = Single.remote()
    assert daskray.get(a.call.remote()) == 1
    b = Single.remote()
    assert daskray.get(b.call.remote()) == 2
    daskray.kill(a)


# =========================================================================== concurrency


class SlowStart:
    def __init__(self):
        time.sleep(0.5)
        self.ready = "constructed"

    def state(self):
        return self.ready


@pytest.mark.timeout(60)
@pytest.mark.parametrize("concurrency", [2, None])  # None: async class, default 1000
def test_concurrent_actor_first_call_waits_for_its_constructor(backend, concurrency):
    if concurrency is None:
        class AsyncSlowStart(SlowStart):
            async def astate(self):
                return self.ready

        cls = daskray.remote(AsyncSlowStart)
    else:
        cls = daskray.remote(max_concurrency=concurrency)(SlowStart)
    a = cls.remote()
    assert daskray.get(a.state.remote(), timeout=30) == "constructed"



@pytest.mark.timeout(60)
def test_max_concurrency_two_lets_two_calls_meet_at_a_barrier(backend):
    a = daskray.remote(max_concurrency=2)(BarrierActor).remote()
    assert daskray.get(a.ping.remote()) == "pong"
    assert daskray.get([a.meet.remote(10), a.meet.remote(10)], timeout=30) == [True, True]


@pytest.mark.timeout(60)
def test_max_concurrency_one_runs_calls_one_at_a_time(backend):
    a = daskray.remote(BarrierActor).remote()
    assert daskray.get(a.ping.remote()) == "pong"
    # one at a time: the first call waits alone and times out
    assert daskray.get([a.meet.remote(1.0), a.meet.remote(1.0)], timeout=30) == [False, False]


@pytest.mark.timeout(60)
def test_async_methods_run_concurrently(backend):
    a = AsyncActor.remote()
    assert daskray.get(a.ping.remote()) == "pong"
    start = time.monotonic()
    assert daskray.get([a.work.remote(0.3) for _ in range(10)]) == [0.3] * 10
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, f"10 async calls of 0.3 s took {elapsed:.2f} s"
    assert daskray.get(a.get_peak.remote()) > 1


@daskray.remote
def make_block(i):
    import numpy as np

    return np.full(300_000, float(i))  # 2.4 MB: held by the worker that made it


class Coordinator:
    """Calls tasks from its methods' own threads (made with max_concurrency > 1)."""

    def __init__(self, barrier_parties):
        self.barrier = threading.Barrier(barrier_parties)

    def fan_out(self, xs, meet):
        if meet:  # the calls run at the same time, each waiting on its own tasks
            self.barrier.wait(20)
        return daskray.get([add.remote(x, x) for x in xs], timeout=30)

    def sum_blocks(self, refs):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:  # helper threads of the call's thread
            blocks = list(pool.map(lambda r: daskray.get(r, timeout=30), refs))
        return float(sum(b.sum() for b in blocks))

    def put_and_use(self):
        import numpy as np

        ref = daskray.put(np.ones(200_000))
        ready, _ = daskray.wait([add.remote(ref, 1)], timeout=30)
        return float(daskray.get(ready[0], timeout=30).sum())


@daskray.remote
class AwaitingActor:
    async def total(self, xs):
        refs = [add.remote(x, 1) for x in xs]
        first = await refs[0]
        rest = await asyncio.gather(*refs[1:])
        return first + sum(rest)


@pytest.mark.timeout(90)
def test_a_threaded_actor_calls_tasks_from_its_calls_threads(backend):
    c = daskray.remote(max_concurrency=4)(Coordinator).remote(2)
    both = [c.fan_out.remote([1, 2, 3], True), c.fan_out.remote([10, 20], True)]
    assert daskray.get(both, timeout=60) == [[2, 4, 6], [20, 40]]
    blocks = [make_block.remote(i) for i in range(6)]  # some live on another worker
    assert daskray.get(c.sum_blocks.remote(blocks), timeout=60) == sum(
        i * 300_000.0 for i in range(6))
    assert daskray.get(c.put_and_use.remote(), timeout=60) == 400_000.0


FORWARDER_SCRIPT = """
import daskray

@daskray.remote
def add(a, b):
    return a + b

class Forwarder:
    def __init__(self):
        self.pending = []

    def forward(self, refs):
        self.pending.append(add.remote(refs[0], 1))  # keeps the result, drops the input
        return 1

    def collect(self):
        out = []
        for ref in self.pending:
            try:
                out.append(daskray.get(ref, timeout=20))
            except daskray.ObjectLostError:
                out.append("lost")
        return out

daskray.init(num_workers=2)
f = daskray.remote(max_concurrency=4)(Forwarder).remote()
for i in range(10):
    daskray.get(f.forward.remote([add.remote(i, 0)]), timeout=30)
print(daskray.get(f.collect.remote(), timeout=60))
daskray.shutdown()
"""


@pytest.mark.timeout(120)
def test_what_a_threaded_actors_call_sends_reaches_the_head_before_its_finish(backend):
    # the call's finish releases its pin on refs[0]: the submission made in the
    # call must be known to the head by then, or refs[0] is freed under it.  A
    # script of its own: the race shows with a fresh cluster and __main__ functions
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FORWARDER_SCRIPT], capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str([i + 1 for i in range(10)])


@daskray.remote
class Nested:
    def __init__(self):
        self.me = None

    def set_me(self, handle):
        self.me = handle

    async def inner(self):
        return await add.remote(1, 1)

    async def outer(self):
        return await self.me.inner.remote()


@pytest.mark.timeout(90)
def test_many_concurrent_awaits_in_an_async_actor_do_not_starve_each_other(backend):
    # each await holds a thread while it waits: more than asyncio's default
    # executor has (cores + 4), waiting on calls that need threads too
    a = Nested.remote()
    daskray.get(a.set_me.remote(a), timeout=30)
    assert daskray.get([a.outer.remote() for _ in range(16)], timeout=60) == [2] * 16


@pytest.mark.timeout(60)
def test_an_async_actor_with_max_concurrency_one_awaits_refs_one_call_at_a_time(backend):
    a = AwaitingActor.options(max_concurrency=1).remote()
    assert daskray.get([a.total.remote([1, 2]), a.total.remote([3])], timeout=30) == [5, 4]


class Putter:
    def put_and_drop(self, n):
        import numpy as np

        for _ in range(n):
            daskray.put(np.ones(200_000))  # 1.6 MB in shared memory; its ref dropped at once
        return n


@pytest.mark.timeout(90)
def test_objects_a_threaded_actor_puts_and_drops_are_freed():
    """Local only: it counts the objects in daskray's object store, which a
    dask.distributed cluster has not (its objects are the dask workers')."""
    before = daskray.object_store_stats()["objects"]
    putter = daskray.remote(max_concurrency=4)(Putter).remote()
    for _ in range(5):  # the drop of a put's ref must not overtake the put itself
        assert daskray.get([putter.put_and_drop.remote(4) for _ in range(2)],
                           timeout=60) == [4, 4]
    assert wait_until(lambda: daskray.object_store_stats()["objects"] == before, 10), (
        daskray.object_store_stats(), before)


@pytest.mark.timeout(60)
def test_an_async_actor_awaits_object_refs(backend):
    a = AwaitingActor.remote()
    assert daskray.get(a.total.remote([1, 2, 3, 4]), timeout=30) == 14


@daskray.remote(max_restarts=2)
class Quitter:
    def ping(self):
        return "pong"

    def quit(self):
        daskray.exit_actor()
        return "not reached"

    @daskray.method(num_returns=2)
    def pair(self):
        return "a", "b"


@daskray.remote
def runtime_ids():
    ctx = daskray.get_runtime_context()
    return ctx.get_worker_id(), ctx.get_actor_id(), ctx.get_task_id(), ctx.get_job_id()


@daskray.remote
class WhoAmI:
    def ids(self):
        ctx = daskray.get_runtime_context()
        return ctx.get_worker_id(), ctx.get_actor_id(), ctx.get_task_id()


@pytest.mark.timeout(60)
def test_the_runtime_context_names_the_worker_actor_and_task(backend):
    driver = daskray.get_runtime_context()
    assert driver.get_job_id() and driver.get_worker_id() is None
    assert driver.get_actor_id() is None
    assert driver.get_node_id() == {"local": "local", "distributed": "driver"}[backend]
    worker, actor, task, job = daskray.get(runtime_ids.remote(), timeout=30)
    assert worker and actor is None and task and job is None
    a, b = WhoAmI.remote(), WhoAmI.remote()
    ids_a, ids_b = daskray.get([a.ids.remote(), b.ids.remote()], timeout=30)
    assert ids_a[1] and ids_b[1] and ids_a[1] != ids_b[1]  # each actor its own id
    assert ids_a[0] != ids_b[0] and ids_a[2] != ids_b[2]


@pytest.mark.timeout(60)
def test_method_defaults_and_exit_actor_as_in_ray(backend):
    q = Quitter.remote()
    first, second = q.pair.remote()  # num_returns=2 from @daskray.method
    assert daskray.get([first, second], timeout=30) == ["a", "b"]
    assert daskray.get(q.ping.remote(), timeout=30) == "pong"
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(q.quit.remote(), timeout=30)
    with pytest.raises(daskray.ActorDiedError):  # gone for good, max_restarts or not
        daskray.get(q.ping.remote(), timeout=30)
    with pytest.raises(TypeError, match="method of an actor"):
        daskray.exit_actor()


# =========================================================================== ActorPool


@pytest.mark.timeout(60)
def test_actor_pool_map_is_ordered(backend):
    pool = daskray.ActorPool([Doubler.remote(), Doubler.remote()])
    out = list(pool.map(lambda a, v: a.slow_double.remote(v), range(10)))
    assert out == [2 * v for v in range(10)]


@pytest.mark.timeout(60)
def test_actor_pool_map_unordered_gives_every_result(backend):
    pool = daskray.ActorPool([Doubler.remote(), Doubler.remote()])
    out = list(pool.map_unordered(lambda a, v: a.slow_double.remote(v), range(10)))
    assert sorted(out) == [2 * v for v in range(10)]
    assert len(out) == 10


@pytest.mark.timeout(60)
def test_actor_pool_uses_every_actor(backend):
    actors = [Doubler.remote(), Doubler.remote()]
    pids = set(daskray.get([a.pid.remote() for a in actors]))
    pool = daskray.ActorPool(actors)
    seen = set(pool.map(lambda a, v: a.pid.remote(), range(6)))
    assert seen == pids


@pytest.mark.timeout(60)
def test_actor_pool_submit_get_next(backend):
    pool = daskray.ActorPool([Doubler.remote(), Doubler.remote()])
    assert not pool.has_next()
    for v in (1, 2, 3):
        pool.submit(lambda a, v: a.slow_double.remote(v), v)
    assert pool.has_next()
    assert [pool.get_next(), pool.get_next(), pool.get_next()] == [2, 4, 6]
    assert not pool.has_next()
    for v in (4, 5, 6):
        pool.submit(lambda a, v: a.double.remote(v), v)
    got = {pool.get_next_unordered() for _ in range(3)}
    assert got == {8, 10, 12}
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()


# =========================================================================== spellings


@pytest.mark.timeout(60)
def test_seed_spelling_actor_base_class_and_create(backend):
    actor = MyActor.create(value=5)
    assert isinstance(actor, daskray.ActorHandle)
    assert actor.add.remote(2, 3).get() == 10
    assert daskray.get(actor.pid.remote()) != os.getpid()


@pytest.mark.timeout(60)
def test_import_daskray_as_ray_style(backend):
    import daskray as ray

    @ray.remote
    class Accumulator:
        def __init__(self):
            self.total = 0

        def add(self, x):
            self.total += x
            return self.total

    @ray.remote
    def square(x):
        return x * x

    acc = Accumulator.remote()
    refs = [acc.add.remote(square.remote(i)) for i in range(5)]
    assert ray.get(refs) == [0, 1, 5, 14, 30]
    ready, not_ready = ray.wait(refs, num_returns=5, timeout=10)
    assert len(ready) == 5 and not not_ready
    ray.kill(acc)
    with pytest.raises(ray.ActorDiedError):
        ray.get(acc.add.remote(1), timeout=20)


@pytest.mark.timeout(60)
def test_options_num_cpus_and_resources_are_accepted(backend):
    if backend == "local":  # on dask, num_cpus=2 asks for a resource CPU=2 that the
        # test cluster's workers do not declare (test_distributed_backend checks the error)
        c = Counter.options(num_cpus=2).remote(1)
        assert daskray.get(c.incr.remote()) == 2
    d = Counter.options(num_cpus=1, resources={}).remote(0)
    assert daskray.get(d.incr.remote()) == 1


def test_calling_the_actor_class_directly_is_a_type_error():
    with pytest.raises(TypeError, match=r"\.remote"):
        Counter()
    with pytest.raises(TypeError, match=r"\.remote"):
        Counter(5)


@pytest.mark.parametrize("options", [
    {"max_restarts": "1"},
    {"max_restarts": -2},
    {"max_task_retries": 1.5},
    {"max_concurrency": 0},
    {"lifetime": "forever"},
    {"name": ""},
    {"get_if_exists": "yes"},
    {"num_cpus": -1},
    {"no_such_option": 1},
    {"num_returns": 2},  # a task option, not an actor one
    {"max_retries": 3},
])
def test_invalid_actor_option_is_a_value_error_at_decoration(options):
    with pytest.raises(ValueError):
        @daskray.remote(**options)
        class Bad:
            pass


def test_invalid_options_on_class_and_method_are_value_errors():
    with pytest.raises(ValueError):
        Counter.options(max_concurrency=-1)
    with pytest.raises(ValueError):
        Counter.options(bogus=True)
    # method options are checked before anything is sent
    handle = daskray.ActorHandle("no-actor", "Counter", ["incr"], None)
    with pytest.raises(ValueError):
        handle.incr.options(num_cpus=2)
    with pytest.raises(ValueError):
        handle.incr.options(num_returns=0)


# =========================================================================== more edges


@daskray.remote
def explode(x):
    raise KeyError(f"explode-{x}")


@daskray.remote
def lookup_and_call(name, k):
    """A task that finds a named actor by name and calls it."""
    return daskray.get(daskray.get_actor(name).incr.remote(k))


@pytest.mark.timeout(60)
def test_call_on_a_temporary_handle_keeps_the_actor_alive_until_it_ran(backend):
    ref = Counter.remote(1).incr.remote()
    gc.collect()
    assert daskray.get(ref, timeout=20) == 2


@pytest.mark.timeout(60)
def test_call_whose_objectref_argument_failed_raises_that_error_and_later_calls_run(backend):
    rec = Recorder.remote()
    bad = rec.append.remote(explode.remote(1))
    good = rec.append.remote("after")
    with pytest.raises(KeyError, match="explode-1"):
        daskray.get(bad, timeout=20)
    assert daskray.get(good, timeout=20) == 1
    assert daskray.get(rec.get_log.remote()) == ["after"]


@pytest.mark.timeout(60)
def test_calls_waiting_on_arguments_fail_quickly_when_the_actor_dies(tmp_path):
    """Local only: on dask.distributed the call's task may run on the actor's worker
    and die with it; distributed runs it again when a worker thread is free, here (one
    thread per worker) after the argument's task.  The next test runs on both."""
    c = Counter.remote(0)
    pid = daskray.get(c.pid.remote())
    waiting = c.incr.remote(slow_value.remote(1, 3.0, str(tmp_path / "argument")))
    wait_for_path(tmp_path / "argument")  # the call now waits on a running task
    os.kill(pid, signal.SIGKILL)
    _, elapsed = timed_raises(daskray.ActorDiedError, lambda: daskray.get(waiting, timeout=20))
    assert elapsed < 2.5  # not after its argument arrived


class Gate:
    """Its ``wait`` returns once ``open`` was called: a result that is not ready
    until the test says so, with no worker thread held meanwhile."""

    def __init__(self):
        self.event = threading.Event()

    def wait(self, value):
        return value if self.event.wait(30) else "gate never opened"

    def open(self):
        self.event.set()

    def pid(self):
        return os.getpid()


@pytest.mark.timeout(60)
def test_a_call_waiting_on_another_actors_result_fails_quickly_when_its_actor_dies(backend):
    c = Counter.remote(0)
    pid = daskray.get(c.pid.remote())
    # a gate in another process than c's (on dask, c's worker: it would die with c)
    gates = [daskray.remote(max_concurrency=2)(Gate).remote() for _ in range(4)]
    pids = daskray.get([g.pid.remote() for g in gates], timeout=30)
    assert set(pids) - {pid}, "no actor landed on a worker other than the first actor's"
    gate = gates[pids.index(next(p for p in pids if p != pid))]
    del gates
    waiting = c.incr.remote(gate.wait.remote(1))
    os.kill(pid, signal.SIGKILL)
    try:
        _, elapsed = timed_raises(daskray.ActorDiedError,
                                  lambda: daskray.get(waiting, timeout=20))
        assert elapsed < QUICK  # not when its argument is there
    finally:
        gate.open.remote()
    assert daskray.get(gate.wait.remote(2), timeout=20) == 2  # the gate lives on


@daskray.remote
class Held:
    """``hold`` keeps the actor's one thread until the test creates ``release``."""

    def __init__(self):
        self.log = []

    def hold(self, started, release):
        mark_started(started)
        return "held" if wait_until(lambda: os.path.exists(release), 30) else "never released"

    def add(self, x):
        self.log.append(x)
        return list(self.log)


@pytest.mark.timeout(60)
def test_cancel_of_a_queued_actor_call_skips_it_and_later_calls_still_run(backend, tmp_path):
    h = Held.remote()
    held = h.hold.remote(str(tmp_path / "started"), str(tmp_path / "release"))
    wait_for_path(tmp_path / "started")
    queued = h.add.remote("cancelled")
    later = h.add.remote("later")
    try:
        daskray.cancel(queued)
    finally:
        (tmp_path / "release").touch()
    with pytest.raises(daskray.TaskCancelledError):
        daskray.get(queued, timeout=20)
    assert daskray.get(later, timeout=20) == ["later"]
    assert daskray.get(held, timeout=20) == "held"
    assert daskray.get(h.add.remote("last"), timeout=20) == ["later", "last"]


@pytest.mark.timeout(60)
def test_calls_waiting_on_arguments_run_on_the_restarted_process(backend, tmp_path):
    r = Restartable.remote(0)
    pid = daskray.get(r.pid.remote())
    waiting = r.incr.remote(slow_value.remote(5, 1.5, str(tmp_path / "argument")))
    wait_for_path(tmp_path / "argument")  # the call now waits on a running task
    os.kill(pid, signal.SIGKILL)
    assert daskray.get(waiting, timeout=30) == 5
    assert daskray.get(r.pid.remote()) != pid


@pytest.mark.timeout(60)
def test_sigkill_of_a_concurrent_actor_fails_every_call_in_flight(backend, tmp_path):
    a = daskray.remote(max_concurrency=4)(BarrierActor).remote()
    assert daskray.get(a.ping.remote()) == "pong"
    pid = daskray.get(a.pid.remote())
    calls = [a.sleep.remote(30, str(tmp_path / f"running{i}")) for i in range(3)]
    for i in range(3):  # all three run at once
        wait_for_path(tmp_path / f"running{i}")
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    for ref in calls:
        with pytest.raises(daskray.ActorDiedError):
            daskray.get(ref, timeout=20)
    assert time.monotonic() - start < QUICK
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(a.ping.remote(), timeout=20)


@pytest.mark.timeout(60)
def test_named_actor_found_from_a_task_and_name_reusable_after_kill(backend):
    c = Counter.options(name="test-actors-lookup").remote(0)
    assert daskray.get(lookup_and_call.remote("test-actors-lookup", 4)) == 4
    assert daskray.get(c.value.remote()) == 4
    daskray.kill(c)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(c.value.remote(), timeout=20)
    d = Counter.options(name="test-actors-lookup").remote(100)
    assert daskray.get(daskray.get_actor("test-actors-lookup").incr.remote()) == 101
    daskray.kill(d)


@pytest.mark.timeout(60)
def test_task_calling_a_dead_actor_gets_actor_died_error(backend):
    c = Counter.remote(0)
    daskray.kill(c)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(c.incr.remote(), timeout=20)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(call_incr_in_task.remote(c, 1), timeout=20)


@pytest.mark.timeout(60)
def test_kill_while_the_constructor_waits_for_its_arguments(backend):
    c = Counter.remote(slow_value.remote(1, 1.0))
    daskray.kill(c)
    _, elapsed = timed_raises(daskray.ActorDiedError,
                              lambda: daskray.get(c.incr.remote(), timeout=20))
    assert elapsed < QUICK


@daskray.remote
def _plus_one(x):
    return x + 1


@daskray.remote
class _Delegating:
    def m(self, x):
        return daskray.get(_plus_one.remote(x))


@pytest.mark.timeout(60)
def test_an_actor_method_waiting_in_get_keeps_the_calls_queued_behind_it(backend):
    a = _Delegating.remote()
    assert daskray.get([a.m.remote(i) for i in range(5)], timeout=30) == [1, 2, 3, 4, 5]
