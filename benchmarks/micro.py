"""Ray-style core microbenchmarks, the same code on daskray and (when installed) on Ray.

Usage::

    python benchmarks/micro.py [--window 1.0] [--runtimes daskray,ray]

Each runtime runs in a subprocess of its own, one after the other, so two runtimes
never compete for the (two) cores.  The subprocess starts the runtime with two
workers, measures every figure and prints one JSON line per figure; the parent
collects them and prints a table with:

- daskray's value and Ray's value measured in this run (Ray only if ``import ray``
  works; otherwise it is skipped with a note),
- Ray 2.60's figures on this machine copied from ``/work/shared/ANCHORS.md``
  ("busy machine" column) -- a reference, *not measured in this run*,
- the issue targets with PASS/FAIL.

Rates are operations per second over a time window after a warm-up call: each
figure spends about ``--window`` seconds, split into three equal windows, and the
median of the three is reported.  A figure that raises is reported as ERROR and
the run goes on; a runtime that hangs is stopped after a timeout and its missing
figures become ERROR.  Exit status is 1 if there was any ERROR.

The machine is noisy (2 shared cores): compare figures within one run.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

#: prefix of the lines a runtime subprocess reports its figures on
MARK = "@@micro "

MB = 2**20
BIG_BYTES = 100 * MB       # put/get 100 MB, and the in-task get
ARG_BYTES = 10 * MB        # the task argument
SMALL_BYTES = 1024         # the 1 KB object of the in-task get
ASYNC_BATCH = 500          # tasks / actor calls in flight

# figure key -> (label, unit, Ray 2.60 on this machine, busy, from ANCHORS.md or None)
FIGURES: dict[str, tuple[str, str, float | None]] = {
    "init_s": ("init() seconds", "s", 8.6),
    "tasks_sync_per_s": ("tasks, sync round trip", "/s", 379),
    "tasks_async_per_s": (f"tasks, async ({ASYNC_BATCH} in flight)", "/s", 994),
    "put_small_per_s": ("put small object", "/s", 853),
    "get_small_per_s": ("get small object", "/s", 5425),
    "put_100MB_GB_per_s": ("put 100 MB", "GB/s", 1.7),
    "get_100MB_GB_per_s": ("get 100 MB (already in the store)", "GB/s", 338),
    "task_10MB_arg_per_s": ("task with a 10 MB argument", "/s", 181),
    "get_in_task_100MB_vs_1KB": ("get in a task: 100 MB time / 1 KB time", "ratio", None),
    "get_in_driver_100MB_vs_1KB": ("get in the driver: 100 MB time / 1 KB time", "ratio", None),
    "actor_calls_sync_per_s": ("actor calls, sync", "/s", 1008),
    "actor_calls_async_per_s": (f"actor calls, async ({ASYNC_BATCH} in flight)", "/s", 2243),
}
ANCHOR_COLUMN = "Ray 2.60 here, busy (ANCHORS.md)"


# --------------------------------------------------------------------------
# What runs in tasks and actors.  Module-level; wrapped with ``rt.remote`` once
# the runtime is known.  The script runs as __main__, so both runtimes pickle
# these by value.
# --------------------------------------------------------------------------


def noop(*args: Any) -> int:
    """The empty task (its arguments, if any, are only received)."""
    return 0


def get_probe(runtime: str, small: list, big: list, seconds: float) -> dict:
    """Time ``get`` of a 1 KB and a 100 MB object, from inside a task or the driver.

    ``small`` and ``big`` each hold one ObjectRef, nested in a list so the runtime
    passes the ref (not the value) to the task.  Each object is read once untimed
    (``first_s`` is kept for information), then repeatedly for about ``seconds``
    in all; the median of the repeated reads is what counts.
    """
    rt = importlib.import_module(runtime)
    out: dict[str, Any] = {"pid": os.getpid()}
    for name, holder in (("1KB", small), ("100MB", big)):
        ref = holder[0]
        t = time.perf_counter()
        value = rt.get(ref)
        out[f"first_{name}_s"] = time.perf_counter() - t
        assert value.nbytes == (SMALL_BYTES if name == "1KB" else BIG_BYTES)
        del value
        times: list[float] = []
        end = time.perf_counter() + seconds / 2
        while len(times) < 3 or (time.perf_counter() < end and len(times) < 2000):
            t = time.perf_counter()
            value = rt.get(ref)
            times.append(time.perf_counter() - t)
            del value
        out[f"median_{name}_s"] = statistics.median(times)
        out[f"n_{name}"] = len(times)
    return out


class Actor:
    """The actor of the actor-call figures (used only if the runtime has actors)."""

    def small(self, *args: Any) -> int:
        return 0


# --------------------------------------------------------------------------
# The runtime subprocess.
# --------------------------------------------------------------------------


def report(figure: str, value: Any = None, error: str | None = None,
           detail: Any = None) -> None:
    """One figure on stdout, for the parent: a float, "n/a", or an error message."""
    record: dict[str, Any] = {"figure": figure}
    if error is not None:
        record["error"] = error
    else:
        record["value"] = value
    if detail is not None:
        record["detail"] = detail
    print(MARK + json.dumps(record), flush=True)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def make_rate(window: float) -> Callable[..., float]:
    def rate(fn: Callable[[], Any], per_call: float = 1) -> float:
        """Operations per second: warm-up, then the median of 3 windows of window/3 s."""
        fn()
        rates = []
        for _ in range(3):
            n, t0 = 0, time.perf_counter()
            while True:  # at least one call, even if one call outlasts the window
                fn()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= window / 3:
                    break
            rates.append(n * per_call / elapsed)
        return statistics.median(rates)
    return rate


def start_runtime(name: str) -> Any:
    if name == "ray":
        import ray as rt
        rt.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    elif name == "daskray":
        import daskray as rt
        rt.init(num_workers=2)
    else:
        raise ValueError(f"unknown runtime {name!r}")
    return rt


def measure(name: str, rt: Any, window: float) -> None:
    """Every figure after init, each reported as soon as it is known."""
    rate = make_rate(window)

    def figure(key: str, fn: Callable[[], Any], scale: float = 1.0) -> None:
        try:
            value = fn()
        except Exception as exc:  # one figure failing must not stop the others
            traceback.print_exc()  # to stderr; the parent shows it on failure
            report(key, error=short_error(exc))
        else:
            if isinstance(value, tuple):
                value, detail = value
            else:
                detail = None
            report(key, value * scale if isinstance(value, (int, float)) else value,
                   detail=detail)
        gc.collect()

    remote_noop = rt.remote(noop)
    remote_probe = rt.remote(get_probe)

    figure("tasks_sync_per_s", lambda: rate(lambda: rt.get(remote_noop.remote())))
    figure("tasks_async_per_s", lambda: rate(
        lambda: rt.get([remote_noop.remote() for _ in range(ASYNC_BATCH)]), ASYNC_BATCH))
    figure("put_small_per_s", lambda: rate(lambda: rt.put(0)))

    def get_small() -> float:
        ref = rt.put(0)
        return rate(lambda: rt.get(ref))
    figure("get_small_per_s", get_small)

    big = np.ones(BIG_BYTES // 8)
    figure("put_100MB_GB_per_s", lambda: rate(lambda: rt.put(big)), BIG_BYTES / 1e9)

    def get_big() -> float:
        ref = rt.put(big)
        rt.get(ref)  # the figure is about an object already in the store
        return rate(lambda: rt.get(ref))
    figure("get_100MB_GB_per_s", get_big, BIG_BYTES / 1e9)

    def task_with_arg() -> float:
        ref = rt.put(np.ones(ARG_BYTES // 8))
        return rate(lambda: rt.get(remote_noop.remote(ref)))
    figure("task_10MB_arg_per_s", task_with_arg)

    def get_in_task() -> tuple[float, dict]:
        small_ref = rt.put(np.ones(SMALL_BYTES // 8))
        big_ref = rt.put(big)
        # two probes at once, so both workers are likely to run one: an object may
        # be cheaper to read on the worker that holds it than on the other one
        probes = rt.get([remote_probe.remote(name, [small_ref], [big_ref], window)
                         for _ in range(2)])
        ratios = [p["median_100MB_s"] / p["median_1KB_s"] for p in probes]
        worst = max(range(len(probes)), key=lambda i: ratios[i])
        detail = {
            "probes": [{k: (round(v * 1e6, 1) if k.endswith("_s") else v)
                        for k, v in p.items()} for p in probes],
            "note": "times in microseconds; the value is the worst probe's ratio of "
                    "median get times",
            "worst": worst,
        }
        return ratios[worst], detail
    figure("get_in_task_100MB_vs_1KB", get_in_task)

    def get_in_driver() -> tuple[float, dict]:
        probe = get_probe(name, [rt.put(np.ones(SMALL_BYTES // 8))], [rt.put(big)], window)
        detail = {k: (round(v * 1e6, 1) if k.endswith("_s") else v) for k, v in probe.items()}
        detail["note"] = "times in microseconds"
        return probe["median_100MB_s"] / probe["median_1KB_s"], detail
    figure("get_in_driver_100MB_vs_1KB", get_in_driver)
    del big
    gc.collect()

    try:
        actor_class = rt.remote(Actor)
    except NotImplementedError as exc:
        for key in ("actor_calls_sync_per_s", "actor_calls_async_per_s"):
            report(key, "n/a", detail=f"no actors: {short_error(exc)}")
        return

    state: dict[str, Any] = {}

    def actor_sync() -> float:
        state["actor"] = actor_class.remote()
        a = state["actor"]
        return rate(lambda: rt.get(a.small.remote()))
    figure("actor_calls_sync_per_s", actor_sync)

    def actor_async() -> float:
        a = state.get("actor") or actor_class.remote()
        return rate(lambda: rt.get([a.small.remote() for _ in range(ASYNC_BATCH)]),
                    ASYNC_BATCH)
    figure("actor_calls_async_per_s", actor_async)


def child_main(name: str, window: float) -> int:
    """Run in the runtime's own subprocess: init, measure, always shut down."""
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, on_term)  # so the finally below still runs

    rt = None
    try:
        t0 = time.perf_counter()
        try:
            rt = start_runtime(name)
        except Exception as exc:
            traceback.print_exc()
            report("init_s", error=short_error(exc))
            return 1
        report("init_s", time.perf_counter() - t0)
        measure(name, rt, window)
        return 0
    finally:
        if rt is not None:
            try:
                rt.shutdown()
            except Exception:
                traceback.print_exc()


