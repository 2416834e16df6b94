"""``daskray start --head`` / ``status`` / ``stop`` and drivers joining with
``daskray.init(address=...)``: real processes, each driver a process of its own."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest

from daskray.runtime.process import alive
from daskray.runtime.standalone import running_clusters
from daskray.runtime.store_memory import HostStore

from helpers import wait_until


@pytest.fixture(autouse=True)
def own_tmpdir(monkeypatch):
    """Clusters of these tests live under a temp directory of their own: `daskray
    stop` here must not stop a cluster the user runs meanwhile."""
    path = tempfile.mkdtemp(prefix="dr-", dir="/tmp")  # short: ipc paths have a limit
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    # a test that failed half-way must not leave its cluster running
    stray = [p for p in psutil.process_iter(["cmdline"])
             if "daskray.runtime.standalone" in " ".join(p.info["cmdline"] or ())
             and _environ(p).get("TMPDIR") == path]
    for proc in stray:
        proc.terminate()
    psutil.wait_procs(stray, timeout=20)
    leftovers = os.listdir(path)
    shutil.rmtree(path, ignore_errors=True)
    assert not stray, f"clusters left running: {stray}"
    assert not leftovers, f"files left in the temp directory: {leftovers}"


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def daskray_cmd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daskray", *args], capture_output=True,
                          text=True, timeout=timeout)


def run_driver(code: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process; its last stdout line is JSON."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def standalone(own_tmpdir):
    """A cluster started with the command line; stopped (and checked gone) after."""
    assert not running_clusters(), "a daskray cluster started by someone else is running"
    started = daskray_cmd("start", "--head", "--num-workers", "2")
    try:
        assert started.returncode == 0, started.stderr
        (info,) = running_clusters()
        assert info["address"] in started.stdout
        owner = psutil.Process(info["owner_pid"])
        processes = [owner, *owner.children(recursive=True)]
        yield info
    finally:
        stopped = daskray_cmd("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the cluster" in stopped.stdout
    gone = [p.pid for p in processes if alive(p.pid)]
    assert not gone, f"processes left after daskray stop: {gone}"
    assert not os.path.exists(info["session_dir"])
    assert not os.path.exists(info["shm_prefix"])
    assert not running_clusters()


@pytest.mark.timeout(180)
def test_drivers_join_a_started_cluster_share_its_actors_and_leave_it_running(standalone):
    address = standalone["address"]
    status = daskray_cmd("status")
    assert status.returncode == 0 and address in status.stdout and "2 workers" in status.stdout
    first = run_driver(f"""
        import json, dask, dask.array as da, numpy as np, daskray
        daskray.init(address={address!r}, namespace="cli")
        double = daskray.remote(lambda x: 2 * x)
        x = da.random.RandomState(0).random_sample((600, 600), chunks=100)
        expr = (x + x.T).sum(axis=0)
        same = bool(np.allclose(expr.compute(), expr.compute(scheduler="sync")))
        big = np.arange(10_000_000, dtype=np.float64)
        read_back = bool(np.array_equal(daskray.get(daskray.put(big)), big))

        @daskray.remote
        class Counter:
            def __init__(self):
                self.n = 0
            def inc(self):
                self.n += 1
                return self.n

        counter = Counter.options(name="counter", lifetime="detached").remote()
        print(json.dumps({{"double": daskray.get(double.remote(21)), "same": same,
                           "read_back": read_back, "count": daskray.get(counter.inc.remote())}}))
    """)
    assert last_json(first) == {"double": 42, "same": True, "read_back": True, "count": 1}
    # the first driver has gone; the cluster and its detached actor have not
    second = run_driver("""
        import json, daskray
        daskray.init(namespace="cli")  # DASKRAY_ADDRESS; the first driver's namespace
        counter = daskray.get_actor("counter")
        print(json.dumps({"count": daskray.get(counter.inc.remote())}))
        daskray.shutdown()
    """, env={"DASKRAY_ADDRESS": "auto"})
    assert last_json(second) == {"count": 2}


@pytest.fixture
def scratch():
    """A directory outside the clusters' temp directory (which must end up empty)."""
    path = tempfile.mkdtemp(prefix="dr-scratch-", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(180)
def test_status_shows_each_workers_task_and_queue(standalone, scratch):
    tmp_path = scratch
    release = tmp_path / "release"
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time, daskray
        daskray.init(address={standalone["address"]!r})

        @daskray.remote
        def hold_on(i):
            open({str(tmp_path)!r} + f"/started-{{i}}", "w").close()
            while not os.path.exists({str(release)!r}):
                time.sleep(0.01)

        daskray.get([hold_on.remote(i) for i in range(5)], timeout=120)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # two workers: two calls run, three wait (on a worker, or in the head for one)
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 2, timeout=60)
        status = daskray_cmd("status")
        assert status.returncode == 0, status.stderr
        running = re.findall(r"running (hold_on-\d+), (\d+) queued", status.stdout)
        assert len({name for name, _ in running}) == 2, status.stdout
        assert 0 < sum(int(queued) for _, queued in running) <= 3, status.stdout
    finally:
        release.touch()
        out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err[-3000:]
    idle = daskray_cmd("status")
    assert idle.stdout.count("running idle, 0 queued") == 2, idle.stdout


