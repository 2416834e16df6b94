"""daskray on a dask.distributed cluster: joining, remote calls, objects and their
lifetimes, nested calls, errors.  Tests that hold on both backends take the
``backend`` fixture and run on each."""

from __future__ import annotations

import numpy as np
import pytest

import daskray
from daskray import GetTimeoutError, TaskCancelledError

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
    from helpers import wait_for_path

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
