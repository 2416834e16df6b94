"""Real dask workloads on daskray, each checked against dask's ``scheduler="sync"``.

Arrays, DataFrames (groupby, shuffle, merge, set_index), bags and delayed, at
small sizes, plus results and intermediates large enough (several MB) to travel
out of band rather than inline through the head.  Each runs on both backends.
"""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd
import pytest

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd

import daskray

# every test runs on daskray's own runtime and on a dask.distributed cluster
pytestmark = [pytest.mark.usefixtures("backend"), pytest.mark.timeout(60)]

MB = 1 << 20


def compute_both(*collections, **kwargs):
    """The collections computed on daskray and, as the reference, by dask's sync scheduler."""
    got = dask.compute(*collections, scheduler=daskray.get, **kwargs)
    expected = dask.compute(*collections, scheduler="sync", **kwargs)
    assert len(got) == len(expected) == len(collections)
    return got, expected


def assert_arrays_equal(got, expected):
    for g, e in zip(got, expected):
        if isinstance(e, np.ndarray):
            assert isinstance(g, np.ndarray)
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e)


def sorted_frame(df, by):
    return df.sort_values(by).reset_index(drop=True)


# ====================================================================== arrays


def test_array_elementwise_and_reductions():
    x = da.arange(10_000, chunks=1000).reshape(100, 100).rechunk(25)
    y = da.random.default_rng(42).random((100, 100), chunks=25)
    got, expected = compute_both(
        x.sum(), (x + y).mean(axis=0), x.max(axis=1), (x * y).std(), x.cumsum(axis=0),
        y.argmax(axis=1), x[::3, 5:50].T, (x > 5000).sum(),
    )
    assert_arrays_equal(got, expected)
    assert got[0] == np.arange(10_000).sum()


def test_array_transpose_matmul_and_rechunk():
    rng = np.random.default_rng(0)
    a = rng.random((120, 80))
    x = da.from_array(a, chunks=(40, 20))
    got, expected = compute_both(x @ x.T, (x + x[::-1]).rechunk((60, 80)), x.dot(x.T).trace())
    assert_arrays_equal(got, expected)
    np.testing.assert_allclose(got[0], a @ a.T)


def test_array_map_blocks_and_overlap():
    x = da.arange(1000, chunks=100, dtype="f8")
    smooth = x.map_overlap(lambda b: (np.roll(b, 1) + b + np.roll(b, -1)) / 3, depth=1,
                           boundary="reflect")
    blocks = x.map_blocks(lambda b: b * 2 + 1, dtype="f8")
    got, expected = compute_both(smooth, blocks, da.concatenate([x, blocks]).sum())
    assert_arrays_equal(got, expected)


def test_array_implicit_default_scheduler():
    # daskray.init made daskray the default: plain .compute() runs on it
    assert dask.base.get_scheduler() is daskray.get
    x = da.ones((200, 200), chunks=50)
    assert (x + x.T).sum().compute() == 80_000


def test_large_array_result():
    # 16 MB result assembled on a worker and fetched out of band
    x = da.arange(2_000_000, chunks=500_000, dtype="f8") * 2
    got, expected = compute_both(x)
    assert got[0].nbytes == 16_000_000
    assert_arrays_equal(got, expected)


def test_large_array_chunks_between_workers():
    # 2 MB chunks: every transpose task reads chunks held by another task's worker
    x = da.random.default_rng(7).random((1024, 1024), chunks=512)
    y = x + x.T
    got, expected = compute_both(y, y.sum(axis=0))
    assert got[0].nbytes == 8 * MB
    assert_arrays_equal(got, expected)
    np.testing.assert_allclose(got[0], got[0].T)


def test_large_array_from_delayed():
    def make(n, seed):
        return np.random.default_rng(seed).random(n)

    parts = [da.from_delayed(dask.delayed(make)(400_000, i), shape=(400_000,), dtype="f8")
             for i in range(3)]
    x = da.concatenate(parts)
    got, expected = compute_both(x, x.sum())
    assert got[0].nbytes > 9 * MB
    assert_arrays_equal(got, expected)


