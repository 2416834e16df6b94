"""The dashboard: its model and metrics as plain data, then the page and /metrics
of a cluster started with include_dashboard=True (the browser test is in
test_dashboard_browser.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from types import SimpleNamespace

import psutil
import pytest

import daskray
from daskray.dashboard.metrics import metrics_text
from daskray.dashboard.model import DashboardModel
from daskray.dashboard.snapshot import _actors, _task_counts
from helpers import NUM_WORKERS, mark_started, start_cluster, wait_for_path, wait_until


def _snap(workers=(), events=(), states=None, pending=None, actors=()) -> dict:
    return {"time": 100.0, "workers": list(workers), "events": list(events),
            "task_states": states or {}, "pending_by_prefix": pending or {},
            "prefixes_counted": True, "actors": list(actors)}


def _worker(wid: str, pid: int = 1, actor=None, current=()) -> dict:
    return {"id": wid, "pid": pid, "joined": True, "actor": actor, "extra": False,
            "current": list(current), "queue": 0}


# ---------------------------------------------------------------- the model, as plain data

def test_progress_counts_done_and_erred_from_events_and_the_rest_from_the_head():
    model = DashboardModel()
    model.apply(_snap(events=[(1, "('inc-a', 0)", "w1", 1.0, 1.5, "finished"),
                              (2, "('inc-a', 1)", "w2", 1.0, 1.2, "erred")],
                      pending={"inc": {"running": 1, "waiting": 2}}))
    [row] = model.progress()
    assert row == {"prefix": "inc", "done": 1, "running": 1, "waiting": 2, "erred": 1,
                   "fraction": 2 / 5}
    model.apply(_snap(events=[(3, "('inc-a', 2)", "w1", 2.0, 2.1, "finished")]))
    assert model.progress()[0]["fraction"] == 1.0


def test_stream_keeps_events_once_and_in_order():
    model = DashboardModel()
    model.apply(_snap(events=[(1, "a", "w1", 0.0, 1.0, "finished")]))
    model.apply(_snap(events=[(2, "b", "w2", 0.5, 1.0, "finished")]))
    assert [e[0] for e in model.events_after(0)] == [1, 2]
    assert [e[0] for e in model.events_after(1)] == [2]
    assert model.events_after(2) == []


def test_a_task_worker_that_disappears_counts_as_a_restart_an_actor_does_not():
    model = DashboardModel()
    model.apply(_snap(workers=[_worker("w1"), _worker("w2"), _worker("a1", actor="x")]))
    model.apply(_snap(workers=[_worker("w1"), _worker("w3")]))
    assert model.worker_restarts == 1


def test_new_spilled_files_count_as_spills():
    model = DashboardModel()
    stats = {"used": 10, "limit": 100, "spilled": 5}
    model.measured_store(stats, {"x1"})
    model.measured_store(stats, {"x1", "x2", "x3"})
    model.measured_store(stats, {"x3"})
    assert model.spills == 3
    assert model.store == stats


def test_metrics_exposes_every_documented_family():
    model = DashboardModel()
    model.apply(_snap(workers=[_worker("w1"), _worker("w2"), _worker("a", actor="a")],
                      events=[(1, "('inc-a', 0)", "w1", 0.0, 0.002, "finished"),
                              (2, "('inc-a', 1)", "w1", 0.0, 2.0, "finished")],
                      states={"waiting": 3, "running": 1}))
    model.measured_store({"used": 7, "limit": 70, "spilled": 0}, {"s"})
    text = metrics_text(model).decode()
    expected = [
        'daskray_tasks{state="waiting"} 3.0', 'daskray_tasks{state="running"} 1.0',
        'daskray_tasks{state="erred"} 0.0',
        'daskray_task_duration_seconds_bucket{le="0.005",prefix="inc"} 1.0',
        'daskray_task_duration_seconds_bucket{le="5.0",prefix="inc"} 2.0',
        'daskray_task_duration_seconds_count{prefix="inc"} 2.0',
        'daskray_store_bytes{kind="used"} 7.0', 'daskray_store_bytes{kind="limit"} 70.0',
        'daskray_store_bytes{kind="spilled"} 0.0', "daskray_spills_total 1.0",
        "daskray_worker_restarts_total 0.0", "daskray_workers 2.0"]
    for line in expected:
        assert line in text.splitlines(), line


def test_the_snapshot_counts_unfinished_tasks_by_prefix_and_state():
    tasks = {i: SimpleNamespace(name=f"('inc-abc', {i})", state=state) for i, state in
             enumerate(["waiting", "ready", "processing", "memory", "erred"])}
    counts = _task_counts(tasks)
    assert counts["task_states"] == {"waiting": 2, "running": 1, "memory": 1, "erred": 1}
    assert counts["pending_by_prefix"] == {"inc": {"waiting": 2, "running": 1}}


def test_the_snapshot_counts_an_actors_restarts_from_when_it_was_first_seen():
    first: dict = {}
    actor = SimpleNamespace(name="counter", state="alive", calls=[1, 2], in_flight=[3],
                            restarts_left=3, worker="a1")
    assert _actors({"x": actor}, first)[0]["restarts"] == 0
    actor.restarts_left, actor.state = 1, "restarting"
    [row] = _actors({"x": actor}, first)
    assert (row["restarts"], row["queue"], row["state"]) == (2, 3, "restarting")


# ---------------------------------------------------------------- a cluster with a dashboard

def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return None if match is None else float(match.group(1))


def _dashboard_processes() -> list[psutil.Process]:
    """daskray dashboard processes of this test run (children of our heads)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "daskray.dashboard.server" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _inc(x: int) -> int:
    return x + 1


