"""Ray-style core microbenchmarks, the same code on daskray and (when installed) on Ray.

Usage::

    python benchmarks/micro.py [--window 1.0]
                               [--runtimes daskray,daskray-dask,dask-futures,ray]

Runtimes:

- ``daskray``: daskray's own runtime, ``daskray.init(num_workers=2)``;
- ``daskray-dask``: daskray on the dask.distributed backend: a
  ``distributed.LocalCluster`` (2 worker processes x 1 thread) started first, then
  ``daskray.init(address=cluster.scheduler_address)``; its ``init_s`` is that
  ``init`` call alone, not the cluster's start;
- ``dask-futures``: the same LocalCluster driven by a plain ``distributed.Client``
  (``submit(pure=False)``, ``gather``, ``scatter(hash=False)``): what daskray-dask
  costs on top of distributed itself;
- ``ray``: Ray with ``num_cpus=2``, only if ``import ray`` works (otherwise it is
  skipped with a note).

Each runtime runs in a subprocess of its own, one after the other, so two runtimes
never compete for the (two) cores.  The subprocess starts the runtime with two
workers, measures every figure and prints one JSON line per figure; the parent
collects them and prints a table with:

- each runtime's values measured in this run,
- Ray 2.60's figures measured earlier on a machine like this one (2 cores, busy),
  copied into this file -- a reference, *not measured in this run*,
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
import dataclasses
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

# figure key -> (label, unit, Ray 2.60 on a busy 2-core machine like this one, or None)
FIGURES: dict[str, tuple[str, str, float | None]] = {
    "init_s": ("init() seconds", "s", 8.6),
    "tasks_sync_per_s": ("tasks, sync round trip", "/s", 379),
    "tasks_async_per_s": (f"tasks, async ({ASYNC_BATCH} in flight)", "/s", 994),
    "put_small_per_s": ("put small object", "/s", 853),
    "get_small_per_s": ("get small object", "/s", 5425),
    "memcpy_100MB_GB_per_s": ("memcpy 100 MB (numpy copyto, no runtime)", "GB/s", None),
    "put_100MB_GB_per_s": ("put 100 MB", "GB/s", 1.7),
    "get_100MB_GB_per_s": ("get 100 MB (already in the store)", "GB/s", 338),
    "task_10MB_arg_per_s": ("task with a 10 MB argument", "/s", 181),
    "get_in_task_100MB_vs_1KB": ("get in a task: 100 MB time / 1 KB time", "ratio", None),
    "get_in_driver_100MB_vs_1KB": ("get in the driver: 100 MB time / 1 KB time", "ratio", None),
    "actor_calls_sync_per_s": ("actor calls, sync", "/s", 1008),
    "actor_calls_async_per_s": (f"actor calls, async ({ASYNC_BATCH} in flight)", "/s", 2243),
}
ANCHOR_COLUMN = "Ray 2.60, 2 busy cores (earlier)"


# --------------------------------------------------------------------------
# What runs in tasks and actors.  Module-level; wrapped with ``rt.remote`` once
# the runtime is known.  The script runs as __main__, so both runtimes pickle
# these by value.
# --------------------------------------------------------------------------


def noop(*args: Any) -> int:
    """The empty task (its arguments, if any, are only received)."""
    return 0


class HeldFuture:
    """A distributed Future passed to a task as itself: ``client.submit`` replaces the
    Futures inside lists, tuples and dicts of a task's arguments by their values, and
    the get-in-a-task figure must pass the ref (Ray and daskray leave refs nested in a
    list alone).  Unpickled in the task, the Future belongs to no client yet."""

    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        self.future = future

    def bound_to(self, client: Any) -> Any:
        """The Future, bound to ``client`` (the task's worker client, or the driver's),
        which then tells the scheduler it wants the key: until then the client never
        hears that the data is there, and a gather would wait forever.  (What
        ``Client.get_dataset`` does with the Futures it unpickles.)"""
        self.future.bind_client(client)
        client._send_to_scheduler({"op": "client-desires-keys", "keys": [self.future.key],
                                   "client": client.id})
        return self.future


def runtime_api(runtime: str) -> Any:
    """The calls (``get``, ...) of ``runtime`` as seen from here: the driver, or a task."""
    if runtime == "dask-futures":
        from distributed import get_client

        return DaskFutures(get_client())
    return importlib.import_module("daskray" if runtime == "daskray-dask" else runtime)


def get_probe(runtime: str, small: Any, big: Any, seconds: float) -> dict:
    """Time ``get`` of a 1 KB and a 100 MB object, from inside a task or the driver.

    ``small`` and ``big`` each hold one ref, nested in a list (or a :class:`HeldFuture`)
    so the runtime passes the ref, not the value, to the task.  Each object is read
    once untimed (``first_s`` is kept for information), then repeatedly for about
    ``seconds`` in all; the median of the repeated reads is what counts.
    """
    rt = runtime_api(runtime)
    out: dict[str, Any] = {"pid": os.getpid()}
    for name, holder in (("1KB", small), ("100MB", big)):
        ref = holder.bound_to(rt.client) if isinstance(holder, HeldFuture) else holder[0]
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
# A plain distributed.Client with the calls the figures make (dask-futures).
# --------------------------------------------------------------------------


class DaskFutures:
    """``remote``/``get``/``put``/``shutdown`` over a ``distributed.Client``, the
    way a dask user writes them by hand: the baseline of the daskray-dask column."""

    NO_ACTORS = ("distributed's own actors (submit(cls, actor=True)) have other "
                 "semantics than Ray's (no ordering promise, no restarts, one thread per "
                 "worker shared by all actors), so they are not measured")

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client = client
        #: the LocalCluster to close at shutdown, if this process started one
        self.cluster = cluster

    def remote(self, target: Callable) -> "Submitter":
        if isinstance(target, type):
            raise NotImplementedError(self.NO_ACTORS)
        return Submitter(self.client, target)

    def get(self, futures: Any) -> Any:
        return self.client.gather(futures)

    def put(self, value: Any) -> Any:
        # in a list, so that a container is one object (scatter splits a bare list)
        return self.client.scatter([value], hash=False)[0]

    def shutdown(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


class Submitter:
    """``fn.remote(*args)`` as ``client.submit(fn, *args, pure=False)``."""

    def __init__(self, client: Any, fn: Callable) -> None:
        self.client = client
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.client.submit(self.fn, *args, pure=False)


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


#: the runtimes this script knows, in the order they run by default
RUNTIMES = ("daskray", "daskray-dask", "dask-futures", "ray")


def nest_in_list(ref: Any) -> list:
    return [ref]


@dataclasses.dataclass
class Started:
    """A runtime started in the child process: what the figures call, and its init."""

    #: ``remote``, ``get``, ``put``: the daskray or ray module, or a DaskFutures
    api: Any
    #: stops the runtime and everything the child started for it
    close: Callable[[], None]
    init_s: float
    #: what ``init_s`` covers, when that is not the obvious
    init_detail: str | None = None
    #: what creating an actor raises when the runtime has no actors (figures "n/a")
    no_actors: tuple[type[BaseException], ...] = (NotImplementedError,)
    #: wraps a ref so that a task receives the ref itself, not its value
    nest: Callable[[Any], Any] = nest_in_list


def start_local_cluster() -> Any:
    """The dask cluster both dask runtimes measure on: 2 worker processes x 1 thread
    on loopback (the dashboard on a free port, not dask's fixed 8787)."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0")


def start_ray() -> Started:
    t0 = time.perf_counter()
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return Started(ray, ray.shutdown, time.perf_counter() - t0)


def start_daskray() -> Started:
    t0 = time.perf_counter()
    import daskray
    daskray.init(num_workers=2)
    return Started(daskray, daskray.shutdown, time.perf_counter() - t0)


def start_daskray_dask() -> Started:
    """daskray on the dask.distributed backend, joined to a LocalCluster started here."""
    import daskray

    t0 = time.perf_counter()
    cluster = start_local_cluster()
    cluster_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        daskray.init(address=cluster.scheduler_address)
        init_s = time.perf_counter() - t0
    except BaseException:
        cluster.close()
        raise

    def close() -> None:
        try:
            daskray.shutdown()
        finally:
            cluster.close()

    detail = (f"daskray.init(address=...) only; starting the LocalCluster before it "
              f"took {cluster_s:.2f} s more")
    return Started(daskray, close, init_s, detail)


def start_dask_futures() -> Started:
    """A plain ``distributed.Client`` of a LocalCluster started here."""
    from distributed import Client

    t0 = time.perf_counter()
    cluster = start_local_cluster()
    cluster_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        client = Client(cluster)
        init_s = time.perf_counter() - t0
    except BaseException:
        cluster.close()
        raise
    api = DaskFutures(client, cluster)
    detail = (f"Client(cluster) only; starting the LocalCluster before it took "
              f"{cluster_s:.2f} s more")
    return Started(api, api.shutdown, init_s, detail, nest=HeldFuture)


STARTERS: dict[str, Callable[[], Started]] = {
    "daskray": start_daskray,
    "daskray-dask": start_daskray_dask,
    "dask-futures": start_dask_futures,
    "ray": start_ray,
}


def start_runtime(name: str) -> Started:
    try:
        starter = STARTERS[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}") \
            from None
    return starter()


def measure(name: str, started: Started, window: float) -> None:
    """Every figure after init, each reported as soon as it is known."""
    rate = make_rate(window)
    rt, nest = started.api, started.nest

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
    copy = np.zeros_like(big)  # written once: its pages exist, as a reused store file's do
    figure("memcpy_100MB_GB_per_s", lambda: rate(lambda: np.copyto(copy, big)),
           BIG_BYTES / 1e9)
    del copy
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
        probes = rt.get([remote_probe.remote(name, nest(small_ref), nest(big_ref), window)
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
        probe = get_probe(name, nest(rt.put(np.ones(SMALL_BYTES // 8))), nest(rt.put(big)),
                          window)
        detail = {k: (round(v * 1e6, 1) if k.endswith("_s") else v) for k, v in probe.items()}
        detail["note"] = "times in microseconds"
        return probe["median_100MB_s"] / probe["median_1KB_s"], detail
    figure("get_in_driver_100MB_vs_1KB", get_in_driver)
    del big
    gc.collect()

    actor = make_actor(started)
    if actor is None:
        return
    figure("actor_calls_sync_per_s", lambda: rate(lambda: rt.get(actor.small.remote())))
    figure("actor_calls_async_per_s", lambda: rate(
        lambda: rt.get([actor.small.remote() for _ in range(ASYNC_BATCH)]), ASYNC_BATCH))


def make_actor(started: Started) -> Any:
    """The actor of the actor figures, or None after reporting them: "n/a" with the
    runtime's reason when it has no actors, ERROR when creating one failed."""
    keys = ("actor_calls_sync_per_s", "actor_calls_async_per_s")
    try:
        return started.api.remote(Actor).remote()
    except started.no_actors as exc:
        for key in keys:
            report(key, "n/a", detail=f"no actors: {short_error(exc)}")
    except Exception as exc:
        traceback.print_exc()
        for key in keys:
            report(key, error=short_error(exc))
    return None


def child_main(name: str, window: float) -> int:
    """Run in the runtime's own subprocess: init, measure, always shut down."""
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, on_term)  # so the finally below still runs

    started = None
    try:
        try:
            started = start_runtime(name)
        except Exception as exc:
            traceback.print_exc()
            report("init_s", error=short_error(exc))
            return 1
        report("init_s", started.init_s, detail=started.init_detail)
        measure(name, started, window)
        return 0
    finally:
        if started is not None:
            try:
                started.close()
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
                print(f"  {name:12s} {record['figure']:26s} {cell(record)}", flush=True)
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
        basis, ref = "Ray 2.60 on 2 busy cores, measured earlier, not in this run", \
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
    rows.append(put_target(results))
    init = number(results, "daskray", "init_s")
    label = "init() ≤ 1 s"
    if init is None:
        rows.append((label, "FAIL" if "daskray" in results else "n/a", "daskray: no value"))
    else:
        rows.append((label, "PASS" if init <= 1.0 else "FAIL", f"{init:.2f} s"))
    rows.append(dask_backend_target(results))
    return rows


#: put of 100 MB must reach this fraction of a memcpy of it in the same process
PUT_MEMCPY_FLOOR = 0.5


def put_target(results: dict[str, dict[str, dict]]) -> tuple[str, str, str]:
    """daskray's put of 100 MB against numpy's copy of the same array into memory
    already mapped, both measured by the same process in this run."""
    label = f"put 100 MB ≥ {PUT_MEMCPY_FLOOR}× memcpy (same process, this run)"
    put = number(results, "daskray", "put_100MB_GB_per_s")
    memcpy = number(results, "daskray", "memcpy_100MB_GB_per_s")
    if put is None or memcpy is None:
        return label, "FAIL" if "daskray" in results else "n/a", "daskray: no value"
    ratio = put / memcpy
    return (label, "PASS" if ratio >= PUT_MEMCPY_FLOOR else "FAIL",
            f"{put:.2f} GB/s vs {memcpy:.2f} GB/s = {ratio:.2f}×")


#: daskray-dask's async task rate must be at least this fraction of dask-futures'
#: (its time within 1.25x of client.submit + gather on the same cluster)
DASK_RATE_FLOOR = 1 / 1.25


def dask_backend_target(results: dict[str, dict[str, dict]]) -> tuple[str, str, str]:
    """Async tasks (500 in flight) on the dask.distributed backend against a plain
    ``client.submit`` + ``gather`` on the same kind of cluster."""
    label = "daskray-dask async tasks within 1.25× of client.submit + gather"
    ours = number(results, "daskray-dask", "tasks_async_per_s")
    theirs = number(results, "dask-futures", "tasks_async_per_s")
    if theirs is None:
        why = "not run" if "dask-futures" not in results else "no value"
        return label, "n/a", f"dask-futures: {why}"
    if ours is None:
        return (label, "FAIL" if "daskray-dask" in results else "n/a",
                "daskray-dask: " + ("no value" if "daskray-dask" in results else "not run"))
    ratio = ours / theirs
    return (label, "PASS" if ratio >= DASK_RATE_FLOOR else "FAIL",
            f"{ours:,.0f}/s vs {theirs:,.0f}/s = {ratio:.2f}× "
            f"(needs ≥ {DASK_RATE_FLOOR:.2f}×)")


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
    print(f"The '{ANCHOR_COLUMN}' column: Ray 2.60's core microbenchmarks, measured "
          "earlier on a machine like this one (2 cores, busy) and copied into micro.py: "
          "NOT measured in this run.")
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

    print("\nIssue targets (daskray's own runtime unless the target names another):")
    print(table(["target", "result", "measured"],
                [list(row) for row in check_targets(results)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=1.0,
                        help="seconds spent timing each figure (3 windows of a third each)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated, run in this order; from "
                             f"{', '.join(RUNTIMES)} (ray only when installed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one runtime's process
    args = parser.parse_args(argv)
    if args.window <= 0:
        parser.error("--window must be positive")
    if args.child:
        return child_main(args.child, args.window)

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        parser.error(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    if "ray" in runtimes and not ray_available():
        print("note: `import ray` fails here, so Ray is skipped; the table's column "
              f"'{ANCHOR_COLUMN}' was measured earlier, not in this run.")
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
