"""Run the same Dask workloads on daskray and on the schedulers it competes with.

The workloads W1-W5 are those of the reference measurements the targets come from
(same sizes, seeds and expressions; taken earlier on a 2-core machine like this one),
so the ratios printed here can be compared with them. Absolute times are noisy on a shared 2-core
machine; only the ratios from one run mean much.

Usage::

    python benchmarks/dask_workloads.py [--only W1,W3] [--schedulers daskray,sync,...] [--cold]
                                        [--repeat 3] [--json out.json] [--in-process]

"daskray-dist" is daskray on a dask.distributed cluster (the same LocalCluster as
"distributed": ``daskray.init(address=...)``, then ``daskray.get``); its own target
is against ``client.get`` on that cluster.

Each scheduler runs in a fresh interpreter of its own: it is started once, runs
every selected workload, and is shut down before the next one starts, so two
schedulers never compete for the cores, and none inherits what another left
behind.  (``--in-process`` runs them one after the other in this process, as
anchors.py does.  That is not neutral: distributed.LocalCluster leaves
``MALLOC_TRIM_THRESHOLD_=65536`` in ``os.environ``, which every process started
later inherits, and it makes a worker's freed buffers page-fault again.)
Graph construction is not timed: only ``dask.compute(obj, scheduler=...)`` is.
Every result is checked against the sync scheduler's value. Failures and wrong
results become ERROR rows; they never abort the run.

The workload builders (``WORKLOADS``) can be imported by tests:
``from benchmarks.dask_workloads import WORKLOADS``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

# --------------------------------------------------------------------------
# Task functions. Module-level so every scheduler can pickle them.
# --------------------------------------------------------------------------


def inc(x: int) -> int:
    """Add one: the leaf task of W1, as small as a task can be."""
    return x + 1


def add(*xs: Any) -> Any:
    """Sum the arguments: the fan-in task of W1 and W2."""
    return sum(xs)


def pyloop(n: int) -> int:
    """Pure-Python loop that holds the GIL for its whole run (W2)."""
    s = 0
    for i in range(n):
        s += i % 7
    return s


def partition_score(part: pd.DataFrame) -> float:
    """Per-partition statistic for W5: sum of v times the number of distinct keys.

    Depends on which rows land in which partition, so it checks that the
    shuffle really happened the same way on every scheduler.
    """
    return part["v"].sum() * len(part["k"].unique())


# --------------------------------------------------------------------------
# Workloads. Each builder returns a fresh, not-yet-computed dask object.
# --------------------------------------------------------------------------


def build_overhead(n: int = 20_000, fan_in: int = 8) -> Any:
    """W1: ``n`` tiny ``inc`` leaves tree-summed ``fan_in`` at a time (~22.8k tasks).

    Measures per-task scheduling overhead; the work itself is negligible.
    """
    level = [dask.delayed(inc)(i) for i in range(n)]
    while len(level) > 1:
        level = [dask.delayed(add)(*level[i:i + fan_in]) for i in range(0, len(level), fan_in)]
    return level[0]


def build_gil(tasks: int = 8, iterations: int = 8_000_000) -> Any:
    """W2: ``tasks`` independent GIL-bound Python loops, then their sum.

    Threads cannot run these in parallel; processes can (best case 2x on 2 cores).
    """
    parts = [dask.delayed(pyloop)(iterations) for _ in range(tasks)]
    return dask.delayed(add)(*parts)


def build_array(size: int = 8000, chunk: int = 1000) -> Any:
    """W3: ``(x + x.T).mean(axis=0).sum()`` on a random ``size``x``size`` array.

    NumPy releases the GIL, and the transpose moves whole chunks between tasks,
    so this measures data movement as much as compute.
    """
    x = da.random.RandomState(0).random_sample((size, size), chunks=(chunk, chunk))
    return (x + x.T).mean(axis=0).sum()


def build_frame(rows: int = 4_000_000, npartitions: int = 16) -> Any:
    """W4: groupby-aggregate (mean of v, sum of w by k) over a random DataFrame."""
    rs = np.random.RandomState(0)
    pdf = pd.DataFrame({
        "k": rs.randint(0, 1000, rows),
        "v": rs.random_sample(rows),
        "w": rs.random_sample(rows),
    })
    df = dd.from_pandas(pdf, npartitions=npartitions)
    g = df.groupby("k").agg({"v": "mean", "w": "sum"})
    return g["v"].sum() + g["w"].sum()


def build_shuffle(rows: int = 2_000_000, npartitions: int = 16) -> Any:
    """W5: hash-shuffle a random DataFrame on its key, then a per-partition statistic."""
    rs = np.random.RandomState(1)
    pdf = pd.DataFrame({"k": rs.randint(0, 100_000, rows), "v": rs.random_sample(rows)})
    df = dd.from_pandas(pdf, npartitions=npartitions)
    shuffled = df.shuffle("k", npartitions=npartitions)
    return shuffled.map_partitions(partition_score).sum()


#: Workload name -> builder. Names (and their order) are those of anchors.py.
WORKLOADS: dict[str, Callable[[], Any]] = {
    "W1_overhead_20k_tasks": build_overhead,
    "W2_gil_bound_8x": build_gil,
    "W3_array_8k": build_array,
    "W4_frame_groupby_4M": build_frame,
    "W5_shuffle_2M": build_shuffle,
}

#: daskray on a dask.distributed cluster against ``client.get`` on the same cluster:
#: it should cost about what distributed itself costs
ON_DISTRIBUTED = ("daskray-dist", "distributed", 1.25)

#: Issue targets: workload id -> [(daskray scheduler, competitor, highest allowed ratio)].
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "W1": [("daskray", "sync", 3.0), ON_DISTRIBUTED],
    "W2": [("daskray", "sync", 0.7), ON_DISTRIBUTED],
    "W3": [("daskray", "threads", 1.25), ("daskray", "distributed", 0.5), ON_DISTRIBUTED],
    "W4": [("daskray", "threads", 1.25), ("daskray", "distributed", 0.5), ON_DISTRIBUTED],
    "W5": [("daskray", "threads", 1.25), ("daskray", "distributed", 0.5), ON_DISTRIBUTED],
}


def workload_id(name: str) -> str:
    """Short id of a workload name: ``"W3_array_8k"`` -> ``"W3"``."""
    return name.split("_", 1)[0]


def select_workloads(only: list[str] | None) -> list[str]:
    """Workload names matching ``only`` (ids like "W1" or name prefixes); all if None."""
    if not only:
        return list(WORKLOADS)
    chosen = [w for w in WORKLOADS if any(w.startswith(o) for o in only)]
    unknown = [o for o in only if not any(w.startswith(o) for w in WORKLOADS)]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; known: {list(WORKLOADS)}")
    return chosen


# --------------------------------------------------------------------------
# Schedulers. Each is a context manager: start on enter, yield the value to
# pass as ``dask.compute(..., scheduler=...)``, shut down on exit.
# --------------------------------------------------------------------------


def _quietly(label: str, stop: Callable[[], Any]) -> None:
    """Call a shutdown function; report (don't raise) if it fails, so the run goes on."""
    try:
        stop()
    except Exception as exc:  # a failing shutdown must not hide the results
        print(f"note: {label} failed: {type(exc).__name__}: {exc}", flush=True)


@contextlib.contextmanager
def _local_scheduler(name: str) -> Iterator[str]:
    """Dask's built-in schedulers ("sync", "threads", "processes"): nothing to start."""
    yield name


@contextlib.contextmanager
def _daskray_scheduler() -> Iterator[Callable[..., Any]]:
    """daskray with two workers (``daskray.init`` / ``daskray.get`` / ``daskray.shutdown``)."""
    import daskray

    try:
        daskray.init(num_workers=2)
    except BaseException:
        if hasattr(daskray, "shutdown"):  # clean up whatever init managed to start
            _quietly("daskray.shutdown after a failed init", daskray.shutdown)
        raise
    try:
        yield daskray.get
    finally:
        _quietly("daskray.shutdown", daskray.shutdown)


def _local_dask_cluster() -> Any:
    """distributed.LocalCluster: 2 worker processes with 1 thread each, no dashboard."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                        dashboard_address=None)


@contextlib.contextmanager
def _distributed_scheduler() -> Iterator[Callable[..., Any]]:
    """``client.get`` on a :func:`_local_dask_cluster`."""
    from distributed import Client

    cluster = _local_dask_cluster()
    try:
        client = Client(cluster)
    except BaseException:
        _quietly("LocalCluster.close", cluster.close)
        raise
    try:
        yield client.get
    finally:
        _quietly("Client.close", client.close)
        _quietly("LocalCluster.close", cluster.close)


@contextlib.contextmanager
def _daskray_on_distributed_scheduler() -> Iterator[Callable[..., Any]]:
    """daskray on a :func:`_local_dask_cluster` (``daskray.init(address=...)``)."""
    import daskray

    cluster = _local_dask_cluster()
    try:
        daskray.init(address=cluster.scheduler_address)
    except BaseException:
        _quietly("LocalCluster.close", cluster.close)
        raise
    try:
        yield daskray.get
    finally:
        _quietly("daskray.shutdown", daskray.shutdown)
        _quietly("LocalCluster.close", cluster.close)


@contextlib.contextmanager
def _ray_scheduler() -> Iterator[Callable[..., Any]]:
    """Ray's Dask scheduler (``ray.util.dask.ray_dask_get``) on a 2-CPU local Ray."""
    import ray
    from ray.util.dask import ray_dask_get

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray_dask_get
    finally:
        _quietly("ray.shutdown", ray.shutdown)


#: Scheduler name -> context-manager factory, in default run order.
#: "sync" comes first: its values are the reference for every other scheduler.
SCHEDULERS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "sync": lambda: _local_scheduler("sync"),
    "daskray": _daskray_scheduler,
    "threads": lambda: _local_scheduler("threads"),
    "processes": lambda: _local_scheduler("processes"),
    "distributed": _distributed_scheduler,
    "daskray-dist": _daskray_on_distributed_scheduler,
    "ray": _ray_scheduler,
}