# --------------------------------------------------------------------------
# The parent: one subprocess per runtime, then the table.
# --------------------------------------------------------------------------


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except Exception:
        return False
    return True


def run_runtime(name: str, window: float) -> dict[str, dict]:
    """Start ``python micro.py --child name`` and collect its figures as they come."""
    timeout = 120 + 40 * window
    results: dict[str, dict] = {}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", name,
             "--window", str(window)],
            stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
            start_new_session=True)
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            proc.terminate()  # the child shuts its runtime down on SIGTERM
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                try:  # our child's own process group (it started a new session)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not line.startswith(MARK):
                    print(f"  [{name}] {line.rstrip()}")
                    continue
                try:
                    record = json.loads(line[len(MARK):])
                except ValueError:
                    print(f"  [{name}] unreadable report: {line.rstrip()}")
                    continue
                results[record["figure"]] = record
                print(f"  {name:8s} {record['figure']:26s} {cell(record)}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
        missing = [k for k in FIGURES if k not in results]
        why = (f"timed out after {timeout:.0f} s" if timed_out.is_set()
               else f"runtime process exited with status {rc}" if rc
               else "not reported")
        for key in missing:
            results[key] = {"figure": key, "error": why}
        if rc or missing or any("error" in r for r in results.values()):
            err.seek(0)
            tail = err.read().strip().splitlines()[-25:]
            if tail:
                print(f"  [{name}] stderr (last {len(tail)} lines):")
                for line in tail:
                    print(f"  [{name}]   {line}")
    return results


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.2f}"
    if unit in ("GB/s", "ratio"):
        return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"
    return f"{value:,.0f}"