def test_large_array_input_shipped_to_workers():
    # a 8 MB numpy array embedded in the graph (data sent from the driver)
    a = np.random.default_rng(3).random((1024, 1024))
    x = da.from_array(a, chunks=(1024, 256))
    got, expected = compute_both((x * 2).sum(axis=1), x[:, ::-1])
    assert_arrays_equal(got, expected)
    np.testing.assert_allclose(got[0], (a * 2).sum(axis=1))


# ================================================================== dataframes


@pytest.fixture(scope="module")
def pdf():
    rng = np.random.default_rng(1)
    n = 4000
    return pd.DataFrame({
        "k": rng.integers(0, 40, n),
        "v": rng.random(n),
        "w": rng.integers(-100, 100, n),
        "s": rng.choice(["a", "b", "c", "d"], n),
        "u": rng.permutation(n),
    })


@pytest.fixture(scope="module")
def ddf(pdf):
    return dd.from_pandas(pdf, npartitions=4)


def test_dataframe_shuffle_method_is_tasks():
    # init chose a method that works on any cluster (p2p needs distributed)
    assert dask.config.get("dataframe.shuffle.method") == "tasks"


def test_dataframe_elementwise_and_reductions(ddf, pdf):
    got, expected = compute_both(
        ddf.v.sum(), ddf[ddf.w > 0].w.mean(), (ddf.v * ddf.w).max(), ddf.describe(),
        ddf.assign(z=ddf.v + ddf.w), ddf.s.value_counts(), ddf.k.nunique(),
    )
    pd.testing.assert_frame_equal(got[3], expected[3])
    pd.testing.assert_frame_equal(got[4], expected[4])
    pd.testing.assert_series_equal(got[5].sort_index(), expected[5].sort_index())
    for i in (0, 1, 2, 6):
        assert got[i] == pytest.approx(expected[i])
    assert got[0] == pytest.approx(pdf.v.sum())


def test_dataframe_groupby(ddf, pdf):
    got, expected = compute_both(
        ddf.groupby("k").v.sum(),
        ddf.groupby("k").agg({"v": ["sum", "mean", "count"], "w": "max"}),
        ddf.groupby(["s", "k"]).w.min(),
        ddf.groupby("s").v.agg("sum", split_out=2),
        ddf.groupby("k").v.std(),
    )
    for g, e in zip(got, expected):
        if isinstance(e, pd.DataFrame):
            pd.testing.assert_frame_equal(g.sort_index(), e.sort_index())
        else:
            pd.testing.assert_series_equal(g.sort_index(), e.sort_index())
    pd.testing.assert_series_equal(got[0].sort_index(), pdf.groupby("k").v.sum(),
                                   check_names=False)


def test_dataframe_groupby_apply_shuffles(ddf, pdf):
    def top2(g):
        return g.nlargest(2, "v")

    meta = pdf.head(10).groupby("k").apply(top2).iloc[:0]
    top = ddf.groupby("k").apply(top2, meta=meta)
    got, expected = compute_both(top)
    pd.testing.assert_frame_equal(got[0].sort_values("u"), expected[0].sort_values("u"))
    reference = pdf.groupby("k").apply(top2)
    pd.testing.assert_frame_equal(got[0].sort_values("u"), reference.sort_values("u"),
                                  check_dtype=False)
    assert len(got[0]) == 2 * pdf.k.nunique()


def test_dataframe_shuffle(ddf, pdf):
    shuffled = ddf.shuffle("k")
    keys_per_partition = shuffled.map_partitions(lambda d: pd.Series([sorted(set(d.k))]),
                                                 meta=(None, "object"))
    got, expected = compute_both(shuffled, keys_per_partition)
    pd.testing.assert_frame_equal(sorted_frame(got[0], "u"), sorted_frame(expected[0], "u"))
    # (dask turns pandas' "str" columns into pyarrow strings: compare values only)
    pd.testing.assert_frame_equal(sorted_frame(got[0], "u"), sorted_frame(pdf, "u"),
                                  check_dtype=False)
    # the point of a shuffle: each k lives in exactly one partition
    partitions = [set(p) for p in got[1]]
    assert sum(len(p) for p in partitions) == pdf.k.nunique()
    assert set().union(*partitions) == set(pdf.k)
    assert list(got[1]) == list(expected[1])


