"""Faults the runtime must survive: exceptions that do not pickle the usual way,
workers that keep dying.

Task functions live at module level so the workers can import them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import dask
import dask.array as da
import psutil
import pytest

import daskray
import daskray.api
from helpers import wait_until

pytestmark = pytest.mark.usefixtures("cluster")


# =========================================================================== tasks


def _recurse(n):
    return _recurse(n + 1)


@daskray.remote
def recurse_forever():
    import dask  # noqa: F401  - as any task may: it installs tblib's exception pickling

    return _recurse(0)


@daskray.remote
def raise_while_handling_an_unpicklable_error():
    import dask  # noqa: F401

    try:
        raise KeyError(threading.Lock())  # a lock does not pickle
    except KeyError:
        raise ValueError("raised while handling an unpicklable error")


class RefusesPickling(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


class CannotBeRebuilt(Exception):
    """Pickles, but unpickling calls ``__init__`` with one argument of two."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no text for this one")

    def __reduce__(self):
        raise TypeError("nor pickling")


@daskray.remote
def raise_it(kind):
    if kind == "refuses":
        raise RefusesPickling("refused-marker")
    if kind == "rebuilt":
        raise CannotBeRebuilt("rebuilt-marker", "why")
    raise UnprintableError()


def _run_a_dask_graph_first():
    """Workers that ran a dask graph have imported dask (and so tblib)."""
    import dask.array as da

    x = da.arange(40, chunks=5)
    assert int((x + 1).sum().compute()) == sum(range(1, 41))


# =========================================================================== exceptions


@pytest.mark.timeout(60)
def test_recursion_error_arrives_as_itself_after_a_dask_graph():
    _run_a_dask_graph_first()
    with pytest.raises(RecursionError) as info:
        daskray.get(recurse_forever.remote(), timeout=50)
    assert isinstance(info.value.__cause__, daskray.RemoteTraceback)
    assert "_recurse" in str(info.value.__cause__)


@pytest.mark.timeout(60)
def test_an_exception_whose_context_does_not_pickle_arrives_as_itself():
    _run_a_dask_graph_first()
    with pytest.raises(ValueError, match="raised while handling") as info:
        daskray.get(raise_while_handling_an_unpicklable_error.remote(), timeout=50)
    assert isinstance(info.value.__cause__, daskray.RemoteTraceback)
    assert "KeyError" in str(info.value.__cause__)  # the chain is in the text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, marker", [
    ("refuses", "RefusesPickling: refused-marker"),
    ("rebuilt", "CannotBeRebuilt: rebuilt-marker: why"),
    ("unprintable", "UnprintableError: <unprintable UnprintableError>"),
])
def test_an_exception_that_cannot_travel_arrives_as_a_task_error(kind, marker):
    with pytest.raises(daskray.TaskError) as info:
        daskray.get(raise_it.remote(kind), timeout=50)
    text = str(info.value)
    assert marker in text
    assert "could not be sent back" in text and "raise_it" in text  # the remote traceback


# =========================================================================== workers that keep dying


@daskray.remote(max_retries=5)
def crash_the_worker():
    os._exit(1)


@daskray.remote
def double(x):
    return 2 * x


def _task_workers() -> int:
    return int(daskray.cluster_resources().get("CPU", 0))


@pytest.mark.timeout(110)
def test_workers_that_keep_dying_are_replaced_after_a_backoff(restart_cluster):
    """3 calls x 6 attempts = 18 deaths in seconds, more than the replacements
    started at once: the next ones start after a (bounded) backoff, so the
    cluster gets its workers back and work submitted meanwhile runs."""
    daskray.shutdown()
    with dask.config.set({"daskray.worker-replacement-backoff-max": "3s"}):
        daskray.init(num_workers=2)
    for _ in range(3):  # one after the other: each uses all its 6 attempts
        with pytest.raises(daskray.WorkerCrashedError):
            daskray.get(crash_the_worker.remote(), timeout=60)
    deadline = time.monotonic() + 90
    # the last replacement waits out its 3 s backoff: what follows waits for it
    assert _task_workers() < 2, "every replacement started at once"
    x = da.arange(100, chunks=10)
    assert int((x * 2).sum().compute()) == 2 * sum(range(100))
    assert daskray.get(double.remote(21), timeout=max(1, deadline - time.monotonic())) == 42
    assert wait_until(lambda: _task_workers() == 2, max(1, deadline - time.monotonic())), (
        f"the cluster has {_task_workers()} workers, not 2")


@daskray.remote
def getpid():
    return os.getpid()


def _live_workers() -> set[int]:
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    alive = set()
    for proc in head.children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.add(proc.pid)
        except psutil.Error:
            pass
    return alive


@pytest.mark.timeout(110)
def test_workers_killed_after_doing_work_are_replaced_at_once_however_many(restart_cluster):
    """The backoff is for workers that die before they finish a single task (a
    crash loop); workers killed from outside after doing work (the OOM killer, a
    chaos test) are replaced at once, or the cluster would crawl."""
    daskray.shutdown()
    daskray.init(num_workers=2)
    waits = []
    for _ in range(18):  # past the deaths a minute whose replacements start at once
        pid = daskray.get(getpid.remote(), timeout=30)  # it finished a task
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_until(lambda: pid not in _live_workers() and len(_live_workers()) == 2
                          and _task_workers() == 2, 30), "no replacement within 30 s"
        waits.append(time.monotonic() - t0)
    assert max(waits) < 5, f"replacements waited {[round(w, 1) for w in waits]} s"


@pytest.mark.timeout(110)
def test_workers_killed_while_idle_or_starting_are_replaced_at_once_however_many(
        restart_cluster):
    """Killed from outside before they did any work, they are no crash loop
    either: each replacement starts at once (and is killed in turn)."""
    daskray.shutdown()
    daskray.init(num_workers=2)
    victim = min(_live_workers())  # idle: nothing was submitted
    waits = []
    for _ in range(18):
        before = _live_workers()
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_until(lambda: _live_workers() - before, 30), "no replacement within 30 s"
        waits.append(time.monotonic() - t0)
        victim = min(_live_workers() - before)  # the replacement, still starting
    assert max(waits) < 5, f"replacements waited {[round(w, 1) for w in waits]} s"
    assert wait_until(lambda: _task_workers() == 2, 30)
    assert daskray.get(double.remote(4), timeout=30) == 8


def test_the_replacement_backoff_doubles_up_to_its_cap():
    from daskray.runtime.supervision import REPLACEMENTS_AT_ONCE_PER_MINUTE, replacement_delay

    at_once = REPLACEMENTS_AT_ONCE_PER_MINUTE
    assert [replacement_delay(n, 30.0) for n in range(1, at_once + 1)] == [0.0] * at_once
    delays = [replacement_delay(at_once + k, 30.0) for k in range(1, 12)]
    assert 0 < delays[0] <= 0.5
    assert all(b == min(30.0, 2 * a) for a, b in zip(delays, delays[1:]))
    assert delays[-1] == 30.0 and replacement_delay(10_000, 30.0) == 30.0


def test_a_bad_replacement_backoff_setting_is_refused_with_its_name():
    from daskray.runtime.supervision import replacement_backoff_max

    with dask.config.set({"daskray.worker-replacement-backoff-max": "soon"}):
        with pytest.raises(ValueError, match="worker-replacement-backoff-max"):
            replacement_backoff_max()
    with dask.config.set({"daskray.worker-replacement-backoff-max": "1.5s"}):
        assert replacement_backoff_max() == 1.5