def cell(record: dict | None, unit: str | None = None) -> str:
    if record is None:
        return "not run"
    if "error" in record:
        return "ERROR"
    value = record["value"]
    if not isinstance(value, (int, float)):
        return str(value)
    return fmt(value, unit or FIGURES[record["figure"]][1])


def number(results: dict[str, dict[str, dict]], runtime: str, key: str) -> float | None:
    value = results.get(runtime, {}).get(key, {}).get("value")
    return float(value) if isinstance(value, (int, float)) else None


def check_targets(results: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    """The issue's targets: (target, PASS/FAIL/n/a, what it was checked against)."""
    rows = []
    ours = number(results, "daskray", "tasks_async_per_s")
    ray = number(results, "ray", "tasks_async_per_s")
    if ray is not None:
        basis, ref = "Ray measured in this run", ray
    else:
        basis, ref = "ANCHORS.md Ray 2.60 busy, not measured in this run", \
            FIGURES["tasks_async_per_s"][2]
    for goal, name in ((1, "target"), (5, "goal")):
        label = f"async task throughput ≥ {goal}× Ray's ({name})"
        if ours is None:
            rows.append((label, "FAIL" if "daskray" in results else "n/a", "daskray: no value"))
        else:
            ok = ours >= goal * ref
            rows.append((label, "PASS" if ok else "FAIL",
                         f"{ours:,.0f}/s vs {ref:,.0f}/s = {ours / ref:.2f}× ({basis})"))
    for key, where in (("get_in_task_100MB_vs_1KB", "in a task"),
                       ("get_in_driver_100MB_vs_1KB", "in the driver")):
        ratio = number(results, "daskray", key)
        label = f"get of 100 MB zero-copy: ≤ 10× the time of 1 KB ({where})"
        if ratio is None:
            rows.append((label, "FAIL" if "daskray" in results else "n/a", "daskray: no value"))
        else:
            rows.append((label, "PASS" if ratio <= 10 else "FAIL", f"ratio {ratio:,.1f}"))
    init = number(results, "daskray", "init_s")
    label = "init() ≤ 1 s"
    if init is None:
        rows.append((label, "FAIL" if "daskray" in results else "n/a", "daskray: no value"))
    else:
        rows.append((label, "PASS" if init <= 1.0 else "FAIL", f"{init:.2f} s"))
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def print_report(results: dict[str, dict[str, dict]], runtimes: list[str],
                 window: float) -> None:
    header = ["figure", "unit", *runtimes, ANCHOR_COLUMN]
    rows = []
    for key, (label, unit, anchor) in FIGURES.items():
        rows.append([label, unit, *(cell(results.get(r, {}).get(key), unit) for r in runtimes),
                     fmt(anchor, unit)])
    print()
    print(f"Microbenchmarks, {window:g} s per figure, 2 workers each "
          f"({os.cpu_count()} cores, Python {platform.python_version()})")
    print(table(header, rows))
    print(f"The '{ANCHOR_COLUMN}' column is copied from /work/shared/ANCHORS.md "
          "(Ray core microbenchmarks, busy machine): NOT measured in this run.")
    if "ray" not in runtimes:
        print("Ray was not measured in this run (not installed or not selected).")

    errors = [(r, k, rec["error"]) for r in runtimes
              for k, rec in results.get(r, {}).items() if "error" in rec]
    if errors:
        print("\nErrors:")
        for r, k, e in errors:
            print(f"  {r} {k}: {e}")

    notes = [(r, k, rec["detail"]) for r in runtimes
             for k, rec in results.get(r, {}).items() if rec.get("detail") is not None]
    if notes:
        print("\nDetails:")
        for r, k, d in notes:
            print(f"  {r} {k}: {json.dumps(d)}")

    print("\nIssue targets (daskray):")
    print(table(["target", "result", "measured"],
                [list(row) for row in check_targets(results)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=1.0,
                        help="seconds spent timing each figure (3 windows of a third each)")
    parser.add_argument("--runtimes", default="daskray,ray",
                        help="comma-separated, run in this order: daskray, ray")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one runtime's process
    args = parser.parse_args(argv)
    if args.window <= 0:
        parser.error("--window must be positive")
    if args.child:
        return child_main(args.child, args.window)

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in ("daskray", "ray")]
    if unknown or not runtimes:
        parser.error(f"unknown runtime(s) {unknown}; choose from daskray, ray")
    if "ray" in runtimes and not ray_available():
        print("note: `import ray` fails here, so Ray is skipped; the Ray column in the "
              "table comes from ANCHORS.md, not from this run.")
        runtimes.remove("ray")

    start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for name in runtimes:
        print(f"== {name} (own subprocess) ==", flush=True)
        results[name] = run_runtime(name, args.window)
    print_report(results, runtimes, args.window)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    failed = any("error" in rec for res in results.values() for rec in res.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