ROUTED_DRIVER = """
    import os, sys, threading, time, daskray

    class Watch:
        "sys.stdout that notices this driver's own line"
        def __init__(self, real):
            self.real, self.seen = real, threading.Event()
        def write(self, text):
            if "{me}-LINE" in text:
                self.seen.set()
            return self.real.write(text)
        def flush(self):
            self.real.flush()

    sys.stdout = watch = Watch(sys.stdout)
    daskray.init(address={address!r})
    open({tmp!r} + "/ready-{me}", "w").close()
    while not os.path.exists({tmp!r} + "/ready-{other}"):
        time.sleep(0.01)

    @daskray.remote
    def speak():
        print("{me}-LINE")

    daskray.get(speak.remote(), timeout=60)
    assert watch.seen.wait(60), "its own line never came"
    open({tmp!r} + "/done-{me}", "w").close()
    while not os.path.exists({tmp!r} + "/done-{other}"):  # connected until both printed
        time.sleep(0.01)
    daskray.shutdown()
"""


@pytest.mark.timeout(180)
def test_each_driver_gets_the_output_of_its_own_tasks(standalone, scratch):
    tmp_path = scratch
    drivers = {me: subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(ROUTED_DRIVER.format(
            me=me, other=other, address=standalone["address"], tmp=str(tmp_path)))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me, other in (("ALPHA", "BETA"), ("BETA", "ALPHA"))}
    outs = {me: proc.communicate(timeout=150) for me, proc in drivers.items()}
    for me, (out, err) in outs.items():
        assert drivers[me].returncode == 0, err[-3000:]
    assert "ALPHA-LINE" in outs["ALPHA"][0] and "BETA-LINE" not in outs["ALPHA"][0]
    assert "BETA-LINE" in outs["BETA"][0] and "ALPHA-LINE" not in outs["BETA"][0]