def ray_available() -> bool:
    """True when ``import ray`` works (Ray is optional and usually not installed)."""
    try:
        import ray  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------
# Running and checking.
# --------------------------------------------------------------------------


@dataclass
class Result:
    """Outcome of one workload on one scheduler."""

    workload: str
    scheduler: str
    times: list[float] = field(default_factory=list)
    value: float | None = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        """Median seconds over the repeats, or None if the row is an error."""
        if self.error or not self.times:
            return None
        return statistics.median(self.times)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for ``--json``."""
        row = asdict(self)
        row["median_s"] = self.median
        row["min_s"] = min(self.times) if self.times else None
        return row


def _short_error(exc: BaseException) -> str:
    """One-line description of an exception, for an ERROR row."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:200]


def _as_number(value: Any) -> float:
    """The scalar a workload computes, as a float (raises if it is not a scalar)."""
    return float(np.asarray(value).item())


def time_compute(obj: Any, scheduler: Any) -> tuple[float, Any]:
    """Seconds taken by ``dask.compute(obj, scheduler=scheduler)``, and its value."""
    start = time.perf_counter()
    (value,) = dask.compute(obj, scheduler=scheduler)
    return time.perf_counter() - start, value


def run_workload(name: str, scheduler_name: str, scheduler: Any, repeat: int,
                 reference: float | None, warm: bool = False) -> Result:
    """Time one workload ``repeat`` times on a started scheduler and check its value.

    The dask object is built fresh before each repeat (untimed).  ``warm`` (the
    default, as in anchors.py's ``obj, _ = wf()``, which measured the figures
    the targets come from): the previous repeat's object stays alive while the
    next is built, and dask's expression cache skips most of the driver's
    optimizing, so the scheduler's own cost shows.  Cold: it is gone first, so
    dask optimizes every graph from scratch in the driver (~0.4 s for W4),
    whatever the scheduler.
    An exception or a value differing from ``reference`` makes the result an error.
    """
    result = Result(name, scheduler_name)
    previous = None
    for _ in range(repeat):
        try:
            obj = WORKLOADS[name]()
            gc.collect()  # keep the previous repeat's garbage out of the timing
            seconds, value = time_compute(obj, scheduler)
            previous = obj if warm else None  # noqa: F841 - kept alive on purpose
            del obj
            result.value = _as_number(value)
        except Exception as exc:
            result.error = _short_error(exc)
            return result
        result.times.append(seconds)
        if reference is not None and not np.isclose(result.value, reference):
            result.error = f"wrong result: got {result.value!r}, sync gave {reference!r}"
            return result
    return result


