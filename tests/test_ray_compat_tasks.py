"""Ray's semantics of tasks, as a program written for Ray (``import daskray as ray``)
expects them: ``get`` of a list fails fast, ``wait([])``, ``sys.exit()`` in a task,
and ``cancel`` (its dependents, ``recursive``, ``force``, the ``KeyboardInterrupt`` a
running task sees).  Every test runs on daskray's own runtime and on the
dask.distributed backend."""

from __future__ import annotations

import os
import sys
import time

import pytest

import daskray
from daskray.errors import DaskrayError, TaskCancelledError, TaskError
from helpers import wait_for_path

pytestmark = pytest.mark.timeout(120)


@daskray.remote
def inc(x):
    return x + 1


@daskray.remote
def getpid():
    return os.getpid()


@daskray.remote
def fail(message):
    raise ValueError(message)


@daskray.remote
def wait_for_gate(gate, seconds, started=None):
    """Wait (in short sleeps, so a cancel can stop it) until ``gate`` exists or
    ``seconds`` passed; "opened" or "timed out"."""
    if started is not None:
        open(started, "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(gate):
            return "opened"
        time.sleep(0.02)
    return "timed out"


@daskray.remote
def exits(code):
    sys.exit(code)


@daskray.remote
def raises_system_exit(message):
    raise SystemExit(message)


def release(gate, *refs):
    """Let the tasks waiting on ``gate`` end, and wait for them (they must not
    hold a worker into the next test)."""
    open(gate, "w").close()
    for ref in refs:
        try:
            ref.get(timeout=30)
        except DaskrayError:
            pass


# =========================================================================== wait


def test_wait_of_no_refs_returns_two_empty_lists(backend):
    assert daskray.wait([]) == ([], [])
    assert daskray.wait([], timeout=0.1) == ([], [])
    assert daskray.wait([], num_returns=0) == ([], [])


# =========================================================================== get


@pytest.mark.parametrize("timeout", [None, 30])
def test_get_of_a_list_raises_the_first_failure_without_waiting_for_the_others(
        backend, tmp_path, timeout):
    gate = str(tmp_path / "gate")
    slow = wait_for_gate.remote(gate, 60)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match="boom"):
            daskray.get([slow, fail.remote("boom")], timeout=timeout)
        assert time.monotonic() - start < 5
    finally:
        release(gate, slow)
    assert slow.get(timeout=30) == "opened"  # the sibling was left to run


def test_get_of_a_list_raises_the_failure_of_an_earlier_ref_first(backend):
    refs = [inc.remote(1), fail.remote("first"), fail.remote("second")]
    daskray.wait(refs, num_returns=3, timeout=30)
    with pytest.raises(ValueError, match="first"):
        daskray.get(refs, timeout=30)


# =========================================================================== sys.exit


@pytest.mark.parametrize("task, code", [(exits, 3), (raises_system_exit, "bye")])
def test_sys_exit_in_a_task_arrives_as_a_task_error_and_the_worker_lives(backend, task, code):
    pids = set(daskray.get([getpid.remote() for _ in range(8)], timeout=30))
    with pytest.raises(TaskError) as info:
        task.remote(code).get(timeout=30)
    assert isinstance(info.value, DaskrayError)
    assert isinstance(info.value.__cause__, SystemExit)
    assert info.value.__cause__.code == code
    assert info.value.type_name == "SystemExit"
    assert "SystemExit" in str(info.value) and "lives on" in str(info.value)
    # the same processes serve the next tasks: none was replaced
    later = set(daskray.get([getpid.remote() for _ in range(8)], timeout=30))
    assert later <= pids
    # a dependent fails with the same error
    with pytest.raises(TaskError):
        inc.remote(task.remote(code)).get(timeout=30)
