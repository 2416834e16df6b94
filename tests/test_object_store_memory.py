"""The object store's memory limit (issue 3): LRU spilling to disk, pinning by live
views, ObjectStoreFullError, and the spill directory's lifetime.

Two layers:

* :class:`HostStore` on its own, with a private session directory and a private
  file prefix under ``/dev/shm``: which object is spilled, which is pinned, what the
  count says -- deterministic, no cluster;
* real clusters started with ``object_store_memory``: 512 MiB of objects under a
  64 MiB limit, written by the driver and by workers, read by the driver and by
  tasks, all bit-exact, and a spill directory that empties when the refs go.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import os
import secrets
import subprocess
import sys
import textwrap

import dask
import dask.array as da
import numpy as np
import pytest

import daskray
import daskray.api
from daskray.runtime import shared_memory
from daskray.runtime.store_memory import HostStore
from helpers import start_cluster, wait_until

MB = 1 << 20
LIMIT = 64 * MB

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs a writable /dev/shm")


def digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(arr).cast("B")).hexdigest()


def random_array(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, size=nbytes // 8, dtype=np.int64)


# =========================================================================== HostStore alone


def configured_store(tmp_path, limit: int):
    """A store of ``limit`` bytes with its own prefix, this process's until the
    test ends; then the previous one is back."""
    prefix = os.path.join(shared_memory.SHM_DIR, f"daskray-test-{secrets.token_hex(4)}-")
    host = HostStore(prefix, str(tmp_path), limit)
    previous = shared_memory.store()
    shared_memory.configure(host)
    try:
        yield host
    finally:
        shared_memory.configure(previous)
        shared_memory.remove_session(prefix)
        host.close()


@pytest.fixture
def store(tmp_path):
    """A 3 MiB store."""
    yield from configured_store(tmp_path, 3 * MB)


def write(value: np.ndarray, host: HostStore) -> tuple[bytes, str]:
    from daskray.runtime.serialization import dumps_frames

    return shared_memory.write(dumps_frames(value), host.prefix, "t")


def in_memory(path: str) -> bool:
    return os.path.exists(path)


def test_the_least_recently_used_unpinned_object_spills_first(store):
    objs = [np.full(MB // 8, i, dtype=np.int64) for i in range(4)]
    (d0, p0), (d1, p1), (d2, p2) = (write(o, store) for o in objs[:3])
    assert store.stats()["objects"] == 3 and store.stats()["spilled_objects"] == 0
    os.utime(p0, (1, 1)), os.utime(p1, (2, 2)), os.utime(p2, (3, 3))
    np.asarray(shared_memory.read(d0)).sum()  # a read makes p0 the most recently used
    d3, p3 = write(objs[3], store)
    assert not in_memory(p1), "the least recently used object should have been spilled"
    assert in_memory(p0) and in_memory(p2) and in_memory(p3)
    assert os.path.exists(store.spill_path(p1))
    stats = store.stats()
    assert stats["used"] <= store.limit and stats["spilled_objects"] == 1
    # spilled objects read back from disk, bit-exact
    for d, o in zip((d0, d1, d2, d3), objs):
        assert np.array_equal(shared_memory.read(d), o)


def test_a_live_view_pins_its_object(store):
    d0, p0 = write(np.zeros(MB // 8), store)
    d1, p1 = write(np.ones(MB // 8), store)
    os.utime(p0, (1, 1))
    view = shared_memory.read(d0)  # alive: p0 may not move although it is the oldest
    os.utime(p0, (1, 1))
    write(np.ones(2 * MB // 8), store)  # needs 1 MiB more: one of the two must go
    assert in_memory(p0) and not in_memory(p1)
    assert view.sum() == 0
    del view
    gc.collect()
    write(np.ones(MB // 8), store)
    assert not in_memory(p0), "once its view is gone the object may spill"


def test_a_full_store_of_pinned_objects_raises_with_the_numbers(store):
    views = [shared_memory.read(write(np.full(MB // 8, i), store)[0]) for i in range(2)]
    with pytest.raises(daskray.ObjectStoreFullError) as info:
        write(np.zeros(2 * MB // 8), store)
    message = str(info.value)
    assert "2.0 MiB" in message and "3.0 MiB" in message, message
    assert "pinned by live views" in message and "object_store_memory" in message
    assert isinstance(info.value, MemoryError)
    assert store.stats()["objects"] == 2, "the failed write must leave no file behind"
    del views


def test_an_object_larger_than_the_limit_goes_to_disk_directly(store):
    big = random_array(4 * MB, seed=3)
    descriptor, path = write(big, store)
    assert not in_memory(path) and os.path.exists(store.spill_path(path))
    assert store.stats()["used"] == 0
    assert np.array_equal(shared_memory.read(descriptor), big)
    shared_memory.unlink(path)
    assert store.stats()["spilled_objects"] == 0


def test_unlink_removes_a_spilled_object_and_keeps_the_count(store):
    paths = [write(np.full(MB // 8, i), store)[1] for i in range(5)]
    stats = store.stats()
    assert stats["spilled_objects"] >= 2 and stats["used"] <= store.limit
    for path in paths:
        shared_memory.unlink(path)
    stats = store.stats()
    assert stats == {**stats, "used": 0, "objects": 0, "spilled": 0, "spilled_objects": 0}
    # the running count went back to zero too: three more fit without spilling
    for i in range(3):
        write(np.full(MB // 8 - 16, i), store)
    assert store.stats()["spilled_objects"] == 0


@pytest.fixture
def roomy_store(tmp_path):
    """A 16 MiB store: a pool of up to 4 MiB."""
    yield from configured_store(tmp_path, 16 * MB)


def test_a_freed_file_nobody_maps_is_reused_by_the_next_write(roomy_store):
    d0, p0 = write(np.zeros(2 * MB // 8), roomy_store)
    inode = os.stat(p0).st_ino
    shared_memory.unlink(p0)
    assert not os.path.exists(p0)
    stats = roomy_store.stats()
    assert stats["objects"] == 0 and stats["used"] == 0 and stats["pooled"] >= 2 * MB
    value = np.arange(2 * MB // 8 - 100, dtype=np.int64)  # a little smaller: still reused
    d1, p1 = write(value, roomy_store)
    assert os.stat(p1).st_ino == inode, "the pooled file should have been reused"
    assert roomy_store.stats()["pooled"] == 0
    assert np.array_equal(shared_memory.read(d1), value)


def object_byte_writes(monkeypatch) -> list[int]:
    """The sizes of the ``os.pwrite`` calls that write an object's bytes (not the
    store's 8-byte count), recorded from now on."""
    real_pwrite, sizes = os.pwrite, []

    def recording_pwrite(fd, data, offset):
        if len(data) > 8:
            sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    return sizes