def run_isolated(scheduler_name: str, workloads: list[str], repeat: int,
                 references: dict[str, float], warm: bool = False) -> list[Result]:
    """:func:`run_scheduler` in a fresh interpreter (this script with
    ``--in-process``); its results come back through a JSON file.  Values of the
    sync scheduler are added to ``references``, as run_scheduler does."""
    with tempfile.TemporaryDirectory(prefix="daskray-bench-") as tmp:
        path = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--in-process",
               "--schedulers", scheduler_name, "--only", ",".join(workloads),
               "--repeat", str(repeat), "--references", json.dumps(references),
               "--results-file", path, *([] if warm else ["--cold"])]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():  # progress lines; the table is the parent's
            if line.startswith(tuple(workloads)) or line.startswith("note:"):
                print(line, flush=True)
        if not os.path.exists(path):
            error = f"benchmark process exited with code {proc.returncode} (see above)"
            return [Result(w, scheduler_name, error=error) for w in workloads]
        with open(path) as f:
            rows = json.load(f)
    results = [Result(r["workload"], r["scheduler"], r["times"], r["value"], r["error"])
               for r in rows]
    if scheduler_name == "sync":
        references.update({r.workload: r.value for r in results if r.error is None})
    return results


def compute_references(workloads: list[str]) -> dict[str, float]:
    """Values of the workloads on the sync scheduler (untimed), for checking others.

    Used only when "sync" is not among the benchmarked schedulers.
    """
    refs: dict[str, float] = {}
    for name in workloads:
        try:
            refs[name] = _as_number(dask.compute(WORKLOADS[name](), scheduler="sync")[0])
        except Exception as exc:
            print(f"note: no sync reference for {name}: {_short_error(exc)}", flush=True)
    return refs


