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
from helpers import NUM_WORKERS, wait_for_path, wait_until

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


# =========================================================================== cancel


@daskray.remote
def guarded(gate, started, outcome, seconds=60):
    """``wait_for_gate``, writing to ``outcome`` how it ended: "opened", "timed out",
    or "KeyboardInterrupt" (re-raised) when a cancel interrupted it."""
    try:
        result = wait_for_gate_here(gate, seconds, started)
    except KeyboardInterrupt:
        with open(outcome, "w") as f:
            f.write("KeyboardInterrupt")
        raise
    with open(outcome, "w") as f:
        f.write(result)
    return result


def wait_for_gate_here(gate, seconds, started):
    open(started, "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(gate):
            return "opened"
        time.sleep(0.02)
    return "timed out"


@daskray.remote
def get_first(refs, started):
    """Wait in ``get`` for the ref inside ``refs`` (a ref it did not start)."""
    open(started, "w").close()
    return daskray.get(refs[0])


@daskray.remote
def starts_and_waits(gate, child_started, child_outcome, started):
    """Start a child task and wait in ``get`` for it."""
    child = guarded.remote(gate, child_started, child_outcome)
    open(started, "w").close()
    return daskray.get(child)


def read_when_written(path, timeout=30.0):
    wait_for_path(path, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(path).read()
        if text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} stayed empty")


def test_a_cancelled_running_task_sees_keyboard_interrupt_and_get_raises_cancelled(
        backend, tmp_path):
    ref = guarded.remote(str(tmp_path / "gate"), str(tmp_path / "started"),
                         str(tmp_path / "outcome"))
    wait_for_path(tmp_path / "started")
    start = time.monotonic()
    daskray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ref.get(timeout=20)
    assert time.monotonic() - start < 10
    assert read_when_written(tmp_path / "outcome") == "KeyboardInterrupt"
    assert inc.remote(1).get(timeout=30) == 2


def test_dependents_of_a_cancelled_task_raise_task_cancelled_error(backend, tmp_path):
    gate = str(tmp_path / "gate")
    running = guarded.remote(gate, str(tmp_path / "started"), str(tmp_path / "outcome"))
    dependent = inc.remote(running)
    wait_for_path(tmp_path / "started")
    waiter = get_first.remote([running], str(tmp_path / "waiter"))  # waits in get() for it
    wait_for_path(tmp_path / "waiter")
    daskray.cancel(running)
    for ref in (running, dependent, waiter):
        with pytest.raises(TaskCancelledError):
            ref.get(timeout=20)


def test_cancelling_a_task_blocked_in_get_takes_effect(backend, tmp_path):
    gate = str(tmp_path / "gate")
    inner = guarded.remote(gate, str(tmp_path / "inner"), str(tmp_path / "inner_outcome"))
    wait_for_path(tmp_path / "inner")
    blocked = get_first.remote([inner], str(tmp_path / "blocked"))
    wait_for_path(tmp_path / "blocked")
    daskray.cancel(blocked)
    with pytest.raises(TaskCancelledError):
        blocked.get(timeout=20)
    # the task it waited for is not one it started: it runs on
    release(gate)
    assert inner.get(timeout=30) == "opened"


@pytest.mark.parametrize("recursive", [True, False])
def test_recursive_cancel_reaches_the_tasks_the_cancelled_task_started(
        backend, tmp_path, recursive):
    gate = tmp_path / "gate"
    parent = starts_and_waits.remote(str(gate), str(tmp_path / "child"),
                                     str(tmp_path / "child_outcome"), str(tmp_path / "parent"))
    wait_for_path(tmp_path / "parent")
    wait_for_path(tmp_path / "child")
    daskray.cancel(parent, recursive=recursive)
    if recursive:
        assert read_when_written(tmp_path / "child_outcome") == "KeyboardInterrupt"
    else:  # the child runs on, until its gate opens
        gate.touch()
        assert read_when_written(tmp_path / "child_outcome") == "opened"
    # (a child running on top of its waiting parent, on its worker's stack, ends first)
    with pytest.raises(TaskCancelledError):
        parent.get(timeout=20)


@daskray.remote
def pid_then_wait(path, gate):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    return wait_for_gate_here(gate, 60, path + ".started")


def test_force_cancel_kills_the_worker_process_and_a_new_one_takes_its_place(
        backend, tmp_path):
    import psutil

    ref = pid_then_wait.remote(str(tmp_path / "pid"), str(tmp_path / "gate"))
    pid = int(read_when_written(tmp_path / "pid"))
    daskray.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        ref.get(timeout=30)
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(pid)
    # a replacement joins: as many tasks run at once as before
    assert wait_until(lambda: daskray.cluster_resources()["CPU"] == NUM_WORKERS, 60)
    gate = tmp_path / "gate2"
    all_at_once = [pid_then_wait.remote(str(tmp_path / f"p{i}"), str(gate))
                   for i in range(NUM_WORKERS)]
    pids = {int(read_when_written(tmp_path / f"p{i}", 60)) for i in range(NUM_WORKERS)}
    gate.touch()
    assert daskray.get(all_at_once, timeout=30) == ["opened"] * NUM_WORKERS
    assert len(pids) == NUM_WORKERS and pid not in pids


def unpickle_when_cancelled(started):
    """Unpickling a ``CancelledWhileUnpickled`` on a daskray worker: say so in
    ``started``, then wait (at most 60 s) until the worker hears of a cancel, of
    a running task (``cancelled``) or a queued one (``dropped``)."""
    from daskray.runtime import context

    worker = context.worker_session.conn.worker
    before = worker.cancelled | worker.dropped
    open(started, "w").close()
    deadline = time.monotonic() + 60
    while not (worker.cancelled | worker.dropped) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    return "argument"


class CancelledWhileUnpickled:
    """An argument that holds its task, on its worker, between leaving the queue
    and running, until the task's cancel arrives."""

    def __init__(self, started):
        self.started = started

    def __reduce__(self):
        return unpickle_when_cancelled, (self.started,)


@daskray.remote
def body_waits(argument, ran, gate):
    return wait_for_gate_here(gate, 60, ran)


def test_a_task_cancelled_while_its_worker_takes_it_up_never_runs(cluster, tmp_path):
    """A cancel that reaches a worker after it took the task from its queue but
    before the task's code runs (its arguments were being unpickled) stops it:
    the head heard "never ran", so it must not run and hold the worker."""
    body_gate = tmp_path / "body_gate"
    ref = body_waits.remote(CancelledWhileUnpickled(str(tmp_path / "unpickling")),
                            str(tmp_path / "ran"), str(body_gate))
    try:
        wait_for_path(tmp_path / "unpickling")
        daskray.cancel(ref)
        with pytest.raises(TaskCancelledError):
            ref.get(timeout=20)
        # its worker is free again: as many tasks run at once as there are workers
        gate = tmp_path / "gate2"
        all_at_once = [pid_then_wait.remote(str(tmp_path / f"p{i}"), str(gate))
                       for i in range(NUM_WORKERS)]
        for i in range(NUM_WORKERS):
            read_when_written(tmp_path / f"p{i}", 30)
        gate.touch()
        assert daskray.get(all_at_once, timeout=30) == ["opened"] * NUM_WORKERS
        assert not (tmp_path / "ran").exists()
    finally:
        body_gate.touch()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_ended_by_force_cancels_are_replaced_at_once_however_many(restart_cluster,
                                                                          tmp_path):
    """A force cancel ends its worker's process on purpose: that is no crash loop
    (a worker dying in its first task), so its replacement is not held back by the
    crash-loop backoff, however many force cancels come in a minute (Ray's stress
    test of cancel force-cancels dozens of tasks)."""
    daskray.shutdown()
    restart_cluster.init(num_workers=1, _validate=True)
    waits = []
    for i in range(18):  # past the deaths a minute whose replacements start at once
        ref = pid_then_wait.remote(str(tmp_path / f"pid{i}"), str(tmp_path / "gate"))
        read_when_written(tmp_path / f"pid{i}")  # it runs, on a new worker each time
        daskray.cancel(ref, force=True)
        with pytest.raises(TaskCancelledError):
            ref.get(timeout=30)
        t0 = time.monotonic()
        assert wait_until(lambda: daskray.cluster_resources().get("CPU") == 1, 60), \
            "no replacement within 60 s"
        waits.append(time.monotonic() - t0)
    assert max(waits) < 5, f"replacements waited {[round(w, 1) for w in waits]} s"
    assert inc.remote(1).get(timeout=30) == 2


def test_a_force_cancel_spares_the_tasks_queued_behind_it_on_its_worker(restart_cluster,
                                                                       tmp_path):
    """The worker ends itself for the cancelled task; a task queued behind it on that
    worker runs on the replacement, even with max_retries=0 (it was never at fault)."""
    daskray.shutdown()
    restart_cluster.init(num_workers=1, _validate=True)
    ref = pid_then_wait.remote(str(tmp_path / "pid"), str(tmp_path / "gate"))
    read_when_written(tmp_path / "pid")  # it runs on the only worker
    behind = [inc.options(max_retries=0).remote(i) for i in range(3)]
    daskray.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        ref.get(timeout=30)
    assert daskray.get(behind, timeout=60) == [1, 2, 3]


@daskray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def add(self):
        self.n += 1
        return self.n


def test_force_cancel_of_an_actor_call_raises_value_error(backend):
    counter = Counter.remote()
    call = counter.add.remote()
    with pytest.raises(ValueError, match="actor"):
        daskray.cancel(call, force=True)
    assert call.get(timeout=30) == 1
    assert counter.add.remote().get(timeout=30) == 2


def test_cancelling_a_finished_task_does_nothing(backend):
    ref = inc.remote(1)
    assert ref.get(timeout=30) == 2
    for force in (False, True):
        daskray.cancel(ref, force=force)
        daskray.cancel(ref, force=force, recursive=False)
    assert ref.get(timeout=30) == 2
    assert inc.remote(ref).get(timeout=30) == 3


@daskray.remote
def read_fifo(path, started):
    """Block inside C code (opening a FIFO no one writes to) until released."""
    open(started, "w").close()
    with open(path) as f:
        return f.read()


def unblock_fifo(path):
    """Let a reader blocked on the FIFO at ``path`` go, if one still is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader left: it was interrupted
        return
    try:
        os.write(fd, b"released")
    except BrokenPipeError:  # the reader went meanwhile
        pass
    finally:
        os.close(fd)


def test_tasks_waiting_for_a_cancelled_task_stuck_in_c_code_fail_at_once(backend, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    stuck = read_fifo.remote(fifo, str(tmp_path / "stuck"))
    try:
        wait_for_path(tmp_path / "stuck")
        dependent = inc.remote(stuck)
        waiter = get_first.remote([stuck], str(tmp_path / "waiter"))
        wait_for_path(tmp_path / "waiter")
        start = time.monotonic()
        daskray.cancel(stuck)
        for ref in (stuck, dependent, waiter):
            with pytest.raises(TaskCancelledError):
                ref.get(timeout=20)
        assert time.monotonic() - start < 10
    finally:
        unblock_fifo(fifo)


# =========================================================================== sys.exit in actors


@daskray.remote
class Exits:
    def ping(self):
        return "pong"

    def leave(self, code):
        sys.exit(code)


def test_sys_exit_in_an_actor_method_ends_the_actor_as_in_ray(backend):
    machines = {node["NodeID"] for node in daskray.nodes()}  # dask workers, by address
    actor = Exits.remote()
    assert actor.ping.remote().get(timeout=30) == "pong"
    with pytest.raises(daskray.ActorDiedError):
        actor.leave.remote(0).get(timeout=30)
    with pytest.raises(daskray.ActorDiedError):
        actor.ping.remote().get(timeout=30)
    # the other workers carry on; no dask worker died with the actor
    assert daskray.get([inc.remote(i) for i in range(4)], timeout=30) == [1, 2, 3, 4]
    assert {node["NodeID"] for node in daskray.nodes()} == machines