def test_dataframe_merge(ddf, pdf):
    rng = np.random.default_rng(2)
    right = pd.DataFrame({"k": np.arange(0, 50), "label": rng.random(50)})
    dright_small = dd.from_pandas(right, npartitions=1)
    dright = dd.from_pandas(right, npartitions=3)
    on_broadcast = ddf.merge(dright_small, on="k", how="inner")
    on_hash = ddf.merge(dright, on="k", how="left", shuffle_method="tasks")
    self_join = ddf[["u", "v"]].merge(ddf[["u", "w"]], on="u")
    got, expected = compute_both(on_broadcast, on_hash, self_join)
    for g, e in zip(got, expected):
        pd.testing.assert_frame_equal(sorted_frame(g, list(g.columns)),
                                      sorted_frame(e, list(e.columns)))
    reference = pdf.merge(right, on="k", how="inner")
    pd.testing.assert_frame_equal(sorted_frame(got[0], list(reference.columns)),
                                  sorted_frame(reference, list(reference.columns)),
                                  check_dtype=False)


def test_dataframe_set_index(ddf, pdf):
    by_u = ddf.set_index("u")  # unique values: a full sort
    by_k = ddf.set_index("k", npartitions=3)
    got, expected = compute_both(by_u, by_k, by_u.v.cumsum())
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[0], pdf.set_index("u").sort_index(), check_dtype=False)
    assert got[1].index.is_monotonic_increasing
    pd.testing.assert_frame_equal(got[1].sort_values(["k", "u"]),
                                  expected[1].sort_values(["k", "u"]))
    pd.testing.assert_series_equal(got[2], expected[2])


def test_dataframe_set_index_default_scheduler(ddf, pdf):
    # the divisions are computed eagerly with the default scheduler: daskray
    out = ddf.set_index("u").compute()
    pd.testing.assert_frame_equal(out, pdf.set_index("u").sort_index(), check_dtype=False)


def test_large_dataframe_result():
    # about 20 MB: several out-of-band buffers of different dtypes
    n = 500_000
    rng = np.random.default_rng(5)
    big = pd.DataFrame({
        "a": np.arange(n, dtype="i8"),
        "b": rng.random(n),
        "c": rng.random(n).astype("f4"),
        "d": rng.integers(0, 1000, n),
        "e": pd.Categorical(rng.choice(["x", "y", "z"], n)),
    })
    assert big.memory_usage(deep=True).sum() > 12 * MB
    dbig = dd.from_pandas(big, npartitions=4)
    got, expected = compute_both(dbig, dbig.assign(f=dbig.b * 2)[dbig.d > 10])
    # check_exact: the values must be identical (and it is 100x faster on categoricals)
    pd.testing.assert_frame_equal(got[0], expected[0], check_exact=True)
    pd.testing.assert_frame_equal(got[0], big, check_exact=True)
    pd.testing.assert_frame_equal(got[1], expected[1], check_exact=True)


def test_large_dataframe_made_on_a_worker():
    def make(n):
        rng = np.random.default_rng(n)
        return pd.DataFrame({"x": rng.random(n), "y": np.arange(n), "s": ["s%d" % (i % 97) for i in range(n)]})

    frame = dask.delayed(make)(300_000)
    summary = dask.delayed(lambda d: d.groupby("s").x.sum())(frame)
    got, expected = compute_both(frame, summary)
    pd.testing.assert_frame_equal(got[0], expected[0], check_exact=True)
    pd.testing.assert_series_equal(got[1], expected[1])


# ======================================================================= bags