def run_scheduler(scheduler_name: str, workloads: list[str], repeat: int,
                  references: dict[str, float], warm: bool = False) -> list[Result]:
    """Start one scheduler, run every workload on it, shut it down.

    A scheduler that fails to start yields an ERROR row for every workload.
    Values from the sync scheduler are added to ``references`` as they appear.
    """
    with contextlib.ExitStack() as stack:
        try:
            scheduler = stack.enter_context(SCHEDULERS[scheduler_name]())
        except Exception as exc:
            error = f"could not start: {_short_error(exc)}"
            results = [Result(w, scheduler_name, error=error) for w in workloads]
            for r in results:
                print_progress(r)
            return results
        results = []
        for name in workloads:
            result = run_workload(name, scheduler_name, scheduler, repeat,
                                  references.get(name), warm)
            if scheduler_name == "sync" and result.error is None:
                references[name] = result.value
            print_progress(result)
            results.append(result)
        return results


def print_progress(result: Result) -> None:
    """Print one result as soon as it is known."""
    if result.error:
        status = f"ERROR {result.error}"
    else:
        status = (f"median {result.median:8.3f}s  min {min(result.times):8.3f}s  "
                  f"value {result.value:.10g}")
    print(f"{result.workload:<24} {result.scheduler:<12} {status}", flush=True)


# --------------------------------------------------------------------------
# Summary table.
# --------------------------------------------------------------------------


def ratio(results: dict[tuple[str, str], Result], workload: str, competitor: str,
          scheduler: str = "daskray") -> float | None:
    """``scheduler`` (daskray) median / competitor median for one workload, or None if
    either is missing."""
    ours = results.get((workload, scheduler))
    theirs = results.get((workload, competitor))
    if ours is None or theirs is None or ours.median is None or not theirs.median:
        return None
    return ours.median / theirs.median


def check_targets(results: dict[tuple[str, str], Result],
                  workload: str) -> list[dict[str, Any]]:
    """The issue targets of one workload with their measured ratio and PASS/FAIL/n/a.

    n/a if daskray or the competitor was not run, or the competitor errored (nothing to
    compare with); FAIL if daskray errored or is too slow.
    """
    checks = []
    for scheduler, competitor, limit in TARGETS.get(workload_id(workload), []):
        ours = results.get((workload, scheduler))
        r = ratio(results, workload, competitor, scheduler)
        theirs = results.get((workload, competitor))
        if ours is None or theirs is None or theirs.error is not None:
            status = "n/a"
        elif ours.error is not None:
            status = "FAIL"
        else:
            status = "PASS" if r <= limit else "FAIL"
        checks.append({"workload": workload, "scheduler": scheduler,
                       "competitor": competitor, "limit": limit, "ratio": r, "status": status})
    return checks


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-align the first column, right-align the others, pad to common widths."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1])]
        parts.append(cells[-1].ljust(widths[-1]) if len(cells) > 1 else "")
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def summary_table(results: list[Result], workloads: list[str], schedulers: list[str]) -> str:
    """Rows = workloads; columns = median seconds per scheduler, daskray/competitor
    ratios (and daskray-dist/distributed), and the issue targets with PASS/FAIL."""
    by_key = {(r.workload, r.scheduler): r for r in results}
    pairs = [("daskray", c) for c in schedulers
             if "daskray" in schedulers and not c.startswith("daskray")]
    ours, competitor, _ = ON_DISTRIBUTED
    if ours in schedulers and competitor in schedulers:
        pairs.append((ours, competitor))
    header = ["workload", *schedulers, *(f"{s}/{c}" for s, c in pairs), "targets"]
    rows = []
    for w in workloads:
        cells = [w]
        for s in schedulers:
            r = by_key.get((w, s))
            cells.append("ERROR" if r is None or r.median is None else f"{r.median:.3f}")
        for s, c in pairs:
            x = ratio(by_key, w, c, s)
            cells.append("n/a" if x is None else f"{x:.2f}x")
        targets = [("" if t["scheduler"] == "daskray" else f"{t['scheduler']}:")
                   + f"{t['competitor']}<={t['limit']:g}x {t['status']}"
                   for t in check_targets(by_key, w)]
        cells.append(", ".join(targets))
        rows.append(cells)
    return _format_table(header, rows)


