"""daskray's processes, for real: start-up, shutdown, crashes, interrupts, bad input.

Every test here runs real head and worker processes (or, for ``local_mode``, checks
that none are started) and inspects them with psutil.  Nothing is mocked except a
spy on the driver's ``Client.send`` to prove that bad input is refused before a
single message leaves the driver.

Fixtures are this module's own: ``proc_cluster`` is one cluster of ``NUM_WORKERS``
workers reused by the tests that need one (restarted if a test left it stopped or
broken); ``no_cluster`` makes sure nothing runs.  A cluster some other module
left running is shut down when this module starts and started again (same size)
when it ends.

Other daskray clusters may run on the host at the same time (another test run):
the leak checks only count processes and session directories that belong to the
drivers these tests started.
"""

from __future__ import annotations

import _thread
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import dask
import psutil
import pytest
import zmq
from dask._task_spec import Task, TaskRef

import daskray
from helpers import NUM_WORKERS, mark_started, start_cluster, wait_until
import daskray.api
from daskray.runtime import protocol as P
from daskray.runtime import transport
from daskray.runtime.cluster import OWNER_FILE, SESSION_PREFIX, sweep_stale_sessions

SCRIPTS = Path(__file__).parent / "scripts"
TMP = tempfile.gettempdir()
RUNTIME_MARK = "daskray.runtime"

#: how long processes get to disappear where the spec says "within a few seconds"
EXIT_GRACE = 5.0


# --------------------------------------------------------------------------- tasks
# Module-level, so workers import them by reference and tracebacks show this file.


def inc(x):
    return x + 1


def getpid():
    return os.getpid()


def raise_value_error(x):
    raise ValueError(f"boom-marker {x}")  # the user's line the traceback must show


def write_pid_then_sleep(path, seconds):
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def mark_then_sleep(path, seconds):
    mark_started(path)
    time.sleep(seconds)


def sleep_unless_run_before(path, seconds):
    """First run: write the pid and sleep; any later run: return at once."""
    if Path(path).exists():
        return "ran again"
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "first run"


def exit_worker(_):
    os._exit(3)


def make_block(i, marker_dir):
    """A block too large to travel inline (1.6 MB); a marker names its maker."""
    import numpy as np

    Path(marker_dir, f"{i}-{os.getpid()}").write_text("")
    return np.full(200_000, float(i))


def wait_for_file(path, timeout, *inputs):
    """Hold a graph back until the test says go (the file exists)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return True


def total_of(gate, *blocks):
    return float(sum(b.sum() for b in blocks))


def write_pid_then_return_lock(path):
    Path(path).write_text(str(os.getpid()))
    return threading.Lock()


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


# --------------------------------------------------------------------------- helpers


def _is_runtime(proc: psutil.Process) -> bool:
    try:
        return any(RUNTIME_MARK in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an exited orphan waits for pid 1 to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_alive_runtime(pid: int) -> bool:
    """Whether ``pid`` is a live daskray runtime process (a reused pid is not)."""
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return False
    return _alive(proc) and _is_runtime(proc)


def runtime_processes(drivers: set[int]) -> list[psutil.Process]:
    """Live daskray head/worker processes that are not some *other* driver's.

    A process counts as ours unless its nearest ancestor outside daskray's runtime
    is a live Python process other than ``drivers`` (that is a concurrent driver,
    e.g. another test run).  Orphans -- reparented to pid 1 or a subreaper -- and
    anything under ``drivers`` count.
    """
    found = []
    for proc in psutil.process_iter():
        if not _is_runtime(proc) or not _alive(proc):
            continue
        try:
            anc = proc.parent()
            while anc is not None and anc.pid not in drivers and _is_runtime(anc):
                anc = anc.parent()
            foreign = (
                anc is not None and anc.pid not in drivers and anc.pid != 1
                and "python" in anc.name().lower() and _alive(anc)
            )
        except psutil.Error:
            foreign = False
        if not foreign:
            found.append(proc)
    return found


def session_dirs() -> set[str]:
    return set(glob.glob(os.path.join(TMP, SESSION_PREFIX + "*")))


def foreign_session(path: str, drivers: set[int]) -> bool:
    """A session directory owned by a live driver that is not one of ``drivers``."""
    try:
        pid = int(Path(path, OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return False
    return pid not in drivers and psutil.pid_exists(pid)


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


class Snapshot:
    """What exists before a test, to find what it left behind."""

    def __init__(self) -> None:
        self.children = {p.pid for p in psutil.Process().children(recursive=True)}
        self.runtime = {p.pid for p in runtime_processes({os.getpid()})}
        self.sessions = session_dirs()
        self.shm = shm_entries()

    def leftovers(self, drivers: set[int] = frozenset()) -> dict[str, list]:
        drivers = {os.getpid(), *drivers}
        children = [
            f"{p.pid} {p.cmdline()}" for p in psutil.Process().children(recursive=True)
            if p.pid not in self.children and _alive(p)
        ]
        runtime = [
            f"{p.pid} {p.cmdline()}" for p in runtime_processes(drivers)
            if p.pid not in self.runtime
        ]
        sessions = sorted(
            s for s in session_dirs() - self.sessions if not foreign_session(s, drivers)
        )
        return {
            "driver children": children,
            "daskray processes": runtime,
            "session dirs": sessions,
            "/dev/shm entries": sorted(shm_entries() - self.shm),
        }

    def assert_clean(self, drivers: set[int] = frozenset()) -> None:
        left = self.leftovers(drivers)
        if any(left.values()):
            time.sleep(0.5)  # a concurrent run's session may have been half-made
            left = self.leftovers(drivers)
        assert not any(left.values()), f"left behind: {left}"




def head_process(cluster) -> psutil.Process:
    return psutil.Process(cluster.head.pid)


def worker_pids(cluster) -> set[int]:
    return {p.pid for p in head_process(cluster).children() if _alive(p)}


def get_sleeper_in_thread(pidfile: Path, seconds: float) -> tuple[threading.Thread, dict]:
    """``daskray.get`` of a task that writes its pid and sleeps (once: it returns
    "ran again" when run again), in a thread; the thread and where its outcome
    ("value" or "error") lands."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = daskray.get(
                {"sleeper": (sleep_unless_run_before, str(pidfile), seconds)}, "sleeper")
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_file_pid(path: Path, timeout: float) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().strip(), timeout), (
        f"no task wrote {path} within {timeout} s")
    return int(path.read_text())