def test_a_reused_file_is_filled_through_a_mapping_in_one_copy(roomy_store, monkeypatch):
    _, p0 = write(np.zeros(2 * MB // 8), roomy_store)
    inode = os.stat(p0).st_ino
    shared_memory.unlink(p0)  # into the pool: its pages stay
    writes = object_byte_writes(monkeypatch)
    value = random_array(2 * MB - 4096, seed=1)  # a little smaller: still reused
    d1, p1 = write(value, roomy_store)
    assert os.stat(p1).st_ino == inode, "the pooled file should have been reused"
    assert writes == [], "a file whose pages exist is filled through a mapping, not pwrite"
    assert os.stat(p1).st_size >= value.nbytes
    assert digest(shared_memory.read(d1)) == digest(value)
    fresh = random_array(2 * MB, seed=2)  # nothing pooled now: a fresh file
    d2, _ = write(fresh, roomy_store)
    assert sum(writes) >= fresh.nbytes, "fresh pages are written with pwrite (ENOSPC, not SIGBUS)"
    assert digest(shared_memory.read(d2)) == digest(fresh)


def kept_mapping_of(path: str):
    """The writer's kept mapping of the file at ``path``, if this process keeps one."""
    st = os.stat(path)
    return shared_memory._writer_mappings._kept.get((st.st_dev, st.st_ino))


def test_the_writers_mapping_never_pins_the_object(roomy_store):
    _, p0 = write(np.zeros(2 * MB // 8), roomy_store)
    shared_memory.unlink(p0)
    _, p1 = write(np.ones(2 * MB // 8), roomy_store)  # reused, filled through a mapping
    assert kept_mapping_of(p1) is not None, "the writer's mapping should be kept for reuse"
    shared_memory.unlink(p1)  # its writer's mapping is still open
    stats = roomy_store.stats()
    assert stats["pooled"] >= 2 * MB and stats["used"] == 0, \
        f"the freed object should be back in the pool, not held as in use: {stats}"
    assert not os.path.isdir(roomy_store.freed_dir) or not os.listdir(roomy_store.freed_dir)


def test_a_kept_mapping_is_reused_and_the_new_bytes_land(roomy_store):
    _, p0 = write(np.zeros(2 * MB // 8), roomy_store)
    shared_memory.unlink(p0)
    _, p1 = write(random_array(2 * MB, seed=1), roomy_store)
    kept = kept_mapping_of(p1)
    assert kept is not None
    shared_memory.unlink(p1)
    value = random_array(2 * MB - 4096, seed=2)  # a little smaller: the same file again
    d2, p2 = write(value, roomy_store)
    assert kept_mapping_of(p2) is kept, "the second write of the file should reuse its mapping"
    assert digest(shared_memory.read(d2)) == digest(value)


def test_a_kept_mapping_of_a_file_gone_is_closed_soon(roomy_store):
    _, p0 = write(np.zeros(2 * MB // 8), roomy_store)
    shared_memory.unlink(p0)
    _, p1 = write(np.ones(2 * MB // 8), roomy_store)
    kept = kept_mapping_of(p1)
    assert kept is not None
    roomy_store.discard(p1)  # unlinked for good: only the kept mapping holds its pages
    assert wait_until(lambda: kept.mapping.closed, timeout=10), \
        "a kept mapping of an unlinked file must be closed, or it holds memory nobody counts"
    assert not shared_memory._writer_mappings._kept


def test_kept_mappings_are_closed_when_the_session_store_goes(tmp_path):
    gen = configured_store(tmp_path, 16 * MB)
    host = next(gen)
    _, p0 = write(np.zeros(2 * MB // 8), host)
    shared_memory.unlink(p0)
    _, p1 = write(np.ones(2 * MB // 8), host)
    kept = kept_mapping_of(p1)
    assert kept is not None
    gen.close()  # the fixture's end: the previous store is configured again
    assert kept.mapping.closed and not shared_memory._writer_mappings._kept


def test_a_file_still_mapped_is_never_reused(roomy_store):
    d0, p0 = write(np.full(2 * MB // 8, 7, dtype=np.int64), roomy_store)
    view = shared_memory.read(d0)
    shared_memory.unlink(p0)  # freed while a view lives: unlinked, not pooled
    assert roomy_store.stats()["pooled"] == 0
    write(np.zeros(2 * MB // 8, dtype=np.int64), roomy_store)
    assert (view == 7).all(), "a new object overwrote pages a live view reads"


def test_the_pool_is_bounded_and_dropped_before_anything_spills(roomy_store):
    paths = [write(np.full(2 * MB // 8 - 64, i), roomy_store)[1] for i in range(4)]
    for path in paths:
        shared_memory.unlink(path)
    assert roomy_store.stats()["pooled"] <= 16 * MB * 0.25
    live = [write(np.full(3 * MB // 8, i), roomy_store) for i in range(5)]  # 15 MiB
    stats = roomy_store.stats()
    assert stats["pooled"] == 0 and stats["spilled_objects"] == 0, stats
    for i, (d, _) in enumerate(live):
        assert (shared_memory.read(d) == i).all()


def test_a_freed_object_still_viewed_keeps_counting_until_its_views_go(store):
    d0, p0 = write(np.full(MB // 8, 5, dtype=np.int64), store)
    view = shared_memory.read(d0)
    shared_memory.unlink(p0)  # freed, but its pages are still in use
    assert not os.path.exists(p0)
    assert store.stats()["used"] >= MB
    other = shared_memory.read(write(np.zeros(MB // 8), store)[0])  # pinned too
    with pytest.raises(daskray.ObjectStoreFullError):
        write(np.zeros(MB // 8 + 1024), store)  # over 3 MiB: the viewed one still counts
    assert (view == 5).all()
    del view
    gc.collect()
    write(np.zeros(MB // 8 + 1024), store)  # its view is gone: reaped, room made
    assert not os.listdir(store.freed_dir)
    assert (other == 0).all()


def test_a_full_dev_shm_is_met_by_spilling_and_trying_again(store, monkeypatch):
    old, _ = write(np.full(MB // 8, 1, dtype=np.int64), store)
    real_pwrite, calls = os.pwrite, []

    def pwrite_once_full(fd, data, offset):
        if len(data) > 8:  # an object's bytes, not the store's 8-byte count
            calls.append(offset)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_once_full)
    value = np.arange(MB // 8, dtype=np.int64)
    descriptor, path = write(value, store)
    monkeypatch.undo()
    assert store.stats()["spilled_objects"] == 1, "room was made by spilling the other"
    assert np.array_equal(shared_memory.read(descriptor), value)
    assert (shared_memory.read(old) == 1).all()


def test_a_full_dev_shm_with_nothing_to_spill_is_a_clear_error(store, monkeypatch):
    real_pwrite = os.pwrite

    def always_full(fd, data, offset):
        if len(data) > 8:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", always_full)
    with pytest.raises(daskray.ObjectStoreFullError, match="is full"):
        write(np.zeros(MB // 8), store)
    monkeypatch.undo()
    assert store.stats()["objects"] == 0 and store.stats()["used"] == 0


# =========================================================================== on a cluster


@pytest.fixture
def limited_cluster(cluster):
    """A cluster with a 64 MiB store; afterwards the shared default one runs again."""
    daskray.shutdown()
    start_cluster(object_store_memory=LIMIT)
    try:
        yield daskray.api._runtime.cluster
    finally:
        daskray.shutdown()
        start_cluster()


@daskray.remote
def checksum(arr):
    return digest(arr)


@daskray.remote
def make(nbytes, seed):
    return random_array(nbytes, seed)


def spill_files(cluster) -> list[str]:
    return glob.glob(os.path.join(cluster.store.spill_dir, "*"))


@pytest.mark.timeout(180)
def test_512_mib_of_puts_under_a_64_mib_limit_come_back_bit_exact(limited_cluster):
    arrays = [random_array(32 * MB, seed=i) for i in range(16)]
    digests = [digest(a) for a in arrays]
    refs = []
    for a in arrays:
        refs.append(daskray.put(a))
        assert daskray.object_store_stats()["used"] <= LIMIT
    stats = daskray.object_store_stats()
    assert stats["limit"] == LIMIT
    assert stats["spilled_objects"] >= 14 and stats["spilled"] >= 14 * 32 * MB, stats
    # read back by the driver, one at a time (each view pins only while it lives)
    for ref, expected in zip(refs, digests):
        value = daskray.get(ref)
        assert digest(value) == expected
        del value
    # and by tasks on the workers
    assert daskray.get([checksum.remote(r) for r in refs]) == digests
    del arrays
    spill_dir = limited_cluster.store.spill_dir
    assert spill_files(limited_cluster)
    del refs, ref
    assert wait_until(lambda: not spill_files(limited_cluster), 30), os.listdir(spill_dir)
    assert wait_until(lambda: daskray.object_store_stats()["used"] == 0, 30)


@pytest.mark.timeout(180)
def test_worker_results_exported_to_the_driver_spill_too(limited_cluster):
    refs = [make.remote(32 * MB, seed=i) for i in range(8)]
    for i in range(len(refs)):
        value = daskray.get(refs[i])
        assert np.array_equal(value, random_array(32 * MB, seed=i))
        del value
        assert daskray.object_store_stats()["used"] <= LIMIT
    assert daskray.object_store_stats()["spilled_objects"] >= 6
    # a second read of an exported-then-spilled result still gives the same bytes
    assert np.array_equal(daskray.get(refs[0]), random_array(32 * MB, seed=0))
    del refs
    assert wait_until(lambda: not spill_files(limited_cluster), 30)


@daskray.remote
def put_many(seed, count):
    return [daskray.put(random_array(16 * MB, seed * 100 + i)) for i in range(count)]


@pytest.mark.timeout(180)
def test_two_workers_writing_at_once_share_one_limit(limited_cluster):
    batches = daskray.get([put_many.remote(seed, 6) for seed in range(4)])
    stats = daskray.object_store_stats()
    assert stats["used"] <= LIMIT and stats["spilled_objects"] >= 24 - LIMIT // (16 * MB)
    for seed, refs in enumerate(batches):
        for i, ref in enumerate(refs):
            value = daskray.get(ref)
            assert np.array_equal(value, random_array(16 * MB, seed * 100 + i)), (seed, i)
            del value
    del batches, refs, ref
    assert wait_until(lambda: not spill_files(limited_cluster), 30)
    assert wait_until(lambda: daskray.object_store_stats()["used"] == 0, 30)


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_share_a_result_sends_a_copy(limited_cluster):
    spill_dir = limited_cluster.store.spill_dir
    with open(spill_dir, "w"):  # no spill directory can be made: the export fails
        pass
    try:
        ref = make.remote(80 * MB, seed=5)  # larger than the limit: meant for disk
        assert np.array_equal(daskray.get(ref, timeout=60), random_array(80 * MB, 5))
        assert daskray.get(checksum.remote(np.arange(10)), timeout=30)  # still serving
    finally:
        os.unlink(spill_dir)


@pytest.mark.timeout(120)
def test_a_full_store_raises_at_put_and_recovers_when_views_go(limited_cluster):
    refs = [daskray.put(random_array(30 * MB, seed=i)) for i in range(2)]
    held = [daskray.get(r) for r in refs]
    with pytest.raises(daskray.ObjectStoreFullError, match="pinned by live views"):
        daskray.put(random_array(30 * MB, seed=9))
    del held
    gc.collect()
    ref = daskray.put(random_array(30 * MB, seed=9))
    assert np.array_equal(daskray.get(ref), random_array(30 * MB, seed=9))


@pytest.mark.timeout(120)
def test_dask_graph_data_larger_than_the_store_computes_like_sync(limited_cluster):
    x = np.random.default_rng(0).random((4096, 4096))  # 128 MiB of graph data
    arr = da.from_array(x, chunks=(1024, 4096))
    expected = (arr + 1).sum(axis=0).compute(scheduler="sync")
    got = (arr + 1).sum(axis=0).compute()
    np.testing.assert_array_equal(got, expected)


def test_object_store_memory_comes_from_dask_config_too(cluster):
    daskray.shutdown()
    try:
        with dask.config.set({"daskray.object-store-memory": "96 MiB"}):
            daskray.init(num_workers=1)
        assert daskray.object_store_stats()["limit"] == 96 * MB
    finally:
        daskray.shutdown()
        start_cluster()


@pytest.mark.parametrize("bad", [0, -5, "lots", 0.5, float("nan")])
def test_a_bad_limit_is_a_clear_error(cluster, bad):
    daskray.shutdown()
    try:
        with pytest.raises(ValueError, match="object_store_memory"):
            daskray.init(num_workers=1, object_store_memory=bad)
        assert not daskray.is_initialized()
    finally:
        if not daskray.is_initialized():
            start_cluster()


@pytest.mark.timeout(90)
def test_spilled_objects_of_a_sigkilled_session_are_swept(cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import json, sys, numpy as np, daskray
        daskray.init(num_workers=1, object_store_memory=8 << 20)
        refs = [daskray.put(np.full(1 << 20, i, dtype=np.int64)) for i in range(4)]
        cluster = daskray.api._runtime.cluster
        print(json.dumps({"prefix": cluster.shm_prefix, "session": cluster.session_dir,
                          "stats": daskray.object_store_stats()}), flush=True)
        sys.stdin.read()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        import json

        info = json.loads(proc.stdout.readline())
        assert info["stats"]["spilled_objects"] >= 2
        import psutil

        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            os.kill(pid, 9)
    finally:
        proc.kill()
        proc.wait(30)
    # the next init on the host sweeps it
    daskray.shutdown()
    start_cluster()
    assert not glob.glob(glob.escape(info["prefix"]) + "*")
    assert not os.path.exists(info["session"])
