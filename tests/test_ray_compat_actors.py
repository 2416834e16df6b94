"""Ray actor code run by daskray as it is (issue 15, item 1, actors).

Each test runs on both backends (``backend``): async actors whose sync methods share the
event loop, ``__ray_ready__`` / ``__ray_terminate__``, ``__ray_shutdown__`` and atexit
handlers at the actor's graceful end, the decorated class's own attributes, ``async def``
remote functions, ``concurrency_groups``, and bad call arguments refused at ``.remote()``.
Actor classes live at module level so tracebacks show this file.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import sys
import threading
import time

import pytest

import daskray
from helpers import wait_until

pytestmark = pytest.mark.usefixtures("cluster")

#: how long a test waits for a call that should be done at once
WAIT = 30


# =========================================================================== async actors


@daskray.remote
class Signal:
    """Ray's pattern: a sync ``send()`` sets an ``asyncio.Event`` that ``wait()`` awaits."""

    def __init__(self):
        self.ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()  # the constructor runs on the loop too

    def send(self):
        self.ready.set()
        return threading.get_ident()

    async def wait(self):
        await self.ready.wait()
        return threading.get_ident()

    async def on_constructors_loop(self):
        return asyncio.get_running_loop() is self.loop


@pytest.mark.timeout(90)
def test_sync_method_of_async_actor_wakes_an_awaiting_method(backend):
    signal = Signal.remote()
    waiting = signal.wait.remote()
    ready, _ = daskray.wait([waiting], timeout=0.5)
    assert ready == []  # it awaits the event
    sent = daskray.get(signal.send.remote(), timeout=WAIT)
    woke = daskray.get(waiting, timeout=WAIT)  # hung before: set() off the loop's thread
    assert sent == woke  # both ran on the actor's event-loop thread
    assert daskray.get(signal.on_constructors_loop.remote(), timeout=WAIT) is True
    signal.__ray_terminate__.remote()  # on the loop's thread, like every call
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(signal.wait.remote(), timeout=WAIT)


# =========================================================================== Ray's own methods


@daskray.remote
class Counter:
    def __init__(self, start=0, path=None):
        self.value = start
        self.path = path

    def incr(self, by=1):
        self.value += by
        return self.value

    def slow_incr(self, delay):
        time.sleep(delay)
        return self.incr()

    def quit(self):
        daskray.exit_actor()

    def sys_exit(self):
        sys.exit(0)

    def register_atexit(self, text):
        atexit.register(_append, self.path, text)

    def __ray_shutdown__(self):
        _append(self.path, f"shutdown at {self.value}")