@pytest.fixture
def dashboard(restart_cluster):
    """The shared cluster restarted with a dashboard, on a port someone else holds
    (so the dashboard takes a random free one)."""
    daskray.shutdown()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ctx = daskray.init(num_workers=NUM_WORKERS, include_dashboard=True,
                           dashboard_port=port)
    yield ctx, port
    daskray.shutdown()
    start_cluster()


@pytest.mark.timeout(120)
def test_dashboard_serves_the_page_and_metrics_and_goes_at_shutdown(dashboard, capsys):
    ctx, taken_port = dashboard
    url = ctx.dashboard_url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    assert ctx["dashboard_url"] == url
    assert int(url.rsplit(":", 1)[1].rstrip("/")) != taken_port
    html = _get(url)
    assert "bokeh" in html and not re.search(r"src=\"https?://", html)  # served, no CDN
    keys = [f"dash-inc-{i}" for i in range(30)]
    daskray.get({k: (_inc, i) for i, k in enumerate(keys)}, keys)

    def metrics_caught_up() -> bool:
        count = _metric(_get(url + "metrics"),
                        'daskray_task_duration_seconds_count{prefix="dash-inc"}')
        return count == 30.0

    assert wait_until(metrics_caught_up, timeout=20), _get(url + "metrics")
    text = _get(url + "metrics")
    assert _metric(text, "daskray_workers") == NUM_WORKERS
    assert _metric(text, 'daskray_store_bytes{kind="limit"}') > 0
    assert _dashboard_processes(), "no dashboard process while the cluster runs"
    daskray.shutdown()
    assert not _dashboard_processes(), "the dashboard process outlived the cluster"
    with pytest.raises(OSError):
        _get(url)


def test_no_dashboard_unless_asked(cluster):
    ctx = daskray.init(ignore_reinit_error=True)
    assert ctx.dashboard_url is None and ctx["dashboard_url"] is None
    assert not _dashboard_processes()


def test_local_mode_with_a_dashboard_is_refused(restart_cluster):
    daskray.shutdown()
    with pytest.raises(ValueError, match="local_mode starts no cluster"):
        daskray.init(local_mode=True, include_dashboard=True)
    assert not daskray.is_initialized()


def test_a_bad_dashboard_port_is_refused(restart_cluster):
    daskray.shutdown()
    with pytest.raises(ValueError, match="dashboard_port"):
        daskray.init(num_workers=1, include_dashboard=True, dashboard_port=-3)
    assert not daskray.is_initialized()


def test_on_dask_distributed_the_dashboard_is_dasks_own(on_distributed):
    daskray.shutdown()
    ctx = daskray.init(address=on_distributed.scheduler_address, include_dashboard=True)
    assert ctx.dashboard_url == on_distributed.dashboard_link
    assert not _dashboard_processes()


def _head_process():
    from daskray import api

    return psutil.Process(api._runtime.cluster.head.pid)


def _wait_for_file(path: str, started: str) -> str:
    mark_started(started)
    while not os.path.exists(path):
        time.sleep(0.01)  # the test creates it: polling a file another process writes
    return "released"


@pytest.mark.timeout(120)
def test_metrics_show_a_running_task_while_it_runs(dashboard, tmp_path):
    ctx, _ = dashboard
    url = ctx.dashboard_url + "metrics"
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    ref = daskray.remote(_wait_for_file).remote(release, started)
    try:
        wait_for_path(started)
        assert wait_until(
            lambda: _metric(_get(url), 'daskray_tasks{state="running"}') == 1.0, 20), _get(url)
    finally:
        open(release, "w").close()
    assert daskray.get(ref, timeout=60) == "released"


@pytest.mark.timeout(120)
def test_the_dashboard_ends_when_its_head_is_killed(dashboard):
    [dashboard_proc] = _dashboard_processes()  # by pid: orphaned, it is no child of ours
    head = _head_process()
    head.send_signal(signal.SIGKILL)
    head.wait(30)

    def gone() -> bool:
        try:
            return dashboard_proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert wait_until(gone, 20), "the dashboard process outlived its head"