def record_sends(monkeypatch, client) -> list:
    """Spy on ``client.send``: every message the driver sends to the head."""
    sent = []
    real = client.send

    def send(msg):
        sent.append(msg)
        return real(msg)

    monkeypatch.setattr(client, "send", send)
    return sent


def run_script(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / name), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(SCRIPTS.parent.parent),
    )


def read_info(proc: subprocess.Popen, timeout: float = 45.0) -> dict:
    """The JSON line a helper script prints once its cluster is up."""
    result: dict = {}

    def read() -> None:
        result["line"] = proc.stdout.readline()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    line = result.get("line")
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"{proc.args} printed nothing within {timeout} s; stderr:\n{err}")
    return json.loads(line)


def compute_works(expect_workers: int = NUM_WORKERS) -> None:
    """A small graph computes correctly, and promptly."""
    t0 = time.monotonic()
    dsk = {("x", i): (inc, i) for i in range(2 * expect_workers)}
    dsk["total"] = (sum, list(dsk))
    assert daskray.get(dsk, "total") == sum(range(1, 2 * expect_workers + 1))
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def _module_runtime():
    """Start from no runtime; at the end, put back what another module had running."""
    previous = daskray.api._runtime
    restore = None
    if previous is not None:
        restore = ({"local_mode": True} if previous.local_mode
                   else {"num_workers": previous.cluster.num_workers})
        daskray.shutdown()
    yield
    daskray.shutdown()
    if restore is not None:
        daskray.init(**restore)


def _healthy(runtime) -> bool:
    if runtime is None or runtime.local_mode:
        return False
    cluster = runtime.cluster
    return (cluster.head.poll() is None and cluster.client.failure is None
            and not cluster.client.closed and len(worker_pids(cluster)) == NUM_WORKERS)


@pytest.fixture
def proc_cluster(_module_runtime):
    """A running cluster of NUM_WORKERS workers, shared by the tests that need one."""
    if not _healthy(daskray.api._runtime):
        daskray.shutdown()
        start_cluster()
    cluster = daskray.api._runtime.cluster
    assert len(worker_pids(cluster)) == NUM_WORKERS
    return cluster


@pytest.fixture
def fresh_cluster(_module_runtime):
    """A cluster of its own for one test, stopped afterwards (the test may wreck it)."""
    daskray.shutdown()
    start_cluster()
    yield daskray.api._runtime.cluster
    daskray.shutdown()


@pytest.fixture
def no_cluster(_module_runtime):
    daskray.shutdown()
    assert not daskray.is_initialized()
    yield
    daskray.shutdown()


# =========================================================================== cleanup


@pytest.mark.timeout(60)
def test_shutdown_leaves_nothing_behind(no_cluster):
    before = Snapshot()
    assert not daskray.is_initialized()
    start_cluster()
    assert daskray.is_initialized()
    cluster = daskray.api._runtime.cluster
    head = head_process(cluster)
    workers = [p for p in head.children() if _alive(p)]
    assert len(workers) == NUM_WORKERS
    assert head.ppid() == os.getpid()
    assert all(_is_runtime(p) for p in [head, *workers])
    assert os.path.isdir(cluster.session_dir)
    compute_works()

    daskray.shutdown()

    assert not daskray.is_initialized()
    for proc in [head, *workers]:
        assert not _alive(proc), f"{proc} survived shutdown()"
    assert not os.path.exists(cluster.session_dir)
    before.assert_clean()
    daskray.shutdown()  # twice is fine
    assert not daskray.is_initialized()
    before.assert_clean()
    with pytest.raises(daskray.ClusterError, match="init"):
        daskray.get({"a": (inc, 1)}, "a")


