"""The driver of tests/test_multihost.py, run on the fourth "host" (a network namespace):

    python multihost_driver.py tcp://SCHEDULER_IP:PORT

It joins the dask scheduler with ``daskray.init(address=...)``, waits for the two dask
workers (declared with the resources ``host2=1`` and ``host3=1``), then checks, in
order, and prints one JSON line per part as soon as that part is done:

  cluster    who joined: the workers' nodes() entries, this driver's address
  object     a 100 MB object made by a task on host2 and read by a task on host3
  array      a dask array workload, on the cluster and with scheduler="sync"
  dataframe  a DataFrame workload (a shuffle join, a groupby), the same two ways
  actor      an actor on host2 called by tasks on host3

Each line is ``{"part": NAME, "status": "done" | "error" | "skipped", ...}``: "done"
carries what the test asserts on, "error" the traceback, "skipped" the reason.  A
part that fails does not stop the next one.  A process says which host it runs on by
its own address on the test's subnet (the source address of a route to the
scheduler), which holds in a task, an actor or the driver alike.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
import traceback
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np

import daskray
from daskray import ClusterError

#: the dask scheduler's address (tcp://IP:PORT), the first argument
ADDRESS = sys.argv[1]
SCHEDULER_IP = urlparse(ADDRESS).hostname

#: the size of the object passed between hosts
OBJECT_BYTES = 100 * 2**20

#: how long the workers get to join, and a remote call to answer
JOIN_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0

#: what the dask.distributed backend says while it has no actors
NO_ACTORS = "actors do not run on the dask.distributed backend yet"


def this_host() -> str:
    """This process's own address on the subnet: the one a packet to the scheduler
    would leave from (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((SCHEDULER_IP, 9))
        return sock.getsockname()[0]


def on(host: str) -> dict:
    """The options that pin a call (or an actor) to the worker of ``host``."""
    return {"resources": {host: 1}}


def report(part: str, run: Callable[[], dict | None]) -> None:
    """Run one part and print its JSON line; an exception is the part's error."""
    try:
        line = {"part": part, "status": "done", **(run() or {})}
    except Skipped as skip:
        line = {"part": part, "status": "skipped", "reason": str(skip)}
    except BaseException:
        line = {"part": part, "status": "error", "error": traceback.format_exc()}
    print(json.dumps(line), flush=True)


class Skipped(Exception):
    """A part that cannot run on this backend yet; the message says why."""


# ------------------------------------------------------------------ cluster


def wait_for_workers() -> dict:
    """Wait until the workers of host2 and host3 have joined; their nodes() entries."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while True:
        nodes = daskray.nodes()
        offered = {name for node in nodes for name in node["Resources"]}
        if {"host2", "host3"} <= offered:
            return {"nodes": nodes, "driver": this_host()}
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the workers of host2 and host3 did not both join the scheduler at "
                f"{ADDRESS} within {JOIN_TIMEOUT:.0f} s; nodes() is {nodes}")
        time.sleep(0.1)  # polling the scheduler's view: nothing to be told by


# ------------------------------------------------------------------ object


def random_bytes(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@daskray.remote
def make_object(size: int, seed: int) -> dict:
    data = random_bytes(size, seed)
    return {"made_on": this_host(), "sha256": hashlib.sha256(data).hexdigest(), "data": data}


@daskray.remote
def read_object(obj: dict) -> dict:
    data = obj["data"]
    return {"made_on": obj["made_on"], "sha256_made": obj["sha256"], "read_on": this_host(),
            "sha256_read": hashlib.sha256(data).hexdigest(), "nbytes": int(data.nbytes)}


def object_between_hosts() -> dict:
    """A 100 MB object made on host2 and read on host3 (the object travels as the
    argument of the reading task; the driver never holds it)."""
    ref = make_object.options(**on("host2")).remote(OBJECT_BYTES, 0)
    seen = daskray.get(read_object.options(**on("host3")).remote(ref), timeout=CALL_TIMEOUT)
    return {**seen, "sha256_expected": hashlib.sha256(random_bytes(OBJECT_BYTES, 0)).hexdigest()}


# ------------------------------------------------------------------ dask graphs


def array_workload() -> dict:
    """Elementwise work, a transpose (blocks cross workers) and reductions."""
    import dask
    import dask.array as da

    x = da.random.default_rng(42).standard_normal((2000, 2000), chunks=(500, 500))
    y = (da.sin(x) + x.T * 2).sum(axis=0) - x.mean(axis=1)
    on_cluster = y.compute()
    local = y.compute(scheduler="sync")
    ran_on = dask.delayed(this_host, pure=False)().compute()
    return {"equal": bool(np.array_equal(on_cluster, local)), "shape": list(on_cluster.shape),
            "max_abs_difference": float(np.max(np.abs(on_cluster - local))),
            "graph_ran_on": ran_on}


def dataframe_workload() -> dict:
    """A hash join (a shuffle across the workers, never a broadcast) and a groupby."""
    import dask.dataframe as dd
    import pandas as pd

    rng = np.random.default_rng(7)
    n = 200_000
    left = pd.DataFrame({"key": rng.integers(0, 1000, n), "a": rng.random(n)})
    right = pd.DataFrame({"key": np.arange(1000), "label": rng.integers(0, 10, 1000)})
    joined = dd.from_pandas(left, npartitions=8).merge(
        dd.from_pandas(right, npartitions=4), on="key", broadcast=False)
    result = joined.groupby("label").a.agg(["sum", "mean", "count"])
    on_cluster = result.compute().sort_index()
    local = result.compute(scheduler="sync").sort_index()
    try:
        pd.testing.assert_frame_equal(on_cluster, local)
        difference = None
    except AssertionError as exc:
        difference = str(exc)
    return {"equal": difference is None, "difference": difference, "rows": len(local),
            "count": int(local["count"].sum())}


# ------------------------------------------------------------------ actor


@daskray.remote
class Counter:
    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> dict:
        self.total += n
        return {"total": self.total, "actor_on": this_host()}


@daskray.remote
def call_counter(counter: Any, n: int) -> dict:
    return {**daskray.get(counter.add.remote(n)), "caller_on": this_host()}


def actor_across_hosts() -> dict:
    """An actor on host2, called twice by tasks on host3 (its state carries over)."""
    try:
        counter = Counter.options(**on("host2")).remote()
    except ClusterError as exc:
        if NO_ACTORS in str(exc):
            raise Skipped(str(exc)) from None
        raise
    calls = []
    for n in (2, 3):
        ref = call_counter.options(**on("host3")).remote(counter, n)
        calls.append(daskray.get(ref, timeout=CALL_TIMEOUT))
    return {"calls": calls}


def main() -> None:
    daskray.init(address=ADDRESS)
    try:
        report("cluster", wait_for_workers)
        report("object", object_between_hosts)
        report("array", array_workload)
        report("dataframe", dataframe_workload)
        report("actor", actor_across_hosts)
    finally:
        daskray.shutdown()


if __name__ == "__main__":
    main()
