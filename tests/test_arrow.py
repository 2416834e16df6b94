"""Apache Arrow data in daskray (issue 15, item 5).

* The object store: a ``pyarrow.Table`` or ``RecordBatch`` -- ``put`` by the driver,
  returned by a task or by an actor -- is read in place by every process: the
  buffers of the table a reader gets lie inside its mapping of the object's
  ``/dev/shm`` file, and reading 100 MB adds no private (anonymous) memory.
  pyarrow pickles its buffers out of band (pickle protocol 5), so the store's
  numpy path carries them unchanged.
* A slice (a batch of ``table.to_batches()``, ``table.slice(...)``) is stored
  with buffers of its own size, not with the whole buffers it views, which
  pyarrow's pickling would write.
* ``Dataset.from_arrow`` and ``Dataset.read_parquet``: the same shards, and so
  bit-identical trained parameters, as ``Dataset.from_pandas`` of the same rows.

Task and actor functions live at module level.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import daskray
import daskray.api
from helpers import NUM_WORKERS, wait_until
from daskray.ml import Dataset, ScalingConfig, Trainer, models
from daskray.runtime.serialization import dumps, dumps_frames, frames_nbytes, loads

MB = 1 << 20
SHM_DIR = "/dev/shm"

needs_shm = pytest.mark.skipif(
    not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)),
    reason="needs a writable /dev/shm")


# =========================================================================== helpers


def arrow_table(nbytes: int, seed: int) -> pa.Table:
    """About ``nbytes`` of columns of every buffer kind: plain values, a validity
    bitmap (nulls), and strings (offsets + data)."""
    rows = nbytes // 24
    rng = np.random.default_rng(seed)
    ints = rng.integers(0, 2**62, rows)
    floats = rng.random(rows)
    nulls = rng.random(rows) < 0.1
    words = pc.cast(pa.array(rng.integers(0, 1000, rows)), pa.string())
    return pa.table({"i": ints, "f": pa.array(floats, mask=nulls), "s": words})


def table_buffers(data: pa.Table | pa.RecordBatch) -> list[pa.Buffer]:
    columns = data.columns
    chunks = [c for col in columns for c in getattr(col, "chunks", [col])]
    return [b for chunk in chunks for b in chunk.buffers() if b is not None]


def table_digest(data: pa.Table | pa.RecordBatch) -> str:
    """One hash of every buffer's bytes (reading each page of the data)."""
    h = hashlib.blake2b()
    for buf in table_buffers(data):
        h.update(memoryview(buf))
    return h.hexdigest()


