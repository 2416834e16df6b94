"""The shared-memory data plane (issue 3), on real processes.

Large objects are written once into a file ``/dev/shm/daskray-<driver pid>-<session>-...``
and every process on the host -- tasks on the workers, the driver -- maps it read-only
and reads it in place.  These tests check, with the processes' own accounting
(``/proc/<pid>/status``, psutil's USS) and the files in ``/dev/shm``:

* one copy per host: a 1 GiB ``put`` read by 4 tasks on 2 workers is one file, the
  store counts it once, and no process makes a private copy; reads are bit-exact;
* zero-copy reads in the driver: read-only arrays backed by the mapping, and a
  100 MB object is read about as fast as a 1 KB one;
* a worker's large result is exported once, however often the driver reads it;
* pandas frames and ``dd.from_pandas`` partitions go the same way (and the graph
  message stays small);
* objects that pickle in-band (bytes, datetime64) are in their file too, not inline;
* lifetime: dropping the refs unlinks the file while live views keep reading
  correct data; nothing of a session survives ``shutdown()``, a dead writer, or
  -- after a SIGKILLed cluster -- the next ``init()``; a live session is never swept.

Most tests share the session's two-worker ``cluster``; those that stop it or need
one of their own (``own_cluster``, ``no_cluster``) leave a fresh two-worker cluster
running when they end.  Task functions live at module level.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest

import daskray
from helpers import NUM_WORKERS, start_cluster, wait_until
import daskray.api
from daskray.runtime import protocol as P
from daskray.runtime.client import Client
from daskray.runtime.cluster import sweep_stale_sessions

MB = 1 << 20
SHM_DIR = "/dev/shm"

pytestmark = pytest.mark.skipif(
    not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)),
    reason="needs a writable /dev/shm")


# =========================================================================== helpers




def current_cluster():
    return daskray.api._runtime.cluster


def session_files(prefix: str | None = None) -> set[str]:
    """The /dev/shm files of one session (default: the running cluster's)."""
    prefix = prefix or current_cluster().shm_prefix
    return {p for p in glob.glob(glob.escape(prefix) + "*") if os.path.isfile(p)}


def mmap_backed(arr) -> bool:
    """Whether ``arr``'s memory belongs to an ``mmap`` (its ``.base`` chain reaches one)."""
    obj = arr
    for _ in range(64):
        if obj is None:
            return False
        if isinstance(obj, mmap.mmap):
            return True
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return False
    return False


def memory(pid: int) -> dict[str, int]:
    """USS and RSS (psutil) and RssAnon / RssShmem (the kernel's split of RSS) in bytes.

    A private copy of an object lands in anonymous memory (RssAnon, and USS); pages
    of a /dev/shm file mapped by the process count in RssShmem.
    """
    proc = psutil.Process(pid)
    info = proc.memory_full_info()
    out = {"uss": info.uss, "rss": info.rss}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker_pids() -> set[int]:
    head = psutil.Process(current_cluster().head.pid)
    return {p.pid for p in head.children() if p.status() != psutil.STATUS_ZOMBIE}


def digest(buf) -> str:
    return hashlib.blake2b(memoryview(buf).cast("B")).hexdigest()


def random_array(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, np.iinfo(np.uint64).max, size=nbytes // 8, dtype=np.uint64)


def gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


# =========================================================================== tasks


@daskray.remote
def read_and_measure(arr, pause):
    """Read every byte of ``arr`` (a digest), then report this worker's memory."""
    import hashlib as _hashlib
    import os as _os
    import time as _time

    h = _hashlib.blake2b(memoryview(arr).cast("B")).hexdigest()
    _time.sleep(pause)  # long enough that the four calls spread over both workers
    return {
        "pid": _os.getpid(),
        "digest": h,
        "writeable": bool(arr.flags.writeable),
        "mmap_backed": mmap_backed(arr),
        "memory": memory(_os.getpid()),
    }


@daskray.remote
def make_random(nbytes, seed):
    return random_array(nbytes, seed)


@daskray.remote
def make_random_with_pid(nbytes, seed):
    return os.getpid(), random_array(nbytes, seed)


@daskray.remote
def in_band_digest(value):
    return digest(value if isinstance(value, bytes) else value.view(np.int64))


# =========================================================================== fixtures


@pytest.fixture
def own_cluster(cluster):
    """A cluster of this test's own; afterwards the shared two-worker one runs again."""
    daskray.shutdown()
    start_cluster()
    try:
        yield current_cluster()
    finally:
        daskray.shutdown()
        start_cluster()


@pytest.fixture
def no_cluster(cluster):
    """No cluster runs in this process; afterwards the shared two-worker one runs again."""
    daskray.shutdown()
    try:
        yield
    finally:
        daskray.shutdown()
        start_cluster()


# =========================================================================== one copy


@pytest.mark.timeout(240)
def test_put_read_by_four_tasks_on_two_workers_is_one_bit_exact_copy(cluster):
    size = 1024 * MB
    big = random_array(size, seed=1)
    expected = digest(big)
    workers = worker_pids()
    assert len(workers) == NUM_WORKERS
    # warm-up on both workers: importing this module (pandas, psutil...) is not the object
    warm = daskray.get([read_and_measure.remote(np.zeros(8), 0.2) for _ in range(4)])
    assert {r["pid"] for r in warm} == workers
    before_files = session_files()
    baseline = {pid: memory(pid) for pid in workers}

    stats_before = daskray.object_store_stats()
    ref = daskray.put(big)
    new = session_files() - before_files
    stats = daskray.object_store_stats()
    # the store counts it once, in memory
    assert stats["objects"] == stats_before["objects"] + 1
    assert size <= stats["used"] - stats_before["used"] < size + 64 * 1024
    assert stats["spilled_objects"] == stats_before["spilled_objects"]
    assert len(new) == 1, f"a put should write exactly one file, wrote {sorted(new)}"
    (path,) = new
    assert size <= os.path.getsize(path) < size + 64 * 1024

    # The driver holds a read view with every page touched.  smaps (hence USS) calls
    # a page "private" while only one process maps it, so without a second mapper
    # the first worker to read the file would see its pages as private although
    # they are the shared file's; with it, a shared page is counted as shared.
    view = daskray.get(ref)
    assert digest(view) == expected

    reports = daskray.get([read_and_measure.remote(ref, 0.3) for _ in range(4)])
    after = {pid: memory(pid) for pid in workers}

    # bit-exact, and read in place in every task
    assert [r["digest"] for r in reports] == [expected] * 4
    assert all(not r["writeable"] and r["mmap_backed"] for r in reports), reports
    assert {r["pid"] for r in reports} == workers, "the 4 tasks did not run on both workers"

    # one copy: no other file appeared, none was written by a worker
    assert session_files() - before_files == {path}
    assert daskray.object_store_stats()["used"] == stats["used"]

    for r in reports:
        base = baseline[r["pid"]]
        mem = r["memory"]
        # every page was read from the shared file ...
        assert mem["RssShmem"] - base["RssShmem"] >= 0.9 * size, (r["pid"], mem, base)
        # ... and no private copy was made of it
        assert mem["RssAnon"] - base["RssAnon"] < size / 8, (r["pid"], mem, base)
        assert mem["uss"] - base["uss"] < size / 8, (r["pid"], mem, base)
    uss_growth = sum(after[p]["uss"] - baseline[p]["uss"] for p in workers)
    rss_growth = sum(after[p]["rss"] - baseline[p]["rss"] for p in workers)
    assert uss_growth < size / 4, (baseline, after)
    # RSS counts the shared pages once per mapping process: at most one size each
    assert rss_growth < (NUM_WORKERS + 0.5) * size, (baseline, after)
    del view, ref


# =========================================================================== zero-copy reads


@pytest.mark.timeout(60)
def test_driver_get_of_a_put_is_zero_copy(cluster):
    big = np.arange(100 * MB // 8, dtype=np.float64)
    small = np.arange(1024 // 8, dtype=np.float64)
    before = session_files()
    big_ref, small_ref = daskray.put(big), daskray.put(small)
    assert len(session_files() - before) == 1  # the 1 KB one travels inline

    got = daskray.get(big_ref)
    np.testing.assert_array_equal(got, big)
    assert not got.flags.writeable
    assert not got.flags.owndata
    assert mmap_backed(got), "the array's memory is not the shared mapping"
    with pytest.raises(ValueError):
        got[0] = -1.0
    np.testing.assert_array_equal(daskray.get(small_ref), small)

    def median_get_seconds(ref, n=21):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            daskray.get(ref)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    median_get_seconds(big_ref, 3), median_get_seconds(small_ref, 3)  # warm up
    t_big, t_small = median_get_seconds(big_ref), median_get_seconds(small_ref)
    assert t_big <= 10 * t_small, (
        f"getting 100 MB took {t_big * 1e6:.0f} us, 1 KB {t_small * 1e6:.0f} us: not zero-copy")
    # reading creates nothing in /dev/shm
    assert len(session_files() - before) == 1
    del got


@pytest.mark.timeout(60)
def test_large_task_result_read_twice_reuses_its_shm_file(cluster):
    size = 40 * MB
    expected = random_array(size, seed=7)
    ref = make_random.remote(size, 7)
    daskray.wait([ref], timeout=30)
    before = session_files()

    first = daskray.get(ref)
    new = session_files() - before
    assert len(new) == 1, f"the driver's read should export the result once: {sorted(new)}"
    (path,) = new
    assert os.path.basename(path).startswith("w-"), path  # written by the worker holding it

    second = daskray.get(ref)
    assert session_files() - before == {path}, "the second get wrote another copy"
    for arr in (first, second):
        np.testing.assert_array_equal(arr, expected)
        assert not arr.flags.writeable and mmap_backed(arr)
    del first, second, ref


@pytest.fixture
def two_named_workers(cluster):
    """Workers told apart by resources ``a`` and ``b``; afterwards the shared cluster."""
    daskray.shutdown()
    start_cluster(resources=[{"a": 1}, {"b": 1}])
    try:
        yield
    finally:
        daskray.shutdown()
        start_cluster()


@pytest.mark.timeout(120)
def test_a_large_task_result_read_by_four_tasks_on_two_workers_is_one_copy(two_named_workers):
    size = 256 * MB
    on = {w: {"resources": {w: 1}} for w in "ab"}
    warm = daskray.get([read_and_measure.options(**on[w]).remote(np.zeros(8), 0) for w in "ab"])
    pids = {w: r["pid"] for w, r in zip("ab", warm)}
    ref = make_random.options(**on["a"]).remote(size, 11)
    daskray.wait([ref], timeout=60)
    before = session_files()
    baseline = {pid: memory(pid) for pid in pids.values()}
    reports = daskray.get([read_and_measure.options(**on[w]).remote(ref, 0) for w in "abab"])
    expected = digest(random_array(size, seed=11))
    assert [r["digest"] for r in reports] == [expected] * 4
    assert [r["pid"] for r in reports] == [pids[w] for w in "abab"]
    new = session_files() - before
    assert len(new) == 1, f"one shared copy for the other worker's readers: {sorted(new)}"
    for r in reports:
        mem, base = r["memory"], baseline[r["pid"]]
        # the maker reads its own object in place; the other maps the shared copy
        assert mem["RssAnon"] - base["RssAnon"] < size / 8, (r["pid"], mem, base)
    assert reports[1]["mmap_backed"] and reports[3]["mmap_backed"]
    del ref


@pytest.mark.timeout(60)
def test_pandas_dataframe_put_get_round_trip(cluster):
    n = 500_000
    rng = np.random.default_rng(3)
    df = pd.DataFrame({
        "i": np.arange(n, dtype=np.int64),
        "f": rng.random(n),
        "b": np.arange(n) % 3 == 0,
        "s": [f"name-{i % 1000}" for i in range(n)],
        "c": pd.Categorical(np.arange(n) % 7),
    }, index=pd.RangeIndex(n) * 2)
    before = session_files()
    ref = daskray.put(df)
    assert len(session_files() - before) == 1

    got = daskray.get(ref)
    pd.testing.assert_frame_equal(got, df, check_exact=True)
    # numpy-backed columns are read-only views of the shared mapping
    for col in ("i", "f", "b"):
        values = got[col].to_numpy()
        assert not values.flags.writeable, col
        assert mmap_backed(values), f"column {col!r} was copied"
    codes = got["c"].array.codes
    assert mmap_backed(codes), "the categorical's codes were copied"
    # the original is untouched and a second read agrees
    pd.testing.assert_frame_equal(daskray.get(ref), df, check_exact=True)
    del got, ref


# =========================================================================== lifetime


@pytest.mark.timeout(60)
def test_dropping_the_refs_unlinks_the_files(cluster):
    before = session_files()
    ref = daskray.put(random_array(32 * MB, seed=11))
    (put_path,) = session_files() - before
    result = make_random.remote(32 * MB, 12)
    value = daskray.get(result)
    (export_path,) = session_files() - before - {put_path}
    del value  # no view left either: only the refs' drop is tested here

    del ref
    gc.collect()
    assert wait_until(lambda: not os.path.exists(put_path), 5), (
        f"{put_path} still exists 5 s after its only ref was dropped")
    assert os.path.exists(export_path)  # the other object is still referenced
    del result
    gc.collect()
    assert wait_until(lambda: not os.path.exists(export_path), 5), (
        f"{export_path} (a worker's exported result) still exists 5 s after its ref was dropped")
    assert not session_files() - before


@pytest.mark.timeout(60)
def test_a_view_kept_after_the_object_was_freed_still_reads_correct_data(cluster):
    size = 32 * MB
    expected_put = random_array(size, seed=21)
    expected_result = random_array(size, seed=22)
    before = session_files()
    put_ref = daskray.put(expected_put)
    result_ref = make_random.remote(size, 22)
    put_view = daskray.get(put_ref)
    result_view = daskray.get(result_ref)
    paths = session_files() - before
    assert len(paths) == 2

    del put_ref, result_ref
    gc.collect()
    assert wait_until(lambda: not any(os.path.exists(p) for p in paths), 5), (
        "the freed objects' files were not unlinked")
    # new objects of the same size may reuse nothing of the unlinked files' pages
    other = daskray.put(random_array(size, seed=23))
    other_result = make_random.remote(size, 24)
    daskray.get(other_result)
    for view, expected in ((put_view, expected_put), (result_view, expected_result)):
        np.testing.assert_array_equal(view, expected)
        assert digest(view) == digest(expected)
    del other, other_result, put_view, result_view


@pytest.mark.timeout(60)
def test_shutdown_leaves_no_file_of_the_session(own_cluster):
    prefix = own_cluster.shm_prefix
    expected = random_array(16 * MB, seed=31)
    ref = daskray.put(expected)
    result = make_random.remote(16 * MB, 32)
    view = daskray.get(result)
    files = session_files(prefix)
    assert len(files) == 2 and any(os.path.basename(f).startswith("w-") for f in files), files

    daskray.shutdown()
    assert session_files(prefix) == set(), "shutdown() left shared-memory files behind"
    assert glob.glob(f"{SHM_DIR}/daskray-{os.getpid()}-*") == [], (
        "a cluster this process started left files behind")
    # a view the driver still holds reads on from its mapping
    np.testing.assert_array_equal(view, random_array(16 * MB, seed=32))
    del ref, result, view


@pytest.mark.timeout(60)
def test_files_a_worker_wrote_go_when_it_dies(own_cluster):
    result = make_random_with_pid.remote(16 * MB, 41)
    pid, view = daskray.get(result)
    written = {f for f in session_files() if os.path.basename(f).startswith(f"w-{pid}-")}
    assert len(written) == 1, session_files()

    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(os.path.exists(f) for f in written), 5), (
        f"{sorted(written)} outlived the worker {pid} that wrote them")
    np.testing.assert_array_equal(view, random_array(16 * MB, seed=41))
    del result, view


DRIVER_SCRIPT = textwrap.dedent("""
    import glob, json, os, sys, time

    import numpy as np
    import psutil

    import daskray


    def make(nbytes):
        return np.full(nbytes, 5, dtype=np.uint8)


    daskray.init(num_workers=2)
    cluster = daskray.api._runtime.cluster
    ref = daskray.put(np.arange(4 * 2**20, dtype=np.int64))
    result = daskray.remote(make).remote(16 * 2**20)
    view = daskray.get(result)
    head = psutil.Process(cluster.head.pid)
    print(json.dumps({
        "driver": os.getpid(),
        "head": head.pid,
        "workers": [p.pid for p in head.children()],
        "prefix": cluster.shm_prefix,
        "files": sorted(glob.glob(cluster.shm_prefix + "*")),
    }), flush=True)
    time.sleep(600)
""")


def start_driver(path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_info(proc: subprocess.Popen, timeout: float = 45.0) -> dict:
    box: dict = {}
    reader = threading.Thread(target=lambda: box.update(line=proc.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not box.get("line"):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the driver script printed nothing within {timeout} s; stderr:\n{err}")
    return json.loads(box["line"])


@pytest.mark.timeout(90)
def test_next_init_sweeps_a_sigkilled_session_but_never_a_live_one(no_cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT)
    victim, survivor = start_driver(script), start_driver(script)
    survivor_info = None
    try:
        info, survivor_info = read_info(victim), read_info(survivor)
        for facts in (info, survivor_info):
            assert len(facts["files"]) == 2, facts  # the put and the worker's export
            names = [os.path.basename(f) for f in facts["files"]]
            assert any(n.startswith("put-") for n in names), facts
            assert any(n.startswith("w-") for n in names), facts
        # the victim's whole cluster dies at once, head first: nobody cleans up
        for pid in [info["head"], *info["workers"], info["driver"]]:
            os.kill(pid, signal.SIGKILL)
        victim.wait(10)
        for pid in [info["head"], *info["workers"]]:
            assert wait_until(lambda: gone_or_zombie(pid), 5), f"pid {pid} survived SIGKILL"
        assert all(os.path.exists(f) for f in info["files"]), (
            "the SIGKILLed session left nothing: the test cannot check the sweep")

        start_cluster()
        left = [f for f in info["files"] if os.path.exists(f)]
        assert not left, f"init() did not sweep the dead session's files: {left}"
        assert session_files(info["prefix"]) == set()
        # a live session -- another driver's, and this one's -- is never swept
        ref = daskray.put(random_array(8 * MB, seed=51))
        mine = session_files()
        assert len(mine) == 1
        sweep_stale_sessions()
        assert all(os.path.exists(f) for f in survivor_info["files"]), (
            "the sweep removed files of a live driver's session")
        assert session_files() == mine, "the sweep removed files of this session"
        np.testing.assert_array_equal(daskray.get(ref), random_array(8 * MB, seed=51))

        # the survivor's driver dies alone: its head removes the session's files
        os.kill(survivor_info["driver"], signal.SIGKILL)
        survivor.wait(10)
        assert wait_until(lambda: not session_files(survivor_info["prefix"]), 10), (
            "the head of a SIGKILLed driver left its session's files")
        del ref
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if survivor_info is not None:  # never leave a live-looking session behind
            for pid in [survivor_info["head"], *survivor_info["workers"]]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# =========================================================================== dask graphs


@pytest.mark.timeout(60)
def test_dask_dataframe_partitions_go_through_shared_memory(cluster, monkeypatch):
    import dask.dataframe as dd

    n = 2_000_000
    rng = np.random.default_rng(61)
    pdf = pd.DataFrame({
        "k": rng.integers(0, 97, n),
        "x": rng.random(n),
        "y": np.arange(n, dtype=np.int64),
        "tag": pd.array([f"t{i % 13}" for i in range(n)], dtype="str"),
        # datetime64 pickles in-band: that part of a partition goes into its file too
        "t": pd.date_range("2000-01-01", periods=n, freq="s"),
    })
    frame_bytes = int(pdf.memory_usage(deep=False).sum())
    assert frame_bytes > 40 * MB
    ddf = dd.from_pandas(pdf, npartitions=4)

    sent = []
    real_send = Client.send

    def spy(self, msg):
        if type(msg) is P.SubmitGraph:
            shared = dict(msg.shared or {})
            sent.append({"size": len(P.encode(msg)), "shared": shared,
                         "existed": all(os.path.exists(p) for p in shared.values())})
        return real_send(self, msg)

    monkeypatch.setattr(Client, "send", spy)
    by_key = ddf.groupby("k")[["x", "y"]].sum().compute()
    by_tag = ddf.groupby("tag").agg({"x": "mean", "y": "max", "t": "max"}).compute()
    monkeypatch.undo()

    pd.testing.assert_frame_equal(
        by_key, ddf.groupby("k")[["x", "y"]].sum().compute(scheduler="sync"))
    pd.testing.assert_frame_equal(
        by_tag, ddf.groupby("tag").agg({"x": "mean", "y": "max", "t": "max"}).compute(scheduler="sync"))
    pd.testing.assert_frame_equal(by_key, pdf.groupby("k")[["x", "y"]].sum())

    assert len(sent) == 2, sent
    for graph in sent:
        # the partitions are not inline: the message is a tiny fraction of the frame
        assert graph["size"] < 256 * 1024, (
            f"the graph message is {graph['size']} bytes for a {frame_bytes}-byte frame")
        assert len(graph["shared"]) == 4, graph  # each partition in its own file
        assert graph["existed"], graph
    paths = {p for graph in sent for p in graph["shared"].values()}
    assert wait_until(lambda: not any(os.path.exists(p) for p in paths), 5), (
        "the partitions' files outlived their graphs")


# =========================================================================== in-band pickles


@pytest.mark.parametrize("kind", ["bytes", "datetime64"])
@pytest.mark.timeout(60)
def test_a_large_put_that_pickles_in_band_goes_to_its_file_not_inline(cluster, monkeypatch, kind):
    """bytes, lists, object columns and numpy datetime64 arrays pickle in-band: the
    pickle header is the whole object, and it must go into the file, not travel
    inline in the messages (to the head, and from the head to every reader)."""
    size = 32 * MB
    value = (b"\x01" * size if kind == "bytes"
             else np.arange(size // 8, dtype=np.int64).astype("datetime64[ns]"))
    expected = digest(value if kind == "bytes" else value.view(np.int64))
    sent = []
    real_send = Client.send

    def spy(self, msg):
        if type(msg) is P.PutObject:
            sent.append(len(P.encode(msg)))
        return real_send(self, msg)

    monkeypatch.setattr(Client, "send", spy)
    before = session_files()
    ref = daskray.put(value)
    monkeypatch.undo()
    new = session_files() - before
    assert len(new) == 1, new
    (path,) = new
    assert sent and sent[0] < 64 * 1024, (
        f"the put sent {sent[0]} bytes to the head for a {size}-byte object")
    assert os.path.getsize(path) >= size, "the object's bytes are not in its shm file"

    got = daskray.get(ref)
    if kind == "bytes":
        assert got == value
    else:
        np.testing.assert_array_equal(got, value)
    assert daskray.get(in_band_digest.remote(ref)) == expected  # and a task reads it too
    del ref, got


def test_segments_live_in_a_private_directory_of_the_session(cluster):
    """/dev/shm is shared by every user: a segment at a predictable name there could
    be made first, or replaced once spilled, by someone else."""
    import stat

    prefix = current_cluster().shm_prefix
    directory = os.path.dirname(prefix)
    assert prefix.endswith("/") and os.path.dirname(directory) == SHM_DIR
    st = os.lstat(directory)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    ref = daskray.put(np.zeros(MB // 8))
    assert all(os.path.dirname(f) == directory for f in session_files())
    del ref


@pytest.mark.timeout(60)
def test_graph_data_that_cannot_be_pickled_leaves_no_file_behind(cluster):
    """Large data nodes are written several at a time: when one fails, the files
    of the others go too, and the error names the problem."""
    before = session_files()
    big = [np.full(1 << 20, float(i)) for i in range(4)]
    bad = [np.zeros(1 << 20), threading.Lock()]  # large by dask's estimate, unpicklable
    dsk = {**{("a", i): v for i, v in enumerate(big)}, "bad": bad,
           "total": (sum, [("a", i) for i in range(4)] + ["bad"])}
    with pytest.raises(daskray.SerializationError, match="lock"):
        daskray.get(dsk, "total")
    assert session_files() - before == set()  # (earlier tests' files may go meanwhile)