@pytest.mark.timeout(180)
def test_a_joined_driver_that_dies_frees_what_it_held(standalone):
    store = HostStore(standalone["shm_prefix"], standalone["session_dir"],
                      standalone["store_limit"])
    try:
        killed = run_driver(f"""
            import os, signal, sys, numpy as np, daskray
            daskray.init(address={standalone["address"]!r})
            held = daskray.put(np.ones(10_000_000))
            assert daskray.object_store_stats()["used"] >= 80_000_000
            print("holding", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        assert killed.returncode == -9 and "holding" in killed.stdout, killed.stderr[-2000:]
        # the head watches a joined driver's pid: its objects go when it does
        assert wait_until(lambda: store.stats()["used"] == 0, timeout=20), store.stats()
        polite = run_driver(f"""
            import json, numpy as np, daskray
            daskray.init(address={standalone["address"]!r})
            held = daskray.put(np.ones(10_000_000))
            daskray.shutdown()  # disconnects: the cluster goes on, the object goes
            print(json.dumps({{"initialized": daskray.is_initialized()}}))
        """)
        assert last_json(polite) == {"initialized": False}
        assert wait_until(lambda: store.stats()["used"] == 0, timeout=20), store.stats()
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_joining_without_a_cluster_or_with_a_bad_address_says_what_to_do():
    assert not running_clusters()
    proc = run_driver("""
        import json, dask, daskray
        dask.config.set({"distributed.comm.timeouts.connect": "2s"})
        out = {}
        for address in ("auto", "10.0.0.1:6379", "tcp://127.0.0.1:1",
                        "/nonexistent/daskray-x/head.sock"):
            try:
                daskray.init(address=address)
            except daskray.ClusterError as exc:
                out[address] = str(exc)
        try:
            daskray.init(address="auto", num_workers=2)
        except ValueError as exc:
            out["num_workers"] = str(exc)
        print(json.dumps(out))
    """)
    out = last_json(proc)
    assert "daskray start --head" in out["auto"]
    assert "not the address of a daskray cluster" in out["10.0.0.1:6379"]
    assert "dask scheduler's address" in out["10.0.0.1:6379"]
    # a dask scheduler's address where none runs: said after dask's connect timeout
    assert "could not reach the dask scheduler" in out["tcp://127.0.0.1:1"]
    assert "no running daskray cluster" in out["/nonexistent/daskray-x/head.sock"]
    assert "cannot change them" in out["num_workers"]
    stop = daskray_cmd("stop")
    assert stop.returncode == 0 and "no running cluster" in stop.stdout
    joining = daskray_cmd("start", "--address", "10.0.0.1:6379")
    assert joining.returncode == 2 and "dask.distributed cluster" in joining.stderr
    for bad, says in ((["--num-workers", "0"], "at least 1"), (["--resources", "{x"], "not JSON"),
                      (["--object-store-memory", "lots"], "give bytes")):
        refused = daskray_cmd("start", "--head", *bad)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
    assert not running_clusters()


def test_only_a_private_cluster_file_of_a_running_owner_is_trusted(own_tmpdir):
    from daskray.errors import ClusterError
    from daskray.runtime.standalone import find_cluster

    session = os.path.join(own_tmpdir, "daskray-planted")
    os.mkdir(session, 0o700)
    info = {"address": f"ipc://{session}/head.sock", "session_dir": session,
            "shm_prefix": session + "/shm/", "owner_pid": os.getpid(), "started": 0}
    path = os.path.join(session, "cluster.json")
    with open(path, "w") as f:
        json.dump(info, f)
    os.chmod(path, 0o600)
    # a well-formed file, but no owner holds its lock (a dead owner, a reused pid)
    with pytest.raises(ClusterError, match="has stopped"):
        find_cluster(session)
    assert running_clusters() == []
    for mode in (0o755, 0o711):  # anyone else could have planted it
        os.chmod(session, mode)
        with pytest.raises(ClusterError, match="only you could have written"):
            find_cluster(info["address"])
    os.chmod(session, 0o700)
    os.chmod(path, 0o644)
    with pytest.raises(ClusterError, match="only you could have written"):
        find_cluster(info["address"])
    shutil.rmtree(session)


@pytest.mark.timeout(120)
def test_a_cluster_whose_head_dies_stops_and_keeps_its_log(own_tmpdir):
    started = daskray_cmd("start", "--head", "--num-workers", "1")
    assert started.returncode == 0, started.stderr
    (info,) = running_clusters()
    owner = psutil.Process(info["owner_pid"])
    processes = [owner, *owner.children(recursive=True)]
    os.kill(info["head_pid"], 9)
    assert wait_until(lambda: not any(alive(p.pid) for p in processes), 30)
    assert not os.path.exists(info["session_dir"]) and not running_clusters()
    (log,) = [p for p in os.listdir(own_tmpdir) if p.startswith("daskray-crashed-")]
    status = daskray_cmd("status")
    assert os.path.join(own_tmpdir, log) in status.stdout
    with open(os.path.join(own_tmpdir, log)) as f:
        assert "the head process exited" in f.read()
    os.remove(os.path.join(own_tmpdir, log))


# =========================================================================== hardening


@pytest.mark.timeout(180)
def test_shutdown_of_a_joined_driver_wakes_threads_waiting_for_results(standalone):
    from daskray.runtime import shared_memory
    from daskray.runtime.cluster import sweep_stale_sessions

    # the session of a `daskray start` cluster is marked like a driver's, and kept
    assert shared_memory.marked_session(standalone["session_dir"]) is not None
    assert sweep_stale_sessions() == [] and os.path.isdir(standalone["session_dir"])
    proc = run_driver(f"""
        import json, os, sys, tempfile, threading, time, dask, daskray

        marks = tempfile.mkdtemp(dir=os.environ["TMPDIR"], prefix="marks-")

        def running_long(name):
            open(os.path.join(marks, name), "w").close()
            time.sleep(60)
            return name

        daskray.init(address={standalone["address"]!r})
        waiting = {{
            "get": lambda: daskray.get(daskray.remote(running_long).remote("get")),
            "compute": lambda: dask.delayed(running_long)("compute").compute(),
        }}
        outcome = {{}}

        def wait(name):
            try:
                waiting[name]()
                outcome[name] = "returned"
            except BaseException as exc:
                outcome[name] = type(exc).__name__

        threads = [threading.Thread(target=wait, args=(n,), daemon=True) for n in waiting]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(os.listdir(marks)) == 2, "the tasks did not start"
        t0 = time.monotonic()
        daskray.shutdown()
        for t in threads:
            t.join(max(0.0, t0 + 10 - time.monotonic()))
        outcome["seconds"] = time.monotonic() - t0
        for name in os.listdir(marks):
            os.remove(os.path.join(marks, name))
        os.rmdir(marks)
        print(json.dumps(outcome), flush=True)
    """, timeout=150)
    out = last_json(proc)
    assert out.get("get") == "ClusterError" and out.get("compute") == "ClusterError", out
    assert out["seconds"] < 5, out


@pytest.mark.timeout(120)
def test_a_crash_log_is_private_and_a_name_planted_for_it_is_not_followed(own_tmpdir):
    import stat

    started = daskray_cmd("start", "--head", "--num-workers", "1")
    assert started.returncode == 0, started.stderr
    (info,) = running_clusters()
    assert stat.S_IMODE(os.lstat(info["log"]).st_mode) == 0o600, "tasks' output goes there"
    victim = os.path.join(own_tmpdir, "victim.txt")
    with open(victim, "w") as f:
        f.write("untouched")
    planted = os.path.join(own_tmpdir, f"daskray-crashed-{info['owner_pid']}.log")
    os.symlink(victim, planted)
    owner = psutil.Process(info["owner_pid"])
    processes = [owner, *owner.children(recursive=True)]
    os.kill(info["head_pid"], 9)
    assert wait_until(lambda: not any(alive(p.pid) for p in processes), 30)
    try:
        assert os.path.islink(planted) and os.readlink(planted) == victim
        assert open(victim).read() == "untouched"
        (log,) = [os.path.join(own_tmpdir, n) for n in os.listdir(own_tmpdir)
                  if n.startswith("daskray-crashed-") and not os.path.islink(
                      os.path.join(own_tmpdir, n))]
        st = os.lstat(log)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with open(log) as f:
            assert "the head process exited" in f.read()
        status = daskray_cmd("status")
        assert log in status.stdout and planted not in status.stdout, status.stdout
    finally:
        for path in (planted, victim, *[os.path.join(own_tmpdir, n) for n in os.listdir(
                own_tmpdir) if n.startswith("daskray-crashed-")]):
            if os.path.lexists(path):
                os.remove(path)


def test_status_lists_only_crash_logs_a_cluster_of_this_user_left(own_tmpdir):
    def make(name: str, mode: int = 0o600, uid: int | None = None) -> str:
        path = os.path.join(own_tmpdir, name)
        with open(path, "w") as f:
            f.write("a log\n")
        os.chmod(path, mode)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    genuine = make("daskray-crashed-116.log")
    planted = [
        make("daskray-crashed-113.log", uid=12345),  # another user's
        make("daskray-crashed-abc.log"),  # not the shape daskray makes
        make("daskray-crashed-115.log", mode=0o644),  # readable by all: not daskray's
    ]
    notes = make("notes.txt")
    os.symlink(notes, os.path.join(own_tmpdir, "daskray-crashed-111.log"))
    os.symlink(os.path.join(own_tmpdir, "nowhere"), os.path.join(own_tmpdir,
                                                                   "daskray-crashed-112.log"))
    os.mkdir(os.path.join(own_tmpdir, "daskray-crashed-114.log"), 0o700)
    try:
        status = daskray_cmd("status")
        assert "Traceback" not in status.stderr, status.stderr
        listed = [line.rsplit(" ", 1)[1] for line in status.stdout.splitlines()
                  if "its log:" in line]
        assert listed == [genuine], (listed, planted)
    finally:
        for name in os.listdir(own_tmpdir):
            path = os.path.join(own_tmpdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)


MALFORMED_DRIVER = """
    import contextlib, fcntl, io, json, math, os, sys, time
    import daskray
    from daskray import cli

    session = sys.argv[1]
    good = {"address": f"ipc://{session}/head.sock", "token": "ab" * 32,
            "session_dir": session, "shm_prefix": session + "/shm/",
            "store_limit": 1 << 26, "num_workers": 1, "owner_pid": os.getpid(),
            "head_pid": os.getpid(), "log": session + "/cluster.log",
            "started": time.time(), "resources": None}
    cases = {"not JSON": b"{not json", "a list": b"[]", "null": b"null",
             "a string": b'"a string"', "empty": b"{}", "not UTF-8": b"\\xff\\xfe{"}
    for key, bad in [("token", 5), ("token", "zz"), ("head_pid", "x"),
                     ("store_limit", "lots"), ("started", "yesterday"),
                     ("started", math.nan), ("num_workers", None), ("num_workers", True),
                     ("shm_prefix", 7), ("resources", "gpu"), ("owner_pid", -3)]:
        cases[f"{key}={bad!r}"] = json.dumps({**good, key: bad}).encode()
    for key in ("address", "token", "session_dir", "started"):
        cases[f"no {key}"] = json.dumps({k: v for k, v in good.items() if k != key}).encode()

    path = os.path.join(session, "cluster.json")
    report = {}
    for case, data in cases.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.close(fd)
        outcome = report[case] = {}
        for address in ("auto", session):
            try:
                daskray.init(address=address)
                outcome[address] = "joined"
                daskray.shutdown()
            except daskray.ClusterError as exc:  # MalformedClusterFile is one
                outcome[address] = ["ClusterError", str(exc)]
            except BaseException as exc:
                outcome[address] = [type(exc).__name__, str(exc)]
        for command in ("status", "stop"):
            out, err = io.StringIO(), io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = cli.main([command])
                outcome[command] = [code, err.getvalue()]
            except BaseException as exc:
                outcome[command] = [type(exc).__name__, str(exc)]
    print(json.dumps(report), flush=True)
"""


@pytest.mark.timeout(120)
def test_a_malformed_cluster_file_is_a_cluster_error_that_names_it(own_tmpdir):
    import fcntl

    from daskray.runtime.cluster import make_session_dir

    session = make_session_dir()
    lock = os.open(os.path.join(session, "owner.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as if its owner ran
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MALFORMED_DRIVER), session],
                              capture_output=True, text=True, timeout=100)
        report = last_json(proc)
        path = os.path.join(session, "cluster.json")
        assert len(report) >= 20
        for case, outcome in report.items():
            for address in ("auto", session):
                kind, message = outcome[address]
                assert kind == "ClusterError" and path in message and "malformed" in message, \
                    (case, address, outcome[address])
            for command in ("status", "stop"):
                code, err = outcome[command]
                assert code == 1 and path in err and "malformed" in err, (case, command, err)
    finally:
        os.close(lock)
        shutil.rmtree(session)