def shm_mappings(prefix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files under ``prefix``."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith(prefix):
                low, high = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((low, high))
    return ranges


def buffers_in_shared_memory(data: pa.Table | pa.RecordBatch, prefix: str) -> list[bool]:
    """For each buffer of ``data``: whether all of it lies in a mapping of the store."""
    ranges = shm_mappings(prefix)
    return [any(low <= b.address and b.address + b.size <= high for low, high in ranges)
            for b in table_buffers(data)]


def rss_anon(pid: int) -> int:
    """Anonymous (private) resident memory of ``pid`` in bytes: where a copy would land."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def shm_prefix() -> str:
    return daskray.api._runtime.cluster.shm_prefix


def worker_pids() -> set[int]:
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    return {p.pid for p in head.children() if p.status() != psutil.STATUS_ZOMBIE}


def describe_arrow(data: pa.Table | pa.RecordBatch, prefix: str) -> dict:
    """What this process sees of Arrow data it holds."""
    return {"pid": os.getpid(), "type": type(data).__name__, "rows": data.num_rows,
            "digest": table_digest(data),
            "addresses": [b.address for b in table_buffers(data)],
            "in_shm": buffers_in_shared_memory(data, prefix),
            "rss_anon": rss_anon(os.getpid())}


@daskray.remote
def read_in_place(data, prefix: str) -> dict:
    """:func:`describe_arrow` of Arrow data given to a task as its argument."""
    return describe_arrow(data, prefix)


@daskray.remote
def get_with_the_others(refs: list, prefix: str, meeting: str, readers: int) -> dict:
    """:func:`describe_arrow` of the object behind ``refs[0]``, fetched with ``get``
    in a task that runs while ``readers`` such tasks run (each says it started by a
    file in ``meeting`` and waits for the others: with one task slot per worker
    they run on as many workers), and the growth of the task's private memory
    while it fetched and read the object.  The ref is nested so that the task
    depends on nothing and may run anywhere."""
    open(os.path.join(meeting, str(os.getpid())), "w").close()
    assert wait_until(lambda: len(os.listdir(meeting)) >= readers, timeout=30), \
        f"only {os.listdir(meeting)} of {readers} readers started"
    before = rss_anon(os.getpid())
    report = describe_arrow(daskray.get(refs[0]), prefix)
    return {**report, "rss_growth": report["rss_anon"] - before}


def read_on_every_worker(ref, tmp_path) -> list[dict]:
    """What a task on each worker sees of the object behind ``ref``."""
    meeting = tmp_path / f"meeting-{uuid.uuid4().hex}"
    meeting.mkdir()
    refs = [get_with_the_others.remote([ref], shm_prefix(), str(meeting), NUM_WORKERS)
            for _ in range(NUM_WORKERS)]
    reports = daskray.get(refs, timeout=60)
    pids = {r["pid"] for r in reports}
    assert len(pids) == NUM_WORKERS and pids <= worker_pids(), \
        f"the readers ran in {pids}, not in {NUM_WORKERS} worker processes"
    return reports


@daskray.remote
def make_table(nbytes: int, seed: int) -> pa.Table:
    return arrow_table(nbytes, seed)


@daskray.remote(num_returns=2)
def make_table_and_say_where(nbytes: int, seed: int) -> tuple[pa.Table, dict]:
    """A table, and the process and buffer addresses it was made with."""
    table = arrow_table(nbytes, seed)
    return table, {"pid": os.getpid(), "addresses": [b.address for b in table_buffers(table)]}


@daskray.remote
class BatchMaker:
    """An actor, in a process of its own, that makes record batches."""

    def pid(self) -> int:
        return os.getpid()

    def batch(self, nbytes: int, seed: int) -> pa.RecordBatch:
        return arrow_table(nbytes, seed).combine_chunks().to_batches()[0]


# =========================================================================== the store


@needs_shm
@pytest.mark.timeout(120)
def test_a_100_MB_table_put_by_the_driver_is_read_in_place_by_every_worker(cluster, tmp_path):
    table = arrow_table(100 * MB, seed=1)
    size = table.nbytes
    assert size > 95 * MB
    expected = table_digest(table)
    ref = daskray.put(table)

    as_argument = daskray.get(read_in_place.remote(ref, shm_prefix()), timeout=60)
    with_get = read_on_every_worker(ref, tmp_path)

    for report in [as_argument, *with_get]:
        assert report["type"] == "Table" and report["rows"] == table.num_rows
        assert report["digest"] == expected
        assert report["in_shm"] and all(report["in_shm"]), (
            f"buffers not in the shared mapping (a copy was made): {report['in_shm']}")
    for report in with_get:  # every page was read for the digest, none into private memory
        growth = report["rss_growth"]
        assert growth < size / 8, f"worker {report['pid']}'s private memory grew {growth / MB:.0f} MB"


@needs_shm
@pytest.mark.timeout(120)
def test_a_table_returned_by_a_task_is_read_in_place_by_the_driver_and_workers(
        cluster, tmp_path):
    ref, origin_ref = make_table_and_say_where.remote(40 * MB, 2)
    expected = arrow_table(40 * MB, seed=2)

    got = daskray.get(ref, timeout=60)
    assert isinstance(got, pa.Table)
    assert got.equals(expected)
    assert all(buffers_in_shared_memory(got, shm_prefix()))
    # the maker's worker reads its own object (or the shared file), the other
    # worker reads the shared file
    origin = daskray.get(origin_ref)
    for report in read_on_every_worker(ref, tmp_path):
        assert report["digest"] == table_digest(expected)
        if report["pid"] == origin["pid"]:
            assert report["addresses"] == origin["addresses"] or all(report["in_shm"])
        else:
            assert all(report["in_shm"]), report["in_shm"]


@needs_shm
@pytest.mark.timeout(120)
def test_a_record_batch_returned_by_an_actor_is_read_in_place(cluster, tmp_path):
    maker = BatchMaker.remote()
    ref = maker.batch.remote(20 * MB, 3)
    expected = arrow_table(20 * MB, seed=3).combine_chunks().to_batches()[0]

    got = daskray.get(ref, timeout=60)
    assert isinstance(got, pa.RecordBatch)
    assert got.equals(expected)
    assert all(buffers_in_shared_memory(got, shm_prefix()))
    actor_pid = daskray.get(maker.pid.remote(), timeout=60)
    for report in read_on_every_worker(ref, tmp_path):
        assert report["pid"] != actor_pid
        assert report["type"] == "RecordBatch" and report["digest"] == table_digest(expected)
        assert all(report["in_shm"]), report["in_shm"]
    daskray.kill(maker)


def test_a_slice_is_pickled_with_its_own_bytes_and_a_whole_table_as_its_own_buffers():
    table = arrow_table(16 * MB, seed=6)
    nested = pa.table({"l": pa.array([[i, i + 1] for i in range(1000)] * 500),
                       "st": pa.StructArray.from_arrays([pa.array(np.arange(500_000)),
                                                         pa.array(np.ones(500_000))], ["p", "q"]),
                       "d": pa.array(["x", "y"] * 250_000).dictionary_encode()})
    slices = [table.to_batches(max_chunksize=1000)[3], table.slice(5000, 1000),
              table.column("s").slice(100, 50), table.column("i").chunk(0)[10:20],
              nested.slice(1000, 1000), (table.slice(0, 10), "and a tuple")]
    for piece in slices:
        frames = dumps_frames(piece)
        used = sum(getattr(p, "nbytes", 0) for p in piece) if isinstance(piece, tuple) \
            else piece.nbytes
        assert frames_nbytes(frames) < used + 4096, (type(piece), frames_nbytes(frames), used)
        assert len(dumps(piece)) < used + 4096
        back = loads(frames[0], frames[1:])
        assert back[0].equals(piece[0]) if isinstance(piece, tuple) else back.equals(piece)
    # a whole table is not copied: its frames are its own buffers
    frames = dumps_frames(table)
    assert sorted(pa.py_buffer(f).address for f in frames[1:]) == \
        sorted(b.address for b in table_buffers(table))


@needs_shm
@pytest.mark.timeout(120)
def test_batches_of_a_table_put_one_by_one_take_the_tables_size_in_the_store(cluster):
    table = arrow_table(20 * MB, seed=7)
    batches = table.to_batches(max_chunksize=table.num_rows // 10)
    used = daskray.object_store_stats()["used"]
    refs = [daskray.put(batch) for batch in batches]
    grown = daskray.object_store_stats()["used"] - used
    assert grown < 1.5 * table.nbytes, (
        f"{len(batches)} batches of a {table.nbytes / MB:.0f} MB table took {grown / MB:.0f} MB")
    got = daskray.get(refs, timeout=60)
    assert pa.Table.from_batches(got).equals(table)
    del got, refs


@pytest.mark.timeout(120)
def test_arrow_data_round_trips_on_both_backends(backend):
    """Small (sent inline) and large tables come back equal on each backend; on the
    dask.distributed backend dask serializes them itself (Arrow IPC), with copies."""
    small = arrow_table(4096, seed=4)
    large = arrow_table(4 * MB, seed=5)
    for table in (small, large):
        assert daskray.get(daskray.put(table), timeout=60).equals(table)
    assert daskray.get(make_table.remote(4 * MB, 5), timeout=60).equals(large)
    batch = small.combine_chunks().to_batches()[0]
    assert daskray.get(daskray.put(batch), timeout=60).equals(batch)


# =========================================================================== Dataset


def labelled_table(rows: int = 600, seed: int = 0) -> pa.Table:
    """Three classes of points, with integer, float and boolean features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, rows)
    centers = rng.normal(0, 3, (3, 3))
    X = centers[y] + rng.normal(0, 1, (rows, 3))
    return pa.table({
        "a": X[:, 0],
        "b": np.round(X[:, 1] * 10).astype(np.int32),
        "c": X[:, 2].astype(np.float32),
        "flag": X[:, 0] > 0,
        "label": y,
    })


