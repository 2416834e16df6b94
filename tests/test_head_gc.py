"""The head's garbage collector (daskray/runtime/gc_tuning.py): taking in a graph of
20,000 tiny tasks, as W1 of benchmarks/dask_workloads.py, must not make the collector
scan the head's growing task state over and over."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: feeds a W1-shaped graph (20,000 leaves summed 8 at a time) to the scheduler core
#: in a fresh interpreter, with or without the head's tuning, and counts collections
SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import daskray.runtime.head  # what the head has imported when it tunes
    from daskray.runtime.gc_tuning import tune_for_long_lived_state
    from daskray.scheduler import SchedulerState
    from daskray.scheduler.events import GraphSubmitted, WorkerJoined

    if sys.argv[1] == "tuned":
        tune_for_long_lived_state()
    deps, level = [], []
    for i in range(20_000):
        deps.append(())
        level.append(i)
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level), 8):
            deps.append(tuple(level[j:j + 8]))
            nxt.append(len(deps) - 1)
        level = nxt
    n = len(deps)
    counts = [0, 0, 0]
    gc.callbacks.append(
        lambda phase, info: phase == "start" and counts.__setitem__(
            info["generation"], counts[info["generation"]] + 1))
    state = SchedulerState()
    state.handle(WorkerJoined("a"))
    state.handle(GraphSubmitted(
        ("c", 1), [f"t{i}" for i in range(n)], deps, list(range(n)), [b"x"] * n, {},
        [n - 1], groups=["g"] * n, fail_fast=True, notify=False))
    print(json.dumps({"collections": counts, "tasks": len(state.tasks)}))
""")


def collections_taking_in_w1(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result = json.loads(out)
    assert result["tasks"] > 20_000
    return result["collections"]


@pytest.mark.timeout(120)
def test_a_large_graph_is_taken_in_without_rescanning_the_task_state():
    default = collections_taking_in_w1("default")
    tuned = collections_taking_in_w1("tuned")
    assert tuned[2] == 0, f"full collections while taking in the graph: {tuned}"
    assert sum(tuned) * 5 <= sum(default), (tuned, default)

