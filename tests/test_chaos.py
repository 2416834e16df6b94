"""Chaos: workloads that must come out right while their processes are SIGKILLed.

A killer thread picks a live process of the cluster at random and SIGKILLs it
every so often while a workload runs; the result must be exact, and once the
workload's refs are dropped nothing may be left in the head's scheduler state.
Slow (tens of seconds), but run in CI like every test.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import dask
import numpy as np
import psutil
import pytest

import daskray
import daskray.api
from helpers import wait_until

pytestmark = pytest.mark.slow

#: busy CPU per task of the big graph
SPIN_SECONDS = 0.003
#: leaves of the big graph; with the reduction tree above them, ~10,000 tasks
LEAVES = 7_500
FAN_IN = 4
#: every this many leaves, one returns an array too large to travel inline:
#: it stays on its worker, and is lost (and computed again) when that one dies
LARGE_EVERY = 10
KILL_EVERY_SECONDS = 2.0


# =========================================================================== the graph


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def leaf(i: int, spin: float):
    _spin(spin)
    if i % LARGE_EVERY == 0:
        return np.full(20_000, i, dtype=np.int64)  # 160 KB
    return i * i


def combine(spin: float, *parts) -> int:
    _spin(spin)
    return sum(int(p.sum()) if isinstance(p, np.ndarray) else p for p in parts)


def tree_graph(spin: float) -> tuple[dict, str]:
    """``LEAVES`` leaf tasks summed by a ``FAN_IN``-ary tree: (graph, root key).
    The result does not depend on ``spin``, so ``spin=0`` computes the expected
    value at once."""
    dsk: dict = {}
    level = []
    for i in range(LEAVES):
        dsk[("leaf", i)] = (leaf, i, spin)
        level.append(("leaf", i))
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), FAN_IN):
            key = (f"sum-{depth}", j // FAN_IN)
            dsk[key] = (combine, spin, *level[j:j + FAN_IN])
            nxt.append(key)
        level = nxt
    return dsk, level[0]


# =========================================================================== the killer


def head_pid() -> int:
    return daskray.api._runtime.cluster.head.pid


def live_children(pid: int, marker: str) -> list[int]:
    """The live processes the head started whose command line has ``marker``."""
    found = []
    for proc in psutil.Process(pid).children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


class _KillerThread:
    """A thread that SIGKILLs processes (``_run`` says which) while the ``with``
    block runs; ``kills`` lists the pids it killed."""

    def __init__(self) -> None:
        self.kills: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            self.kills.append(pid)
        except ProcessLookupError:
            pass

    def _run(self) -> None:
        raise NotImplementedError


class Killer(_KillerThread):
    """SIGKILLs a random live task worker every ``period`` seconds until stopped."""

    def __init__(self, period: float, seed: int = 0) -> None:
        super().__init__()
        self.period = period
        self.random = random.Random(seed)
        self._head = head_pid()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            pids = live_children(self._head, "start_worker")
            if pids:
                self.kill(self.random.choice(pids))


def assert_state_empty(timeout: float = 20) -> None:
    """Nothing but workers (and replacements on their way) is left in the head."""
    session = daskray.api._session()
    leftovers: dict = {}

    def empty() -> bool:
        nonlocal leftovers
        sizes = session.state_sizes()
        leftovers = {k: v for k, v in sizes.items()
                     if v and k not in ("workers", "pending replacements")}
        return not leftovers

    assert wait_until(empty, timeout, interval=0.2), f"left in the head's state: {leftovers}"


# =========================================================================== (a) a big graph


@pytest.mark.timeout(200)
def test_a_big_graph_comes_out_right_while_workers_are_killed(restart_cluster):
    expected = dask.get(*tree_graph(0.0))  # the sync scheduler, no spinning
    dsk, root = tree_graph(SPIN_SECONDS)
    assert len(dsk) >= 10_000
    daskray.shutdown()
    daskray.init(num_workers=4)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1000}):
        t0 = time.monotonic()
        assert daskray.get(dsk, root) == expected
        fault_free = time.monotonic() - t0
        assert_state_empty()
        t0 = time.monotonic()
        # on a machine fast enough to finish in a few seconds, kill more often
        with Killer(min(KILL_EVERY_SECONDS, fault_free / 5)) as killer:
            result = daskray.get(dsk, root)
        chaos = time.monotonic() - t0
    assert result == expected
    assert len(killer.kills) >= 3, f"only {len(killer.kills)} kills in {chaos:.1f} s"
    assert_state_empty()
    print(f"\nchaos: {len(dsk)} tasks, fault-free {fault_free:.1f} s, with "
          f"{len(killer.kills)} workers killed {chaos:.1f} s "
          f"({chaos / fault_free:.2f}x; goal <= 3x)")


# =========================================================================== (b) an actor


#: sequence numbers the restarted actor forwards to the sink
NUMBERS = 1200
#: numbers per call: the actor is killed after every call it serves, and a
#: restart costs ~0.3 s of process start here (1,200 one-number calls: minutes)
PER_CALL = 10


@daskray.remote
class Sink:
    def __init__(self):
        self.seen: set[int] = set()

    def record(self, seq: int) -> None:
        self.seen.add(seq)

    def numbers(self) -> list[int]:
        return sorted(self.seen)


@daskray.remote(max_restarts=-1, max_task_retries=-1)
class Forwarder:
    """Forwards each number to the sink, and returns once the sink has it; notes
    each call it served (its pid, a line) in ``log`` for the killer."""

    def __init__(self, sink, log: str):
        self.sink = sink
        self.log = log

    def forward(self, seqs: list[int]) -> list[int]:
        daskray.get([self.sink.record.remote(seq) for seq in seqs])
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return seqs


class LifeKiller(_KillerThread):
    """SIGKILLs the actor's process once it has served ``after`` calls in its
    life (read from the log the actor writes), each of its lives."""

    def __init__(self, log: str, after: int) -> None:
        super().__init__()
        self.log = log
        self.after = after
        self._served: dict[int, int] = {}

    def _run(self) -> None:
        offset = 0
        while not self._stop.wait(0.005):
            try:
                with open(self.log) as f:
                    f.seek(offset)
                    text = f.read()
            except FileNotFoundError:
                continue
            complete = text[:text.rfind("\n") + 1]
            offset += len(complete)
            for line in complete.split():
                pid = int(line)
                self._served[pid] = self._served.get(pid, 0) + 1
                if self._served[pid] == self.after:
                    self.kill(pid)


@pytest.mark.timeout(150)
def test_an_actor_killed_after_each_call_it_serves_delivers_every_number(cluster, tmp_path):
    log = str(tmp_path / "served")
    sink = Sink.remote()
    forwarder = Forwarder.remote(sink, log)
    t0 = time.monotonic()
    batches = [list(range(i, i + PER_CALL)) for i in range(0, NUMBERS, PER_CALL)]
    with LifeKiller(log, after=1) as killer:
        refs = [forwarder.forward.remote(batch) for batch in batches]
        assert daskray.get(refs, timeout=120) == batches
    took = time.monotonic() - t0
    assert daskray.get(sink.numbers.remote(), timeout=30) == list(range(NUMBERS))
    assert len(killer.kills) >= 3
    print(f"\nchaos: {NUMBERS} numbers in {len(batches)} calls, the actor killed "
          f"{len(killer.kills)} times, {took:.1f} s")
    daskray.kill(forwarder)
    daskray.kill(sink)
    del refs, forwarder, sink
    assert_state_empty()