TRAIN_CONFIG = {"optimizer": "adam", "lr": 0.05, "batch_size": 100, "epochs": 3}


def fitted_params(ds: Dataset) -> dict:
    return Trainer(model=models.SoftmaxRegression(), train_config=TRAIN_CONFIG,
                   scaling_config=ScalingConfig(num_workers=2)).fit(ds).checkpoint.params


def assert_same_dataset(ds: Dataset, reference: Dataset) -> None:
    assert ds.sizes == reference.sizes and ds.n_features == reference.n_features
    np.testing.assert_array_equal(ds.classes, reference.classes)
    for got, want in zip(daskray.get(ds.shards), daskray.get(reference.shards)):
        assert got[0].dtype == np.float64
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def assert_same_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key


@pytest.mark.timeout(120)
def test_from_arrow_trains_the_same_model_as_from_pandas(backend):
    table = labelled_table()
    reference = Dataset.from_pandas(table.to_pandas(), label="label", num_shards=4, seed=3)
    from_table = Dataset.from_arrow(table, label="label", num_shards=4, seed=3)
    batches = table.to_batches(max_chunksize=100)
    assert len(batches) == 6
    from_batches = Dataset.from_arrow(batches, label="label", num_shards=4, seed=3)
    assert_same_dataset(from_table, reference)
    assert_same_dataset(from_batches, reference)
    want = fitted_params(reference)
    assert_same_params(fitted_params(from_table), want)
    assert_same_params(fitted_params(from_batches), want)