@pytest.mark.timeout(60)
def test_interpreter_exit_without_shutdown_leaves_nothing(no_cluster):
    before = Snapshot()
    proc = run_script("cluster_driver.py", str(NUM_WORKERS), "exit")
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["result"] == 2
    assert len(info["workers"]) == NUM_WORKERS
    for pid in [info["head"], *info["workers"]]:
        assert not _pid_alive_runtime(pid), f"pid {pid} outlived its driver's exit"
    assert not os.path.exists(info["session_dir"])
    before.assert_clean(drivers={info["driver"]})


@pytest.mark.timeout(60)
def test_sigkilled_driver_head_and_workers_exit_on_their_own(no_cluster):
    before = Snapshot()
    proc = run_script("cluster_driver.py", str(NUM_WORKERS), "sleep")
    try:
        info = read_info(proc)
        cluster_procs = [psutil.Process(pid) for pid in [info["head"], *info["workers"]]]
        assert len(cluster_procs) == 1 + NUM_WORKERS
        assert all(_alive(p) and _is_runtime(p) for p in cluster_procs)
        assert os.path.isdir(info["session_dir"])
        os.kill(info["driver"], signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(_alive(p) for p in cluster_procs), EXIT_GRACE), (
            f"still running {EXIT_GRACE} s after the driver was SIGKILLed: "
            f"{[p.pid for p in cluster_procs if _alive(p)]}")
        elapsed = time.monotonic() - t0
        # the head removes the session directory as it goes
        assert wait_until(lambda: not os.path.exists(info["session_dir"]), EXIT_GRACE)
        before.assert_clean(drivers={info["driver"]})
        assert elapsed < EXIT_GRACE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_next_init_sweeps_session_left_by_a_sigkilled_cluster(no_cluster):
    proc = run_script("cluster_driver.py", "1", "sleep")
    try:
        info = read_info(proc)
        # kill everything at once, head first, so nobody gets to clean up
        for pid in [info["head"], *info["workers"], info["driver"]]:
            os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        for pid in [info["head"], *info["workers"]]:
            assert wait_until(lambda: not _pid_alive_runtime(pid), EXIT_GRACE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stale = info["session_dir"]
    assert os.path.isdir(stale), "nothing was left over: the test cannot check the sweep"
    assert Path(stale, OWNER_FILE).read_text().strip() == str(info["driver"])

    daskray.init(num_workers=1)
    assert not os.path.exists(stale), "init() did not sweep a dead driver's session dir"
    live = daskray.api._runtime.cluster.session_dir
    # a live driver's session is never swept
    assert stale not in sweep_stale_sessions()
    assert live not in sweep_stale_sessions()
    assert os.path.isdir(live)
    compute_works(expect_workers=1)
    daskray.shutdown()
    assert not os.path.exists(live)


# =========================================================================== init


@pytest.mark.timeout(60)
def test_init_twice(proc_cluster):
    assert daskray.is_initialized()
    workers = worker_pids(proc_cluster)
    with pytest.raises(daskray.ClusterError) as info:
        start_cluster()
    message = str(info.value)
    assert "twice" in message
    assert "shutdown()" in message and "ignore_reinit_error=True" in message
    assert isinstance(info.value, RuntimeError)

    context = daskray.init(num_workers=5, ignore_reinit_error=True)
    assert context.backend == "local"  # the running cluster's context
    assert daskray.api._runtime.cluster is proc_cluster  # the running cluster is kept
    assert proc_cluster.head.poll() is None
    assert worker_pids(proc_cluster) == workers  # and nothing new was started
    assert daskray.is_initialized()
    compute_works()


@pytest.mark.timeout(30)
def test_local_mode_runs_in_the_driver(no_cluster):
    before = Snapshot()
    daskray.init(local_mode=True)
    try:
        assert daskray.is_initialized()
        with pytest.raises(daskray.ClusterError):
            daskray.init(local_mode=True)
        assert daskray.get({"p": (getpid,)}, "p") == os.getpid()
        # daskray is dask's scheduler: .compute() runs here too
        assert dask.delayed(getpid)().compute() == os.getpid()
        assert daskray.get({"a": 1, "b": (inc, "a")}, ["b", "a"]) == (2, 1)

        with pytest.raises(ValueError, match="boom-marker 7") as info:
            daskray.get({"e": (raise_value_error, 7)}, "e")
        # an ordinary, local traceback: the user's frame is in it, nothing remote
        assert not isinstance(info.value.__cause__, daskray.RemoteTraceback)
        frames = traceback.extract_tb(info.value.__traceback__)
        assert any(f.name == "raise_value_error" and f.filename == __file__ for f in frames)
        assert 'raise ValueError(f"boom-marker {x}")' in "".join(
            traceback.format_tb(info.value.__traceback__))
        # no process, no session directory
        assert not any(before.leftovers().values()), before.leftovers()
    finally:
        daskray.shutdown()
    assert not daskray.is_initialized()


# =========================================================================== bad input


@pytest.mark.timeout(60)
def test_task_exception_is_reraised_with_remote_traceback(proc_cluster):
    with pytest.raises(ValueError, match="boom-marker 3") as info:
        daskray.get({"boom": (raise_value_error, 3), "ok": (inc, 1)}, ["ok", "boom"])
    exc = info.value
    assert type(exc) is ValueError  # the original type, not a wrapper
    cause = exc.__cause__
    assert isinstance(cause, daskray.RemoteTraceback)
    text = str(cause)
    assert "raise_value_error" in text
    assert f'File "{__file__}"' in text
    assert 'raise ValueError(f"boom-marker {x}")' in text  # the user's own line
    assert "ValueError: boom-marker 3" in text
    compute_works()


@pytest.mark.timeout(60)
def test_task_exception_from_main_script_shows_users_line(no_cluster, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        "import daskray\n"
        "\n"
        "def user_task(x):\n"
        "    raise KeyError(f'user-marker-{x}')  # THE-USERS-LINE\n"
        "\n"
        "daskray.init(num_workers=1)\n"
        "try:\n"
        "    daskray.get({'t': (user_task, 5)}, 't')\n"
        "except KeyError as exc:\n"
        "    print(str(exc.__cause__))\n"
        "daskray.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=45,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "user_task" in proc.stdout
    assert "THE-USERS-LINE" in proc.stdout, proc.stdout
    assert str(script) in proc.stdout, proc.stdout


def make_locked_task():
    """A closure over a lock, as users write them (module-level factory, short name)."""
    lock = threading.Lock()

    def locked_task(x):
        with lock:
            return x

    return locked_task


@pytest.mark.timeout(60)
def test_unpicklable_function_is_refused_before_sending(proc_cluster, monkeypatch):
    locked_task = make_locked_task()
    sent = record_sends(monkeypatch, proc_cluster.client)
    with pytest.raises(daskray.SerializationError) as info:
        daskray.get({"f": (locked_task, 1)}, "f")
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert "locked_task" in message
    assert "lock" in message.replace("locked_task", "")
    assert sent == []
    # also through dask.delayed
    with pytest.raises(daskray.SerializationError, match="locked_task"):
        dask.delayed(locked_task)(2).compute()
    assert sent == []
    monkeypatch.undo()
    compute_works()


@pytest.mark.timeout(60)
def test_unpicklable_function_with_a_long_qualified_name_is_named(proc_cluster, monkeypatch):
    lock = threading.Lock()

    def closure_over_a_lock(x):
        with lock:
            return x

    sent = record_sends(monkeypatch, proc_cluster.client)
    with pytest.raises(daskray.SerializationError) as info:
        daskray.get({"f": (closure_over_a_lock, 1)}, "f")
    assert sent == []
    assert "closure_over_a_lock" in str(info.value), str(info.value)


@pytest.mark.timeout(60)
def test_unpicklable_argument_is_refused_before_sending(proc_cluster, monkeypatch):
    lock = threading.Lock()
    sent = record_sends(monkeypatch, proc_cluster.client)
    # an argument inside the task
    with pytest.raises(daskray.SerializationError) as info:
        daskray.get({"uses-lock": (repr, lock)}, "uses-lock")
    assert isinstance(info.value, TypeError)
    assert "uses-lock" in str(info.value) and "lock" in str(info.value)
    # a data node a task reads
    with pytest.raises(daskray.SerializationError) as info:
        daskray.get({"the-lock": lock, "reader": (repr, "the-lock")}, "reader")
    assert "lock" in str(info.value)
    assert sent == []
    monkeypatch.undo()
    compute_works()


@pytest.mark.timeout(60)
def test_unpicklable_result_fails_that_get_and_the_worker_lives_on(proc_cluster, tmp_path):
    workers = worker_pids(proc_cluster)
    pidfile = tmp_path / "pid"
    with pytest.raises(daskray.SerializationError) as info:
        daskray.get({"returns-lock": (write_pid_then_return_lock, str(pidfile))},
                    "returns-lock")
    assert isinstance(info.value, TypeError)
    assert "lock" in str(info.value)
    ran_on = int(pidfile.read_text())
    assert ran_on in workers
    # the same worker processes, still working
    assert worker_pids(proc_cluster) == workers
    assert _pid_alive_runtime(ran_on)
    pids = daskray.get({("p", i): (sleep_then_pid, 0.05) for i in range(8)},
                       [("p", i) for i in range(8)])
    assert set(pids) <= workers
    assert worker_pids(proc_cluster) == workers
    compute_works()


@pytest.mark.timeout(60)
def test_cyclic_graph(proc_cluster, monkeypatch):
    sent = record_sends(monkeypatch, proc_cluster.client)
    dsk = {"a": (inc, "b"), "b": (inc, "c"), "c": (inc, "a"), "d": (inc, 1)}
    with pytest.raises(daskray.GraphError) as info:
        daskray.get(dsk, "a")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "ycle" in message
    for key in ("'a'", "'b'", "'c'"):
        assert key in message
    assert "'d'" not in message
    with pytest.raises(daskray.GraphError, match="ycle"):  # a task depending on itself
        daskray.get({"self": Task("self", inc, TaskRef("self"))}, "self")
    assert sent == []
    monkeypatch.undo()
    compute_works()


@pytest.mark.timeout(60)
def test_missing_dependency(proc_cluster, monkeypatch):
    sent = record_sends(monkeypatch, proc_cluster.client)
    dsk = {"needs-ghost": Task("needs-ghost", inc, TaskRef("ghost")), "x": (inc, 1)}
    with pytest.raises(daskray.GraphError) as info:
        daskray.get(dsk, "needs-ghost")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "ghost" in message and "needs-ghost" in message
    assert "issing" in message
    assert sent == []
    monkeypatch.undo()
    compute_works()


@pytest.mark.timeout(60)
def test_missing_output_key(proc_cluster, monkeypatch):
    sent = record_sends(monkeypatch, proc_cluster.client)
    with pytest.raises(KeyError, match="not-in-graph"):
        daskray.get({"a": (inc, 1)}, "not-in-graph")
    with pytest.raises(KeyError, match="not-in-graph"):
        daskray.get({"a": (inc, 1)}, ["a", ["not-in-graph"]])
    assert sent == []
    monkeypatch.undo()
    compute_works()


# =========================================================================== interrupts


@pytest.mark.timeout(60)
def test_keyboard_interrupt_cancels_the_graph_on_the_cluster(fresh_cluster, sigint_raises,
                                                            tmp_path):
    # one 30 s task per worker: if they are not interrupted, nothing else can run
    running = [tmp_path / f"running{i}" for i in range(NUM_WORKERS)]
    dsk = {("sleep", i): (mark_then_sleep, str(running[i]), 30) for i in range(NUM_WORKERS)}
    computing = threading.Event()
    interrupted_at: list = []

    def interrupt_soon() -> None:
        if computing.wait(10) and wait_until(lambda: all(p.exists() for p in running), 20):
            if computing.is_set():
                interrupted_at.append(time.monotonic())
                _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_soon, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            computing.set()
            daskray.get(dsk, list(dsk))
    finally:
        computing.clear()
    elapsed = time.monotonic() - interrupted_at[0]
    interrupter.join(5)
    assert elapsed < 4, f"KeyboardInterrupt took {elapsed:.1f} s to surface"

    # the next compute must not wait for the 30 s sleeps
    outcome: dict = {}

    def follow_up() -> None:
        try:
            outcome["value"] = daskray.get(
                {("p", i): (sleep_then_pid, 0.01) for i in range(NUM_WORKERS)},
                [("p", i) for i in range(NUM_WORKERS)])
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=follow_up, daemon=True)
    thread.start()
    thread.join(8)
    try:
        assert not thread.is_alive(), (
            "the compute after a KeyboardInterrupt is still waiting after 8 s: the "
            "interrupted tasks are still running on the cluster")
        assert "error" not in outcome, outcome.get("error")
        assert set(outcome["value"]) <= worker_pids(fresh_cluster)
        assert time.monotonic() - t0 < 5
    finally:
        if thread.is_alive():  # release the stuck waiter once the cluster is gone
            client = fresh_cluster.client
            daskray.shutdown()
            client._fail_all("test teardown")
            thread.join(5)


# =========================================================================== crashes


@pytest.mark.timeout(60)
def test_sigkilled_worker_is_replaced_and_its_task_runs_again(proc_cluster, tmp_path):
    workers = worker_pids(proc_cluster)
    pidfile = tmp_path / "pid"
    thread, outcome = get_sleeper_in_thread(pidfile, 30)
    victim = wait_for_file_pid(pidfile, 20)
    assert victim in workers
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    thread.join(20)
    assert not thread.is_alive(), "get() hung after its worker was SIGKILLed"
    assert outcome == {"value": "ran again"}, outcome
    assert time.monotonic() - t0 < 15

    # refilled: a new worker in place of the dead one
    assert wait_until(
        lambda: len(worker_pids(proc_cluster)) == NUM_WORKERS
        and victim not in worker_pids(proc_cluster), 15), worker_pids(proc_cluster)
    assert wait_until(lambda: len(proc_cluster.client.workers) == NUM_WORKERS, 15)
    new = worker_pids(proc_cluster) - workers
    assert len(new) == 1
    assert not _pid_alive_runtime(victim)
    pids = daskray.get({("p", i): (sleep_then_pid, 0.05) for i in range(8)},
                       [("p", i) for i in range(8)])
    assert set(pids) <= worker_pids(proc_cluster)
    compute_works()


@pytest.mark.timeout(90)
def test_a_stopped_worker_is_killed_after_the_worker_ttl_and_its_task_runs_again(
        no_cluster, tmp_path):
    # dask's own setting, as with dask.distributed (default 5 minutes)
    with dask.config.set({"distributed.scheduler.worker-ttl": "2s"}):
        start_cluster()
    cluster = daskray.api._runtime.cluster
    pidfile = tmp_path / "pid"
    thread, outcome = get_sleeper_in_thread(pidfile, 60)
    victim = wait_for_file_pid(pidfile, 20)
    time.sleep(3)  # a busy worker is not a silent one: its task sleeps past the ttl
    assert _pid_alive_runtime(victim) and "value" not in outcome
    os.kill(victim, signal.SIGSTOP)  # alive, but answers nothing
    try:
        thread.join(30)
        assert not thread.is_alive(), "get() hung behind a stopped worker"
        assert outcome == {"value": "ran again"}, outcome
        assert wait_until(lambda: not _pid_alive_runtime(victim), 10)
        assert wait_until(lambda: len(worker_pids(cluster)) == NUM_WORKERS, 30)
    finally:
        if _pid_alive_runtime(victim):
            os.kill(victim, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_a_task_that_kills_every_worker_fails_after_the_allowed_failures(proc_cluster):
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with pytest.raises(daskray.WorkerCrashedError) as info:
            daskray.get({"x": 1, "boom": (exit_worker, "x")}, "boom")
    message = str(info.value)
    assert "boom" in message and "exited with code 3" in message, message
    assert wait_until(lambda: len(proc_cluster.client.workers) == NUM_WORKERS, 30)
    compute_works()


@pytest.mark.parametrize("with_callbacks", [False, True])
@pytest.mark.timeout(90)
def test_results_lost_with_a_killed_worker_are_computed_again(fresh_cluster, tmp_path,
                                                              with_callbacks):
    markers, go = tmp_path / "markers", tmp_path / "go"
    markers.mkdir()
    dsk = {("b", i): (make_block, i, str(markers)) for i in range(8)}
    # the gate runs once every block exists, and holds the graph until the kill
    dsk["gate"] = (wait_for_file, str(go), 60, *[("b", i) for i in range(8)])
    dsk["total"] = (total_of, "gate", *[("b", i) for i in range(8)])
    expected = float(sum(i * 200_000 for i in range(8)))
    outcome: dict = {}

    finished_keys: list = []

    def run() -> None:
        # a dask callback sees every task start and finish once, recomputed or not
        callback = dask.callbacks.Callback(posttask=lambda key, *_: finished_keys.append(key))
        try:
            if with_callbacks:
                with callback:
                    outcome["value"] = daskray.get(dsk, "total")
            else:
                outcome["value"] = daskray.get(dsk, "total")
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_until(lambda: len(list(markers.iterdir())) == 8, 30)
    makers = [int(p.name.split("-")[1]) for p in markers.iterdir()]
    victim = max(set(makers), key=makers.count)  # holds at least half the blocks
    for p in markers.iterdir():
        p.unlink()
    os.kill(victim, signal.SIGKILL)
    go.write_text("")
    thread.join(60)
    assert not thread.is_alive(), "get() hung after a worker holding its inputs died"
    assert outcome == {"value": expected}, outcome
    remade = [int(p.name.split("-")[0]) for p in markers.iterdir()]
    if with_callbacks:
        # callbacks get every value, so the head holds them all: nothing is lost, and
        # each task is seen finishing once
        assert sorted(map(str, finished_keys)) == sorted(map(str, dsk)), finished_keys
    else:
        assert remade and all(i in range(8) for i in remade), "nothing was computed again"


def add_one_to_block(block):
    return block + 1.0


@pytest.mark.timeout(90)
def test_remote_results_lost_with_a_killed_worker_are_computed_again(fresh_cluster, tmp_path):
    """Ray's lineage: a call's result that only a dead worker held runs again when
    it is read, from the driver or from a task; a call with max_retries=0 is lost
    with the reason."""
    import numpy as np

    daskray.shutdown()  # the first worker alone has "pin": every call below runs there
    start_cluster(resources=[{"pin": 1}, {}])
    markers = tmp_path / "markers"
    markers.mkdir()
    make = daskray.remote(make_block).options(resources={"pin": 1})
    blocks = [make.remote(i, str(markers)) for i in range(4)]
    derived = daskray.remote(add_one_to_block).options(resources={"pin": 1}).remote(blocks[0])
    no_retry = make.options(max_retries=0).remote(4, str(markers))
    everything = [*blocks, derived, no_retry]
    ready, _ = daskray.wait(everything, num_returns=len(everything), timeout=30)
    assert len(ready) == len(everything)  # the driver now knows where each one is
    (victim,) = {int(p.name.split("-")[1]) for p in markers.iterdir()}
    for p in markers.iterdir():
        p.unlink()
    os.kill(victim, signal.SIGKILL)

    values = daskray.get([*blocks, derived], timeout=30)
    for i, value in enumerate(values[:4]):
        np.testing.assert_array_equal(value, np.full(200_000, float(i)))
    np.testing.assert_array_equal(values[4], np.full(200_000, 1.0))
    remade = sorted(int(p.name.split("-")[0]) for p in markers.iterdir())
    assert remade == [0, 1, 2, 3], remade  # once each, block 0 before what reads it
    with pytest.raises(daskray.ObjectLostError, match="max_retries"):
        daskray.get(no_retry, timeout=30)
    # a task reads them in place after that
    total = daskray.remote(lambda bs: float(sum(b.sum() for b in daskray.get(bs))))
    assert daskray.get(total.remote(blocks), timeout=30) == sum(i * 200_000.0 for i in range(4))


def _store_keys():
    from daskray.runtime import context

    return sorted(map(str, context.worker_session.conn.store._objects))


def _use(d, gate):
    return float(d.sum()) + gate


def _boom(x):
    raise ValueError("boom")


@pytest.mark.timeout(90)
def test_an_inline_input_of_a_task_dropped_in_the_same_turn_is_freed(no_cluster):
    import numpy as np

    daskray.init(num_workers=1)
    probe = daskray.remote(_store_keys)
    before = daskray.get(probe.remote(), timeout=30)
    for _ in range(5):  # "bad" fails while "A" is dispatched with "d" inline
        dsk = {"d": np.ones(5000), "gate": (abs, 1), "A": (_use, "d", "gate"),
               "bad": (_boom, 2), "B": (abs, "bad")}
        with pytest.raises(ValueError, match="boom"):
            daskray.get(dsk, ["A", "B"])
    assert wait_until(lambda: daskray.get(probe.remote(), timeout=30) == before, 10), (
        daskray.get(probe.remote(), timeout=30), before)


# =========================================================================== the wire


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _dealer(ctx, address, token=None):
    """A raw DEALER: without ``token`` it cannot pass the handshake's
    authentication; with it, it is as authenticated as daskray's own peers."""
    if token is not None:
        return transport.dealer(ctx, address, token)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _assert_cluster_unharmed(cluster, workers) -> None:
    time.sleep(0.3)  # let the head chew on what it got
    assert cluster.head.poll() is None, "the head process died"
    assert cluster.client.failure is None, cluster.client.failure
    assert worker_pids(cluster) == workers
    compute_works()


@pytest.mark.timeout(60)
def test_unauthenticated_garbage_is_refused(proc_cluster, zmq_ctx):
    workers = worker_pids(proc_cluster)
    sock = _dealer(zmq_ctx, proc_cluster.head_address)
    sock.send(b"garbage")
    sock.send(b"")
    sock.send_multipart([b"\x80\x05garbage", b"more", b"frames"])
    sock.send(pickle.dumps(("not", "a", "hello")))
    sock.send(P.encode(P.StopCluster()))  # a real message, but no hello first
    sock.send_multipart([P.HELLO, b"short-token", P.ROLE_CLIENT, b"x"])
    _assert_cluster_unharmed(proc_cluster, workers)
    assert sock.poll(200) == 0, "the head answered an unauthenticated peer"


@pytest.mark.timeout(60)
def test_wrong_token_is_refused(proc_cluster, zmq_ctx):
    workers = worker_pids(proc_cluster)
    wrong = bytes(b ^ 0xFF for b in proc_cluster.token)
    sock = _dealer(zmq_ctx, proc_cluster.head_address)
    sock.send_multipart(P.hello_frames(wrong, P.ROLE_CLIENT, "intruder"))
    sock.send(P.encode(P.StopCluster()))  # must not stop the cluster
    other = _dealer(zmq_ctx, proc_cluster.head_address, proc_cluster.token)
    other.send_multipart(P.hello_frames(proc_cluster.token, b"admin", "bad-role"))
    other.send(P.encode(P.StopCluster()))
    _assert_cluster_unharmed(proc_cluster, workers)
    assert sock.poll(200) == 0, "the head answered a peer with a wrong token"
    assert other.poll(0) == 0, "the head answered a peer with an unknown role"


def _framed(payload: bytes) -> bytes:
    """``payload`` with the checksum a message frame starts with."""
    import zlib
    return zlib.crc32(payload).to_bytes(4, "little") + payload


class _Pwn:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(60)
def test_a_message_naming_a_class_is_not_unpickled(proc_cluster, zmq_ctx, tmp_path):
    """Even from an authenticated peer, the head decodes plain data only: a
    message that would call a function while unpickled is refused."""
    workers = worker_pids(proc_cluster)
    marker = tmp_path / "pwned"
    sock = _dealer(zmq_ctx, proc_cluster.head_address, proc_cluster.token)
    sock.send_multipart(P.hello_frames(proc_cluster.token, P.ROLE_CLIENT, "clumsy"))
    assert sock.poll(10_000) and type(P.decode(sock.recv())) is P.Welcome
    sock.send(_framed(pickle.dumps((P.CancelRefs.TAG, [_Pwn(str(marker))]))))
    assert sock.poll(10_000)
    reply = P.decode(sock.recv())
    assert type(reply) is P.Rejected and "may not refer to" in reply.reason, reply
    assert not marker.exists()
    _assert_cluster_unharmed(proc_cluster, workers)


@pytest.mark.timeout(60)
def test_authenticated_client_sending_undecodable_frames(proc_cluster, zmq_ctx):
    workers = worker_pids(proc_cluster)
    sock = _dealer(zmq_ctx, proc_cluster.head_address, proc_cluster.token)
    sock.send_multipart(P.hello_frames(proc_cluster.token, P.ROLE_CLIENT, "clumsy"))
    assert sock.poll(10_000), "an authenticated client got no Welcome"
    assert type(P.decode(sock.recv())) is P.Welcome

    bad = [
        [b"not a pickle at all"],
        [b""],
        [_framed(b"\x80\x05\x95")],  # truncated pickle
        [_framed(b"\x80\x04cno_such_module_xyz\nThing\n.")],  # names a class
        [_framed(pickle.dumps((999, "unknown tag")))],
        [_framed(pickle.dumps("not a tuple"))],
        [_framed(pickle.dumps((P.SubmitGraph.TAG, "too", "few")))],
        [P.encode(P.StopCluster()), b"an extra frame"],
        [P.encode(P.StopCluster())[:-1]],  # cut short: the checksum fails
    ]
    for frames in bad:
        sock.send_multipart(frames)
    replies = []
    while len(replies) < len(bad) and sock.poll(5000):
        replies.append(P.decode(sock.recv()))
    assert [type(r) for r in replies] == [P.Rejected] * len(bad), replies
    assert "undecodable" in replies[0].reason
    assert "unknown message" in replies[4].reason
    _assert_cluster_unharmed(proc_cluster, workers)


@pytest.mark.timeout(60)
def test_authenticated_client_sending_a_malformed_submit(fresh_cluster, zmq_ctx):
    workers = worker_pids(fresh_cluster)
    sock = _dealer(zmq_ctx, fresh_cluster.head_address, fresh_cluster.token)
    sock.send_multipart(P.hello_frames(fresh_cluster.token, P.ROLE_CLIENT, "clumsy"))
    assert sock.poll(10_000)
    assert type(P.decode(sock.recv())) is P.Welcome
    sock.send(P.encode(P.SubmitGraph(**dict.fromkeys(P.SubmitGraph._FIELDS))))
    _assert_cluster_unharmed(fresh_cluster, workers)


@pytest.mark.timeout(60)
def test_a_dead_workers_identity_does_not_authenticate_a_new_peer(proc_cluster, tmp_path):
    """A frame from a new connection that reuses an exited worker's identity is
    not unpickled: the identity was forgotten with the worker."""
    import pickle as _pickle

    import zmq

    cluster = daskray.api._runtime.cluster
    head = psutil.Process(cluster.head.pid)
    worker = next(p for p in head.children() if "start_worker" in " ".join(p.cmdline()))
    identities_before = {w for w in cluster.client.workers}
    worker.kill()
    worker.wait(10)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ctx = zmq.Context()
    try:
        for wid in identities_before:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, wid.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.head_address)
            sock.send(_pickle.dumps(Evil()))
            sock.close(0)
        time.sleep(1.0)
    finally:
        ctx.term()
    assert not marker.exists()
    assert daskray.get({"x": (sum, [1, 2])}, "x") == 3


@daskray.remote
def _one():
    return 1


@pytest.mark.timeout(60)
def test_a_malformed_graph_from_the_driver_fails_that_graph_only(proc_cluster):
    import dataclasses

    client = daskray.api._runtime.cluster.client
    sent = []
    client.send = sent.append  # capture a real submission instead of sending it
    try:
        ref = _one.remote()
    finally:
        del client.send
    (good,) = [m for m in sent if type(m) is P.SubmitGraph]
    # the same graph, broken: node 0 depends on itself
    client.send(dataclasses.replace(good, deps=[(0,)] + list(good.deps[1:])))
    with pytest.raises(daskray.ClusterError, match=f"rejected graph {good.graph}"):
        daskray.get(ref, timeout=20)
    # the driver's connection goes on: remote calls and dask graphs still run
    assert daskray.get(_one.remote(), timeout=30) == 1
    assert daskray.get({"x": (sum, [1, 2])}, "x") == 3


@daskray.remote
def _submit_a_broken_call():
    """Inside a task: submit a call whose graph is malformed, then wait for it."""
    import dataclasses as _dc

    from daskray.runtime import context

    conn = context.worker_session.conn
    sent = []
    real_send = conn.send
    conn.send = sent.append
    try:
        ref = _one.remote()
    finally:
        conn.send = real_send
    (good,) = [m for m in sent if type(m) is P.SubmitGraph]
    conn.send(_dc.replace(good, deps=[(0,)] + list(good.deps[1:])))
    try:
        daskray.get(ref, timeout=20)
    except daskray.ClusterError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(60)
def test_a_malformed_graph_from_a_task_fails_that_call_in_the_task(proc_cluster):
    message = daskray.get(_submit_a_broken_call.remote(), timeout=40)
    assert "rejected graph" in message, message
    assert daskray.get(_one.remote(), timeout=30) == 1
