"""A session's life on the host, hardened: the sweep of stale sessions removes only
what daskray made, an interrupted ``init`` leaves nothing running, repeated
``init``/``shutdown`` leaks no descriptor, and a full store says what fills it.

The sweep tests build their temp and shared-memory directories by hand in
directories of their own (the real ``$TMPDIR`` and ``/dev/shm`` are shared with
other programs); the others run real clusters, some in a driver process of their
own.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

import daskray
from daskray.runtime import shared_memory
from daskray.runtime.cluster import OWNER_FILE, make_session_dir, sweep_stale_sessions
from helpers import start_cluster, wait_until

MB = 1 << 20
OTHER_UID = 12345
AN_HOUR_AGO = time.time() - 7200


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_old(*paths: str) -> None:
    """Set the mtime of ``paths`` (not following symlinks) two hours back."""
    for path in paths:
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO), follow_symlinks=False)


@pytest.fixture
def private_tmp(monkeypatch):
    """A temp directory of this test's own, as ``tempfile.gettempdir()``."""
    path = tempfile.mkdtemp(prefix="dr-sweep-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_shm(monkeypatch):
    """A directory standing in for ``/dev/shm``."""
    path = tempfile.mkdtemp(prefix="dr-shm-", dir="/tmp")
    monkeypatch.setattr(shared_memory, "SHM_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stale_session(driver_pid: int) -> str:
    """A session directory as daskray makes it, whose driver has gone."""
    path = make_session_dir()
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(str(driver_pid))
    os.mkdir(os.path.join(path, "spill"))
    make_old(path)
    return path


def users_directory(path: str) -> str:
    """A directory of the user's own, with files in it, untouched for two hours."""
    os.mkdir(path)
    os.mkdir(os.path.join(path, "bin"))
    with open(os.path.join(path, "bin", "python"), "w") as f:
        f.write("precious")
    make_old(os.path.join(path, "bin"), path)
    return path


# =========================================================================== the sweep


def test_the_sweep_removes_only_sessions_daskray_made(private_tmp, private_shm):
    gone = dead_pid()
    # what daskray made and whose driver is gone: swept
    stale = stale_session(gone)
    # a user's virtual environment that happens to start with daskray-
    venv = users_directory(os.path.join(private_tmp, "daskray-venv"))
    # a file of that name
    plain_file = os.path.join(private_tmp, "daskray-x")
    with open(plain_file, "w") as f:
        f.write("notes")
    make_old(plain_file)
    # a symlink to a directory elsewhere, which looks like a stale session
    elsewhere = tempfile.mkdtemp(prefix="dr-target-", dir="/tmp")
    try:
        with open(os.path.join(elsewhere, OWNER_FILE), "w") as f:
            f.write(str(gone))
        with open(os.path.join(elsewhere, shared_memory.SESSION_MARKER), "w") as f:
            f.write(open(os.path.join(stale, shared_memory.SESSION_MARKER)).read())
        link = os.path.join(private_tmp, "daskray-link")
        os.symlink(elsewhere, link)
        make_old(elsewhere, link)
        # another user's stale-looking session
        foreign = stale_session(gone)
        for root, dirs, files in os.walk(foreign):
            for name in dirs + files:
                os.chown(os.path.join(root, name), OTHER_UID, OTHER_UID)
        os.chown(foreign, OTHER_UID, OTHER_UID)

        removed = sweep_stale_sessions()

        assert removed == [stale]
        assert not os.path.exists(stale)
        assert open(os.path.join(venv, "bin", "python")).read() == "precious"
        assert open(plain_file).read() == "notes"
        assert os.path.islink(link) and os.path.isfile(os.path.join(elsewhere, OWNER_FILE))
        assert os.path.isfile(os.path.join(foreign, OWNER_FILE))
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_the_sweep_keeps_a_session_whose_driver_runs(private_tmp, private_shm):
    live = stale_session(os.getpid())
    starting = make_session_dir()  # no driver.pid yet: its maker (this process) runs
    make_old(starting)
    assert sweep_stale_sessions() == []
    assert os.path.isdir(live) and os.path.isdir(starting)


def test_the_shared_memory_sweep_removes_only_sessions_daskray_made(private_shm):
    gone = dead_pid()
    stale = shared_memory.create_session_dir(gone).rstrip("/")
    with open(os.path.join(stale, "put-1-0"), "wb") as f:
        f.write(b"x" * 100)
    live = shared_memory.create_session_dir(os.getpid()).rstrip("/")
    unmarked = users_directory(os.path.join(private_shm, f"daskray-{gone}-mine1234"))
    plain_file = os.path.join(private_shm, f"daskray-{gone}-file")
    with open(plain_file, "w") as f:
        f.write("notes")
    target = users_directory(os.path.join(private_shm, "target"))
    link = os.path.join(private_shm, f"daskray-{gone}-link1234")
    os.symlink(target, link)
    foreign = shared_memory.create_session_dir(gone).rstrip("/")
    for name in os.listdir(foreign):
        os.chown(os.path.join(foreign, name), OTHER_UID, OTHER_UID)
    os.chown(foreign, OTHER_UID, OTHER_UID)

    assert shared_memory.sweep_dead_sessions(psutil.pid_exists) == 1

    assert not os.path.exists(stale)
    assert os.path.isdir(live)
    assert open(os.path.join(unmarked, "bin", "python")).read() == "precious"
    assert open(plain_file).read() == "notes"
    assert os.path.islink(link) and os.path.isfile(os.path.join(target, "bin", "python"))
    assert os.path.isdir(foreign)


# =========================================================================== driver's runtime


@pytest.fixture
def no_runtime():
    """No daskray runtime in this process during the test; the shared cluster of
    other test modules runs again afterwards if it ran before."""
    was_running = daskray.is_initialized()
    daskray.shutdown()
    yield
    daskray.shutdown()
    if was_running:
        start_cluster()


def descriptors() -> tuple[int, int]:
    """(open descriptors of this process, how many of them are pidfds)."""
    fd_dir = "/proc/self/fd"
    kinds = []
    for name in os.listdir(fd_dir):
        try:
            kinds.append(os.readlink(os.path.join(fd_dir, name)))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return len(kinds), sum(1 for k in kinds if "pidfd" in k)


@pytest.mark.timeout(120)
def test_init_and_shutdown_cycles_leak_no_descriptor(no_runtime):
    daskray.init(num_workers=1)  # warm-up: imports, dask's own caches
    daskray.shutdown()
    total, pidfds = descriptors()
    for _ in range(3):
        daskray.init(num_workers=1)
        assert daskray.get(daskray.put(1)) == 1
        daskray.shutdown()
    assert descriptors() == (total, pidfds)


def mark_then_sleep(path: str, seconds: float) -> None:
    with open(path, "w"):
        pass
    time.sleep(seconds)


@pytest.mark.timeout(60)
def test_shutdown_tells_threads_still_waiting_that_it_was_called(no_runtime, tmp_path):
    daskray.init(num_workers=1)
    marker = str(tmp_path / "running")
    ref = daskray.remote(mark_then_sleep).remote(marker, 60)
    outcome: list = []

    def wait() -> None:
        try:
            daskray.get(ref)
        except BaseException as exc:  # noqa: BLE001 - what the thread saw is the result
            outcome.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    assert wait_until(lambda: os.path.exists(marker), 30)
    daskray.shutdown()
    thread.join(10)
    assert not thread.is_alive(), "get() still waits after shutdown()"
    (exc,) = outcome
    assert isinstance(exc, daskray.ClusterError) and "shutdown() was called" in str(exc), exc


@pytest.mark.timeout(120)
def test_a_full_store_says_what_holds_it(no_runtime):
    daskray.init(num_workers=1, object_store_memory=64 * MB)
    chunk = 20 * MB // 8
    kept_ref = daskray.put(np.full(chunk, 0))
    kept_value = daskray.get(kept_ref)  # referenced, and pinned by this value
    # values in use whose ObjectRefs were dropped at once
    loose = [daskray.get(daskray.put(np.full(chunk, i))) for i in (1, 2)]
    assert wait_until(lambda: daskray.object_store_stats()["objects"] == 1, 20), \
        daskray.object_store_stats()
    with pytest.raises(daskray.ObjectStoreFullError) as info:
        daskray.put(np.zeros(chunk))
    message = str(info.value)
    assert "an object of 20.0 MiB does not fit in its limit of 64.0 MiB" in message, message
    assert "60.0 MiB in use" in message, message
    assert "20.0 MiB in 1 object still referenced by ObjectRefs" in message, message
    assert "20.0 MiB of it pinned by live views" in message, message
    assert "40.0 MiB in 2 values in use whose ObjectRefs are gone" in message, message
    assert "object_store_memory" in message
    assert all((v == i).all() for i, v in enumerate([kept_value, *loose]))
    del kept_value, loose
    gc.collect()
    daskray.put(np.zeros(chunk))  # room again


def test_a_store_full_of_referenced_pinned_objects_says_so(tmp_path):
    from daskray.runtime.serialization import dumps_frames
    from daskray.runtime.store_memory import HostStore

    prefix = os.path.join(shared_memory.SHM_DIR, f"daskray-test-{os.getpid()}-full-")
    host = HostStore(prefix, str(tmp_path), 3 * MB)
    previous = shared_memory.store()
    shared_memory.configure(host)
    try:
        views = [shared_memory.read(shared_memory.write(
            dumps_frames(np.full(MB // 8, i)), prefix, "t")[0]) for i in range(2)]
        freed, path = shared_memory.write(dumps_frames(np.full(MB // 8, 7)), prefix, "t")
        loose = shared_memory.read(freed)
        shared_memory.unlink(path)  # its ref is gone; its value is still in use
        with pytest.raises(daskray.ObjectStoreFullError) as info:
            shared_memory.write(dumps_frames(np.zeros(MB // 8)), prefix, "t")
        message = str(info.value)
        assert "2.0 MiB in 2 objects still referenced by ObjectRefs" in message, message
        assert "2.0 MiB of it pinned by live views" in message, message
        assert "1.0 MiB in 1 value in use whose ObjectRefs are gone" in message, message
        del views, loose
    finally:
        shared_memory.configure(previous)
        shared_memory.remove_session(prefix)
        host.close()


# =========================================================================== Ctrl-C in init

INTERRUPTED_DRIVER = """
    import json, os, signal, sys, threading, time
    import psutil, daskray

    delay = float(sys.argv[1])
    # Ctrl-C raises KeyboardInterrupt here even if this process inherited SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    outcome = "not interrupted"
    try:
        try:
            print("init begins", flush=True)
            timer.start()
            daskray.init(num_workers=2)
            outcome = "started"
            timer.join()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the handler runs here at the latest
                time.sleep(0.01)
        except KeyboardInterrupt:
            outcome = "interrupted in init" if outcome == "not interrupted" else \\
                "interrupted after init"
        left_before_shutdown = [
            p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        daskray.shutdown()
    except KeyboardInterrupt:
        outcome = "interrupted in shutdown"
        left_before_shutdown = []
    children = [p.pid for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({"outcome": outcome, "children": children, "pid": os.getpid(),
                      "left_in_init": left_before_shutdown}), flush=True)
"""


def daskray_processes_of(tmpdir: str) -> list[psutil.Process]:
    """Live daskray runtime processes started with ``TMPDIR=tmpdir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "daskray.runtime" in " ".join(proc.info["cmdline"] or ()) and \
                    proc.environ().get("TMPDIR") == tmpdir and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
def test_ctrl_c_during_init_leaves_nothing(delay):
    tmpdir = tempfile.mkdtemp(prefix="dr-int-", dir="/tmp")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(INTERRUPTED_DRIVER), str(delay)],
            capture_output=True, text=True, timeout=90, env={**os.environ, "TMPDIR": tmpdir})
        lines = proc.stdout.strip().splitlines()
        assert lines and lines[0] == "init begins", proc.stderr[-3000:]
        report = json.loads(lines[-1])
        if report["outcome"] == "interrupted in init":
            assert report["left_in_init"] == [], \
                f"init raised KeyboardInterrupt, but left running: {report}"
        assert report["outcome"].startswith("interrupted"), report  # the signal arrived
        assert report["children"] == [], report
        assert daskray_processes_of(tmpdir) == []
        assert [n for n in os.listdir(tmpdir) if n.startswith("daskray-")] == []
        pid = report["pid"]
        shm = [n for n in os.listdir(shared_memory.SHM_DIR) if n.startswith(f"daskray-{pid}-")] \
            if os.path.isdir(shared_memory.SHM_DIR) else []
        assert shm == []
    finally:
        for leftover in daskray_processes_of(tmpdir):
            leftover.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)