def _append(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def _lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.timeout(60)
def test_ray_ready_is_true_once_the_actor_is_constructed(backend):
    counter = Counter.remote(5)
    assert daskray.get(counter.__ray_ready__.remote(), timeout=WAIT) is True
    assert daskray.get(counter.incr.remote(), timeout=WAIT) == 6


@pytest.mark.timeout(90)
def test_ray_terminate_ends_the_actor_after_the_calls_before_it(backend, tmp_path):
    path = str(tmp_path / "log")
    counter = Counter.remote(0, path)
    before = [counter.slow_incr.remote(0.2) for _ in range(3)]
    counter.__ray_terminate__.remote()  # its ref dropped at once, as Ray code does
    assert daskray.get(before, timeout=WAIT) == [1, 2, 3]
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(counter.incr.remote(), timeout=WAIT)
    assert _lines(path) == ["shutdown at 3"]


@pytest.mark.timeout(90)
def test_exit_actor_runs_ray_shutdown_then_the_actors_atexit_handlers(backend, tmp_path):
    path = str(tmp_path / "log")
    counter = Counter.remote(7, path)
    daskray.get(counter.register_atexit.remote("atexit 1"), timeout=WAIT)
    daskray.get(counter.register_atexit.remote("atexit 2"), timeout=WAIT)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(counter.quit.remote(), timeout=WAIT)
    assert wait_until(lambda: len(_lines(path)) == 3, WAIT)
    assert _lines(path) == ["shutdown at 7", "atexit 2", "atexit 1"]  # atexit's order: last first


@pytest.mark.timeout(90)
def test_sys_exit_in_a_method_runs_the_shutdown_hooks_as_exit_actor_does(backend, tmp_path):
    path = str(tmp_path / "log")
    counter = Counter.remote(4, path)
    daskray.get(counter.register_atexit.remote("atexit"), timeout=WAIT)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(counter.sys_exit.remote(), timeout=WAIT)
    assert wait_until(lambda: len(_lines(path)) == 2, WAIT)
    assert _lines(path) == ["shutdown at 4", "atexit"]


@pytest.mark.timeout(90)
def test_kill_ends_the_actor_without_its_shutdown_hooks(backend, tmp_path):
    """Ray's ``kill`` is a forced end: no ``__ray_shutdown__``, no atexit handlers."""
    path = str(tmp_path / "log")
    counter = Counter.remote(1, path)
    daskray.get(counter.register_atexit.remote("atexit"), timeout=WAIT)
    daskray.kill(counter)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(counter.incr.remote(), timeout=WAIT)
    assert _lines(path) == []


@pytest.mark.timeout(90)
def test_actor_whose_last_handle_is_gone_runs_its_shutdown_hooks(on_distributed, tmp_path):
    """On the dask.distributed backend the host ends the actor in the worker's process,
    which lives on: the end is graceful.  (On daskray's own runtime the head stops the
    actor's process, as for ``kill``: see README, "Differences from Ray".)"""
    path = str(tmp_path / "log")
    counter = Counter.remote(3, path)
    daskray.get(counter.register_atexit.remote("atexit"), timeout=WAIT)
    del counter
    gc.collect()
    assert wait_until(lambda: len(_lines(path)) == 2, WAIT)
    assert _lines(path) == ["shutdown at 3", "atexit"]


@pytest.mark.timeout(60)
def test_ray_ready_and_ray_terminate_in_local_mode(restart_cluster):
    """Local mode (everything in the driver's process) has Ray's methods too."""
    daskray.shutdown()
    daskray.init(local_mode=True)
    counter = Counter.remote(2)
    assert daskray.get(counter.__ray_ready__.remote()) is True
    assert daskray.get(counter.incr.remote()) == 3
    counter.__ray_terminate__.remote()
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(counter.incr.remote())


# =========================================================================== the class itself


@daskray.remote
class WithClassAttributes:
    LIMIT = 42

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def limit_plus(cls, x):
        return cls.LIMIT + x

    def value(self):
        return self.LIMIT


@pytest.mark.timeout(60)
def test_class_attributes_and_static_methods_through_the_decorated_class(backend):
    assert WithClassAttributes.LIMIT == 42
    assert WithClassAttributes.double(4) == 8
    assert WithClassAttributes.limit_plus(1) == 43
    assert daskray.get(WithClassAttributes.remote().value.remote(), timeout=WAIT) == 42
    with pytest.raises(AttributeError):
        WithClassAttributes.NOT_THERE


# =========================================================================== async functions


@daskray.remote
async def async_add(x, y):
    await asyncio.sleep(0.01)
    return x + y


@pytest.mark.timeout(60)
def test_remote_async_function_ref_holds_the_coroutines_result(backend):
    assert daskray.get(async_add.remote(1, 2), timeout=WAIT) == 3
    assert daskray.get(async_add.options(name="add").remote(x=2, y=5), timeout=WAIT) == 7


# =========================================================================== concurrency groups


@daskray.remote(concurrency_groups={"io": 2, "compute": 1})
class Grouped:
    """``hold()`` calls (group io) stay until ``release()`` (group compute) lets them go."""

    def __init__(self):
        self.active = 0
        self.peak = 0
        self.changed = threading.Condition()
        self.released = threading.Event()

    @daskray.method(concurrency_group="io")
    def hold(self):
        with self.changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
        try:
            return self.released.wait(WAIT)
        finally:
            with self.changed:
                self.active -= 1

    @daskray.method(concurrency_group="compute")
    def release(self, expected):
        """Once ``expected`` holds run, look a moment for more (the limit broken), then
        let them go; the most seen at once."""
        with self.changed:
            self.changed.wait_for(lambda: self.active >= expected, WAIT)
            self.changed.wait_for(lambda: self.active > expected, 1.0)
            seen = self.active
        self.released.set()
        return seen

    def peak_seen(self):
        return self.peak


@pytest.mark.timeout(120)
def test_concurrency_groups_run_side_by_side_each_within_its_limit(backend):
    actor = Grouped.remote()
    holds = [actor.hold.remote() for _ in range(4)]
    # release() runs while io's calls wait: in another group (hangs without groups)
    assert daskray.get(actor.release.remote(2), timeout=WAIT) == 2
    assert daskray.get(holds, timeout=WAIT) == [True] * 4
    assert daskray.get(actor.peak_seen.remote(), timeout=WAIT) == 2


@pytest.mark.timeout(60)
def test_concurrency_group_chosen_per_call_and_unknown_group_refused(backend):
    actor = Grouped.remote()
    holds = [actor.hold.options(concurrency_group="compute").remote() for _ in range(2)]
    assert daskray.get(actor.release.options(concurrency_group="io").remote(1), timeout=WAIT) == 1
    assert daskray.get(holds, timeout=WAIT) == [True, True]
    assert daskray.get(actor.peak_seen.remote(), timeout=WAIT) == 1  # compute's limit is 1
    with pytest.raises(ValueError, match="no concurrency group 'gpu'"):
        actor.hold.options(concurrency_group="gpu").remote()
    with pytest.raises(ValueError, match="declares none"):
        Counter.remote().incr.options(concurrency_group="io").remote()


@daskray.remote(concurrency_groups={"io": 2, "compute": 1})
class AsyncGrouped:
    """Ray's example of groups: an async actor, whose groups limit its coroutines."""

    def __init__(self):
        self.active = 0
        self.peak = 0
        self.changed = asyncio.Condition()
        self.released = asyncio.Event()

    @daskray.method(concurrency_group="io")
    async def hold(self):
        async with self.changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
        try:
            await asyncio.wait_for(self.released.wait(), WAIT)
            return True
        finally:
            self.active -= 1

    @daskray.method(concurrency_group="compute")
    async def release(self, expected):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.active >= expected), WAIT)
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.active > expected), 1.0)
            except asyncio.TimeoutError:
                pass
            seen = self.active
        self.released.set()
        return seen

    def peak_seen(self):
        return self.peak