def test_bag_map_filter_foldby():
    b = db.from_sequence(range(1000), npartitions=8)
    evens = b.filter(lambda x: x % 2 == 0)
    squares = evens.map(lambda x: x * x)
    folded = b.foldby(lambda x: x % 7, operator.add, 0, operator.add, 0)
    counted = b.map(lambda x: {"k": x % 5, "v": x}).foldby(
        "k", lambda acc, r: acc + r["v"], 0, operator.add, 0)
    got, expected = compute_both(squares, squares.sum(), folded, counted, b.frequencies(),
                                 b.map(lambda x: x % 3).distinct(), b.count())
    assert got[0] == expected[0] == [x * x for x in range(0, 1000, 2)]
    assert got[1] == expected[1]
    assert sorted(got[2]) == sorted(expected[2]) == sorted(
        (k, sum(x for x in range(1000) if x % 7 == k)) for k in range(7))
    assert sorted(got[3]) == sorted(expected[3])
    assert sorted(got[4]) == sorted(expected[4])
    assert sorted(got[5]) == sorted(expected[5]) == [0, 1, 2]
    assert got[6] == 1000


def test_bag_groupby_and_to_dataframe():
    records = [{"name": f"n{i % 13}", "amount": i} for i in range(500)]
    b = db.from_sequence(records, npartitions=5)
    grouped = b.groupby(lambda r: r["name"], shuffle="tasks").map(
        lambda kv: (kv[0], sum(r["amount"] for r in kv[1])))
    frame = b.to_dataframe()
    got, expected = compute_both(grouped)
    assert sorted(got[0]) == sorted(expected[0])
    got, expected = compute_both(frame)  # apart: dask warns when mixing bags and dataframes
    pd.testing.assert_frame_equal(got[0], expected[0])


def test_bag_default_scheduler_is_daskray():
    # bags default to multiprocessing in dask; after init they run on daskray
    b = db.from_sequence(range(10), npartitions=2).map(lambda x: x + 1)
    assert b.compute() == list(range(1, 11))


# ==================================================================== delayed


def test_delayed_tree_reduction():
    @dask.delayed
    def load(i):
        return list(range(i * 10, i * 10 + 10))

    @dask.delayed
    def combine(a, b):
        return a + b

    parts = [load(i) for i in range(16)]
    while len(parts) > 1:
        parts = [combine(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    got, expected = compute_both(parts[0])
    assert got[0] == expected[0] == list(range(160))


def test_delayed_containers_kwargs_and_methods():
    @dask.delayed(pure=True)
    def f(x, y=1, *, z):
        return {"x": x, "sum": x + y + z}

    a = f(1, y=2, z=3)
    b = f(a["sum"], z=a["x"])
    c = dask.delayed(dict)(first=a, second=[b, (a, 4)])
    s = dask.delayed("-").join([dask.delayed(str)(i) for i in range(5)])
    got, expected = compute_both(c, s, a["sum"] * 10, {"nested": [a, b["sum"]]})
    assert got == expected
    assert got[0]["second"][1][1] == 4
    assert got[1] == "0-1-2-3-4"
    assert got[2] == 60
    assert got[3] == {"nested": [{"x": 1, "sum": 6}, 8]}


def test_delayed_with_numpy_and_pandas():
    @dask.delayed
    def frame(i):
        return pd.DataFrame({"i": [i] * 3, "v": np.arange(3) * i})

    total = dask.delayed(pd.concat)([frame(i) for i in range(6)], ignore_index=True)
    got, expected = compute_both(total, total.v.sum())
    pd.testing.assert_frame_equal(got[0], expected[0])
    assert got[1] == expected[1]


def test_delayed_shared_dependency_many_dependents():
    base = dask.delayed(np.arange)(300_000)  # 2.4 MB, used by 12 tasks on both workers
    outs = [dask.delayed(np.sum)(base * i) for i in range(12)]
    got, expected = compute_both(outs)
    assert got == expected
    assert got[0][5] == 5 * np.arange(300_000).sum()