def print_errors(results: list[Result]) -> None:
    """List every ERROR row in full below the table."""
    errors = [r for r in results if r.error]
    if errors:
        print("\nErrors:")
        for r in errors:
            print(f"  {r.workload} on {r.scheduler}: {r.error}")


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="",
                   help="comma-separated workload ids or name prefixes, e.g. W1,W3 (default: all)")
    p.add_argument("--schedulers", default=",".join(SCHEDULERS),
                   help=f"comma-separated subset of {','.join(SCHEDULERS)} (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per workload (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--cold", action="store_true",
                   help="drop each repeat's dask object before the next is built, so dask "
                        "re-optimizes every graph in the driver (by default it stays alive, "
                        "as in anchors.py, and dask's expression cache skips that work)")
    p.add_argument("--in-process", action="store_true",
                   help="run every scheduler in this process instead of one fresh process each")
    p.add_argument("--references", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--results-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.schedulers = [s for s in args.schedulers.split(",") if s]
    unknown = [s for s in args.schedulers if s not in SCHEDULERS]
    if unknown:
        p.error(f"unknown scheduler(s) {unknown}; known: {','.join(SCHEDULERS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    try:
        args.workloads = select_workloads([o for o in args.only.split(",") if o])
    except ValueError as exc:
        p.error(str(exc))
    return args


def order_schedulers(names: list[str]) -> list[str]:
    """Put "sync" first (it provides the reference values); keep the rest in given order.

    Drops "ray" with a printed note when Ray is not installed.
    """
    names = list(dict.fromkeys(names))  # de-duplicate, keep order
    if "ray" in names and not ray_available():
        print("note: ray is not installed; skipping the ray_dask_get scheduler", flush=True)
        names.remove("ray")
    if "sync" in names:
        names.remove("sync")
        names.insert(0, "sync")
    return names


def environment() -> dict[str, Any]:
    """Versions and machine facts stored with ``--json`` results."""
    import distributed

    return {"python": platform.python_version(), "dask": dask.__version__,
            "distributed": distributed.__version__, "numpy": np.__version__,
            "pandas": pd.__version__, "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 1 if any ERROR row was recorded, else 0."""
    args = parse_args(argv)
    schedulers = order_schedulers(args.schedulers)
    references: dict[str, float] = json.loads(args.references)
    if "sync" not in schedulers and not references:
        print("note: sync not selected; computing reference values with sync (untimed)",
              flush=True)
        references = compute_references(args.workloads)

    run = run_scheduler if args.in_process else run_isolated
    results: list[Result] = []
    for name in schedulers:
        try:
            results += run(name, args.workloads, args.repeat, references, not args.cold)
        except Exception:  # an unexpected bug with one scheduler must not lose the others
            traceback.print_exc()
            results += [Result(w, name, error="benchmark crashed (see traceback above)")
                        for w in args.workloads]
    if args.results_file:  # a child run of run_isolated: the parent prints the table
        with open(args.results_file, "w") as f:
            json.dump([r.to_json() for r in results], f)
        return 0

    print(f"\nMedian seconds of {args.repeat} run(s); ratios are daskray time / competitor "
          "time (daskray-dist: daskray on the distributed cluster).")
    print(summary_table(results, args.workloads, schedulers))
    print_errors(results)

    if args.json:
        by_key = {(r.workload, r.scheduler): r for r in results}
        doc = {"environment": environment(), "repeat": args.repeat,
               "results": [r.to_json() for r in results],
               "targets": [t for w in args.workloads for t in check_targets(by_key, w)]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/; add the checkout root so the
    # daskray being developed here is importable without installing it.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(1, _root)
    sys.exit(main())
