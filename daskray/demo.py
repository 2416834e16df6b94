"""The whole product in under a minute, on a local cluster: ``python -m daskray.demo``.

One line per step, each timed and checked against a reference computed another
way (dask's serial scheduler, numpy or pyarrow in the driver, a plain instance of
the actor's class, the trainer's single-process algorithm):

* a dask array and a dask DataFrame, on daskray (dask's default scheduler after
  ``init``), against ``scheduler="sync"``;
* remote functions reading a ``put`` array, against numpy;
* an Arrow table ``put`` once and read in place (shared memory) by tasks;
* an actor's method as a node of a dask graph;
* a short ``Trainer.fit`` on a ``Dataset.from_arrow``, against ``reference_fit``
  (bit-identical parameters);
* a small hyperparameter search (ASHA), its best trial against ``reference_fit``.

The exit status is 0 when every step said ``ok``, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any, Callable

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import daskray
from .ml import Dataset, Trainer, TuneConfig, models, reference_fit, tune

# ------------------------------------------------------------------ functions and actors


def _partial_sum(data: np.ndarray, start: int, stop: int) -> float:
    return float(data[start:stop].sum())


def _column_sums(table: Any) -> tuple[dict, bool]:
    """Per-column sums of an Arrow table, computed where the table is read, and
    whether its buffers are mapped from shared memory (not copied into the task)."""
    sums = {name: pc.sum(table.column(name)).as_py() for name in table.column_names}
    return sums, _in_shared_memory(table)


def _in_shared_memory(table: Any) -> bool:
    """Whether every buffer of ``table`` lies in this process's mappings of /dev/shm
    files (Linux's /proc/self/maps lists them)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                low, high = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((low, high))
    buffers = [b for column in table.columns for chunk in column.chunks
               for b in chunk.buffers() if b is not None]
    return all(any(low <= b.address and b.address + b.size <= high for low, high in ranges)
               for b in buffers)


def _square(x: int) -> int:
    return x * x


class Scaler:
    """Multiplies by a factor and counts its calls (state a task could not keep)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.calls = 0

    def scale(self, x: int) -> int:
        self.calls += 1
        return self.factor * x

    def call_count(self) -> int:
        return self.calls


# ------------------------------------------------------------------ the steps
# Each step returns (what it computed, whether it equals the reference).


def _dask_array() -> tuple[str, bool]:
    x = da.random.RandomState(0).random_sample((4000, 4000), chunks=1000)
    result = (x + x.T).mean(axis=0).sum()
    (value,) = dask.compute(result)  # daskray is dask's default scheduler now
    (expected,) = dask.compute(result, scheduler="sync")
    return f"(x + x.T).mean(axis=0).sum() = {value:.6g}", bool(np.isclose(value, expected))


def _dask_dataframe() -> tuple[str, bool]:
    pdf = pd.DataFrame({"k": np.arange(400_000) % 100, "v": np.arange(400_000.0)})
    result = dd.from_pandas(pdf, npartitions=8).groupby("k").v.mean()
    (value,) = dask.compute(result)
    (expected,) = dask.compute(result, scheduler="sync")
    ok = value.sort_index().equals(expected.sort_index())
    return f"groupby('k').v.mean() of 400,000 rows: {len(value)} groups", ok


def _remote_and_put() -> tuple[str, bool]:
    data = np.random.default_rng(1).random(2_500_000)  # 20 MB: goes to shared memory
    ref = daskray.put(data)
    task = daskray.remote(_partial_sum)
    bounds = np.linspace(0, len(data), 9, dtype=int)
    parts = daskray.get([task.remote(ref, int(a), int(b)) for a, b in zip(bounds, bounds[1:])])
    squares = daskray.get([daskray.remote(_square).remote(i) for i in range(100)])
    ok = np.isclose(sum(parts), data.sum()) and squares == [i * i for i in range(100)]
    return "8 tasks summed a put 20 MB array; 100 calls of a remote function", bool(ok)


def _arrow_in_place() -> tuple[str, bool]:
    rng = np.random.default_rng(2)
    table = pa.table({"a": rng.integers(0, 1000, 2_000_000), "b": rng.random(2_000_000)})
    ref = daskray.put(table)  # one copy in shared memory; readers map it
    reports = daskray.get([daskray.remote(_column_sums).remote(ref) for _ in range(4)])
    expected = {name: pc.sum(table.column(name)).as_py() for name in table.column_names}
    ok = all(sums["a"] == expected["a"] and np.isclose(sums["b"], expected["b"]) and mapped
             for sums, mapped in reports)
    return f"a {table.nbytes / 2**20:.0f} MB Arrow table put once, read in place by 4 tasks", ok


def _actor_in_dask_graph() -> tuple[str, bool]:
    actor = daskray.remote(Scaler).remote(3)
    graph = dask.delayed(sum)([dask.delayed(actor.scale)(dask.delayed(_square)(i))
                               for i in range(20)])
    value = graph.compute()
    local = Scaler(3)
    reference = dask.delayed(sum)([dask.delayed(local.scale)(dask.delayed(_square)(i))
                                   for i in range(20)])
    expected = reference.compute(scheduler="sync")
    calls = daskray.get(actor.call_count.remote())
    daskray.kill(actor)
    return f"20 calls of an actor's method in a dask graph, summed = {value}", \
        value == expected and calls == local.calls == 20


def _training_data() -> Any:
    """A three-class table, as Arrow, split and standardized as a Dataset."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 3000)
    points = rng.normal(0, 1.0, (3, 6))[labels] + rng.normal(0, 1, (3000, 6))
    table = pa.table({**{f"f{i}": points[:, i] for i in range(6)}, "label": labels})
    ds = Dataset.from_arrow(table, label="label", num_shards=6, seed=0)
    train, valid = ds.train_test_split(test_size=0.2, seed=0)
    train, stats = train.standardize()
    return train, valid.standardize(stats)[0]


def _same_params(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(
        np.array_equal(got[k], expected[k]) for k in expected)


def _trainer_fit(data: tuple) -> tuple[str, bool]:
    train, valid = data
    config = {"optimizer": "adam", "lr": 0.05, "batch_size": 256, "epochs": 5}
    result = Trainer(model=models.SoftmaxRegression(), train_config=config).fit(train, valid)
    expected = reference_fit(models.SoftmaxRegression(), daskray.get(train.shards), config,
                             classes=train.classes)
    accuracy = result.metrics["valid_accuracy"]
    return f"Trainer.fit, 5 epochs of Dataset.from_arrow: valid accuracy {accuracy:.3f}", \
        _same_params(result.checkpoint.params, expected) and accuracy > 0.8


def _search(data: tuple) -> tuple[str, bool]:
    train, valid = data
    best = Trainer(config=TuneConfig(metric="valid_loss", mode="min", num_samples=9, seed=0,
                                     scheduler=tune.ASHAScheduler(max_t=9, reduction_factor=3)),
                   model=models.SoftmaxRegression, train_config={"epochs": 9, "batch_size": 256},
                   param_space={"lr": tune.loguniform(1e-3, 1.0)}).fit(train, valid)
    iterations = best.grid.get_dataframe()["training_iteration"]
    stopped = int((iterations < 9).sum())
    expected = reference_fit(models.SoftmaxRegression(), daskray.get(train.shards),
                             {**best.config, "epochs": int(best.metrics["training_iteration"])},
                             classes=train.classes)
    ok = (not best.grid.errors and stopped > 0
          and _same_params(best.checkpoint.params, expected))
    return (f"ASHA over 9 trials: {stopped} stopped early, best lr {best.config['lr']:.3g}, "
            f"valid loss {best.metrics['valid_loss']:.3f}"), ok


# ------------------------------------------------------------------ running them


def _run(name: str, step: Callable[[], tuple[str, bool]]) -> bool:
    """Run one step and print its line: name, time, what it computed, ok or not."""
    start = time.perf_counter()
    try:
        detail, ok = step()
    except Exception:  # noqa: BLE001 - a failing step is reported, the others still run
        detail, ok = "raised:\n" + traceback.format_exc(), False
    elapsed = time.perf_counter() - start
    print(f"{name:24s} {elapsed:6.2f} s  {'ok' if ok else 'FAILED'}  {detail}", flush=True)
    return ok


def main() -> int:
    """Start a local cluster, run every step, shut the cluster down; the exit status."""
    total = time.perf_counter()
    results = [_run("daskray.init()", _init)]
    if not results[0]:
        daskray.shutdown()
        return 1
    try:
        data: list = []
        steps = [
            ("dask array", _dask_array),
            ("dask DataFrame", _dask_dataframe),
            ("remote functions, put", _remote_and_put),
            ("Arrow table in place", _arrow_in_place),
            ("actor in a dask graph", _actor_in_dask_graph),
            ("Dataset.from_arrow", lambda: _store(data, _training_data())),
            ("Trainer.fit", lambda: _trainer_fit(data[0])),
            ("search (ASHA)", lambda: _search(data[0])),
        ]
        for name, step in steps:
            results.append(_run(name, step))
    finally:
        daskray.shutdown()
    passed = sum(results)
    print(f"{passed} of {len(results)} steps ok in {time.perf_counter() - total:.1f} s")
    return 0 if passed == len(results) else 1


def _init() -> tuple[str, bool]:
    daskray.init()
    workers = int(daskray.cluster_resources()["CPU"])
    return f"a head process and {workers} worker processes", workers >= 1


def _store(box: list, data: tuple) -> tuple[str, bool]:
    """Keep the training data for the next steps; say what it is."""
    box.append(data)
    train, valid = data
    return f"{train.num_rows} training rows in {train.num_shards} shards, " \
           f"{valid.num_rows} validation rows", train.num_rows + valid.num_rows == 3000


if __name__ == "__main__":
    sys.exit(main())
