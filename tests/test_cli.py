"""``daskray start --head`` / ``status`` / ``stop`` and drivers joining with
``daskray.init(address=...)``: real processes, each driver a process of its own."""

from __future__ import annotations

import json
import os
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
        daskray.init(address={address!r})
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
        daskray.init()  # DASKRAY_ADDRESS
        counter = daskray.get_actor("counter")
        print(json.dumps({"count": daskray.get(counter.inc.remote())}))
        daskray.shutdown()
    """, env={"DASKRAY_ADDRESS": "auto"})
    assert last_json(second) == {"count": 2}


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
        import json, daskray
        out = {}
        for address in ("auto", "tcp://10.0.0.1:6379", "/nonexistent/daskray-x/head.sock"):
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
    assert "not the address of a daskray cluster" in out["tcp://10.0.0.1:6379"]
    assert "no running daskray cluster" in out["/nonexistent/daskray-x/head.sock"]
    assert "cannot change them" in out["num_workers"]
    stop = daskray_cmd("stop")
    assert stop.returncode == 0 and "no running cluster" in stop.stdout
    joining = daskray_cmd("start", "--address", "10.0.0.1:6379")
    assert joining.returncode == 2 and "one machine" in joining.stderr
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