@pytest.mark.timeout(120)
def test_concurrency_groups_of_an_async_actor_limit_its_coroutines(backend):
    actor = AsyncGrouped.remote()
    holds = [actor.hold.remote() for _ in range(4)]
    assert daskray.get(actor.release.remote(2), timeout=WAIT) == 2
    assert daskray.get(holds, timeout=WAIT) == [True] * 4
    assert daskray.get(actor.peak_seen.remote(), timeout=WAIT) == 2


# =========================================================================== bad arguments


@daskray.remote
def one_argument(a):
    return a


@pytest.mark.timeout(60)
def test_bad_arguments_raise_type_error_at_remote(backend):
    with pytest.raises(TypeError, match="one_argument"):
        one_argument.remote(1, 2, 3)
    with pytest.raises(TypeError, match="one_argument"):
        one_argument.remote(b=1)
    with pytest.raises(TypeError, match="Counter"):
        Counter.remote(1, 2, 3)
    counter = Counter.remote()
    with pytest.raises(TypeError, match="Counter.incr"):
        counter.incr.remote(1, 2)
    with pytest.raises(TypeError, match="__ray_ready__"):
        counter.__ray_ready__.remote(1)
    assert daskray.get(one_argument.remote(a=4), timeout=WAIT) == 4
    assert daskray.get(counter.incr.remote(by=2), timeout=WAIT) == 2


# =========================================================================== decorator edge cases


def test_remote_with_empty_parentheses_is_refused_as_in_ray():
    with pytest.raises(TypeError, match="no parentheses"):
        @daskray.remote()
        class Empty:
            pass
    with pytest.raises(TypeError, match="no parentheses"):
        @daskray.remote()
        def empty():
            pass


def test_subclassing_an_actor_class_says_it_is_not_supported():
    @daskray.remote
    class Base:
        pass

    with pytest.raises(TypeError, match="inheriting from actor class Base is not supported"):
        class Derived(Base):
            pass