@pytest.mark.timeout(120)
def test_read_parquet_trains_the_same_model_as_from_pandas(cluster, tmp_path):
    table = labelled_table(seed=1)
    pq.write_table(table.slice(0, 250), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(250), tmp_path / "part-1.parquet")
    paths = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    columns = ["a", "c", "flag"]  # the label is read too
    reference = Dataset.from_pandas(table.to_pandas()[columns + ["label"]], label="label",
                                    num_shards=4, seed=2)

    from_files = Dataset.read_parquet(paths, label="label", columns=columns,
                                      num_shards=4, seed=2)
    assert from_files.n_features == 3
    assert_same_dataset(from_files, reference)
    assert_same_params(fitted_params(from_files), fitted_params(reference))

    whole = Dataset.read_parquet(str(tmp_path), label="label", num_shards=4, seed=2)
    everything = Dataset.from_pandas(table.to_pandas(), label="label", num_shards=4, seed=2)
    assert_same_dataset(whole, everything)


def test_nulls_become_nan_as_in_pandas(cluster):
    table = pa.table({"x": pa.array([1, None, 3, 4], pa.int64()),
                      "f": pa.array([True, None, False, True]),
                      "y": [0, 1, 0, 1]})
    X, _ = Dataset.from_arrow(table, label="y", num_shards=1, shuffle=False).to_numpy()
    want = table.to_pandas().drop(columns=["y"]).to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(X, want)
    assert np.isnan(X[1]).all()


def test_bad_arrow_input_is_refused_with_a_clear_message(cluster, tmp_path):
    table = pa.table({"x": [1.0, 2.0], "name": ["a", "b"], "y": [0, 1]})
    with pytest.raises(TypeError, match=r"name \(string\).*columns=") as info:
        Dataset.from_arrow(table, label="y", num_shards=1)
    assert "x (" not in str(info.value)
    with pytest.raises(KeyError, match="'label'.*'x', 'name', 'y'"):
        Dataset.from_arrow(table, label="label", num_shards=1)
    with pytest.raises(TypeError, match="from_pandas"):
        Dataset.from_arrow(pd.DataFrame({"x": [1.0], "y": [0]}), label="y")
    with pytest.raises(ValueError, match="no batches"):
        Dataset.from_arrow([], label="y")
    pq.write_table(table, tmp_path / "t.parquet")
    ds = Dataset.read_parquet(tmp_path / "t.parquet", label="y", columns=["x"], num_shards=1)
    assert ds.n_features == 1 and ds.num_rows == 2
