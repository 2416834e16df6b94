"""daskray.timeline(): the head's bounded task-event log (plain data) and the
Chrome trace made from it, on both backends."""

from __future__ import annotations

import json

import dask
import pytest

import daskray
from daskray.runtime.records import ErredReport, FinishedReport, StartedReport
from daskray.runtime.task_events import (ERRED, FINISHED, TaskEventLog, chrome_trace,
                                         key_prefix, log_reports)


class _Task:
    def __init__(self, name: str) -> None:
        self.name = name


# ---------------------------------------------------------------- the log, as plain data

def test_log_keeps_the_newest_events_only():
    log = TaskEventLog(capacity=3)
    for i in range(5):
        log.task_ended(i, f"t-{i}", "w1", now=10.0 + i, duration=0.5)
    assert [e.key for e in log.events] == ["t-2", "t-3", "t-4"]
    assert [e.seq for e in log.events] == [3, 4, 5]


def test_since_returns_only_newer_events_even_after_the_buffer_wrapped():
    log = TaskEventLog(capacity=3)
    for i in range(5):
        log.task_ended(i, f"t-{i}", "w1", now=float(i), duration=0.0)
    assert [e.seq for e in log.since(0)] == [3, 4, 5]
    assert [e.seq for e in log.since(4)] == [5]
    assert log.since(5) == []


def test_start_is_the_end_less_the_measured_duration():
    log = TaskEventLog()
    ev = log.task_ended(1, "('inc-abc', 3)", "w2", now=100.0, duration=2.5)
    assert (ev.start, ev.end, ev.worker, ev.state) == (97.5, 100.0, "w2", FINISHED)
    assert ev.prefix == "inc"


def test_a_failed_task_starts_when_its_start_was_reported():
    log = TaskEventLog()
    log.task_started(7, now=50.0)
    ev = log.task_ended(7, "boom", "w1", now=53.0, duration=None, state=ERRED)
    assert (ev.start, ev.end, ev.state) == (50.0, 53.0, ERRED)
    assert log.started == {}


def test_log_reports_reads_the_workers_reports():
    log = TaskEventLog()
    tasks = {1: _Task("a-1"), 2: _Task("b-2"), 3: _Task("c-3")}
    log_reports(log, tasks, "w1", [StartedReport(2), FinishedReport(1, 8, None, 0.25, ())],
                now=10.0)
    log_reports(log, tasks, "w1", [ErredReport(2, b"x"), FinishedReport(99, 8, None, 1.0, ())],
                now=12.0)
    assert [(e.key, e.start, e.end, e.state) for e in log.events] == [
        ("a-1", 9.75, 10.0, FINISHED), ("b-2", 10.0, 12.0, ERRED)]  # 99: unknown, skipped


def test_chrome_trace_has_one_complete_event_per_task_and_a_row_per_worker():
    events = [("('inc-1', 0)", "w1", 10.0, 10.5, FINISHED),
              ("('inc-1', 1)", "w2", 10.2, 10.4, FINISHED),
              ("f", "w1", 11.0, 11.0, ERRED)]
    trace = chrome_trace(events, origin=10.0)
    tasks = [e for e in trace if e["ph"] == "X"]
    rows = {e["pid"]: e["args"]["name"] for e in trace if e["ph"] == "M"}
    assert rows == {1: "worker w1", 2: "worker w2"}
    assert [(e["name"], e["pid"], e["ts"], e["dur"]) for e in tasks] == [
        ("inc", 1, 0.0, 500000.0), ("inc", 2, pytest.approx(200000.0), pytest.approx(200000.0)),
        ("f", 1, 1e6, 0.0)]
    assert tasks[2]["args"]["state"] == ERRED
    assert key_prefix("('sum-aggregate-abc123', 0)") == "sum-aggregate"


# ---------------------------------------------------------------- daskray.timeline()

def _inc(x: int) -> int:
    return x + 1


@pytest.mark.timeout(120)
def test_timeline_returns_the_tasks_of_a_graph_on_every_worker(backend):
    keys = [f"tl-inc-{i}" for i in range(40)]
    dsk = {k: (_inc, i) for i, k in enumerate(keys)}
    daskray.get(dsk, keys)
    trace = daskray.timeline()
    # (on dask.distributed, daskray's keys carry a suffix of their own)
    ours = [e for e in trace if e["ph"] == "X" and e["args"]["key"].startswith("tl-inc-")]
    assert {e["args"]["key"].split("-")[2] for e in ours} == {str(i) for i in range(40)}
    assert {e["name"] for e in ours} == {"tl-inc"}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in ours)
    rows = {e["pid"]: e["args"]["name"] for e in trace if e["ph"] == "M"}
    assert {e["pid"] for e in ours} <= set(rows)


@pytest.mark.timeout(120)
def test_timeline_writes_a_chrome_trace_file(backend, tmp_path):
    @daskray.remote
    def traced_call(x):
        return x

    daskray.get([traced_call.remote(i) for i in range(3)])
    path = tmp_path / "trace.json"
    assert daskray.timeline(str(path)) is None
    data = json.loads(path.read_text())
    # a remote call's task is named after its function here; dask.distributed names
    # it by its key
    name = "traced_call" if backend == "local" else "daskray-ref"
    assert sum(1 for e in data["traceEvents"] if e["ph"] == "X" and e["name"] == name) >= 3
    if backend == "local":
        assert sum(1 for e in data["traceEvents"] if e["name"] == name) == 3


def test_timeline_in_local_mode_says_what_is_missing(restart_cluster):
    daskray.shutdown()
    daskray.init(local_mode=True)
    with pytest.raises(daskray.ClusterError, match="local_mode keeps no timeline"):
        daskray.timeline()


def test_timeline_without_init_says_to_call_init(restart_cluster):
    daskray.shutdown()
    with pytest.raises(daskray.ClusterError, match="init"):
        daskray.timeline()
    dask.config.refresh()
