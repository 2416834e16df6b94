"""benchmarks/micro.py: the dask.distributed columns (daskray-dask, dask-futures),
the target comparing them, and a report that stands on its own."""

from __future__ import annotations

import os
import subprocess

import pytest

from benchmarks import micro
from helpers import wait_until


def rates(**async_rates: float) -> dict:
    """Results as the parent collects them: only the async task figure, per runtime."""
    return {name.replace("_", "-"): {"tasks_async_per_s": {"figure": "tasks_async_per_s",
                                                          "value": value}}
            for name, value in async_rates.items()}


def dask_row(results: dict) -> tuple[str, str, str]:
    rows = [r for r in micro.check_targets(results) if r[0].startswith("daskray-dask")]
    assert len(rows) == 1, micro.check_targets(results)
    return rows[0]


def test_the_dask_backend_passes_within_1_25x_of_submit_and_gather():
    label, result, measured = dask_row(rates(daskray_dask=850.0, dask_futures=1000.0))
    assert "1.25×" in label and "client.submit + gather" in label
    assert result == "PASS"
    assert "0.85×" in measured


def test_the_dask_backend_fails_below_0_8x_of_submit_and_gather():
    assert dask_row(rates(daskray_dask=790.0, dask_futures=1000.0))[1] == "FAIL"


def test_the_dask_backend_target_without_both_columns():
    assert dask_row(rates(daskray_dask=900.0))[1:] == ("n/a", "dask-futures: not run")
    errored = rates(dask_futures=1000.0)
    errored["daskray-dask"] = {"tasks_async_per_s": {"figure": "tasks_async_per_s",
                                                     "error": "boom"}}
    assert dask_row(errored)[1] == "FAIL"


def put_row(**figures: float) -> tuple[str, str, str]:
    results = {"daskray": {k: {"figure": k, "value": v} for k, v in figures.items()}}
    rows = [r for r in micro.check_targets(results) if r[0].startswith("put 100 MB")]
    assert len(rows) == 1, micro.check_targets(results)
    return rows[0]


def test_the_put_target_compares_with_memcpy_measured_in_the_same_run():
    label, result, measured = put_row(put_100MB_GB_per_s=3.1, memcpy_100MB_GB_per_s=6.0)
    assert "0.5× memcpy" in label
    assert result == "PASS" and "0.52×" in measured
    assert put_row(put_100MB_GB_per_s=2.9, memcpy_100MB_GB_per_s=6.0)[1] == "FAIL"
    assert put_row(put_100MB_GB_per_s=2.9)[1:] == ("FAIL", "daskray: no value")


@pytest.mark.parametrize("ray_installed", [True, False])
def test_by_default_both_dask_columns_run_between_daskray_and_ray(monkeypatch, capsys,
                                                                  ray_installed):
    ran: list[str] = []
    monkeypatch.setattr(micro, "ray_available", lambda: ray_installed)
    monkeypatch.setattr(micro, "run_runtime", lambda name, window: ran.append(name) or {})
    micro.main([])
    expected = ["daskray", "daskray-dask", "dask-futures"] + ["ray"] * ray_installed
    assert ran == expected
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("| figure"))
    assert [c.strip() for c in header.strip("|").split("|")][2:-1] == expected


def test_the_report_names_no_file_outside_the_repository(capsys):
    """The Ray reference column is explained in the report itself."""
    results = rates(daskray=900.0, daskray_dask=400.0, dask_futures=450.0)
    micro.print_report(results, ["daskray", "daskray-dask", "dask-futures"], 1.0)
    out = capsys.readouterr().out
    for text in (out, micro.__doc__):
        assert "ANCHORS" not in text and "/shared" not in text
    assert "2 cores, busy" in out and "NOT measured in this run" in out


def record_child_pids(monkeypatch) -> list[int]:
    """The pids of the runtime subprocesses micro.py starts (each leads its own
    process group, which its workers join)."""
    pids: list[int] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real(*args, **kwargs)
        pids.append(proc.pid)
        return proc
    monkeypatch.setattr(micro.subprocess, "Popen", popen)
    return pids


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("runtime, no_actors", [
    ("daskray-dask", None),  # daskray's actors run on the dask.distributed backend
    ("dask-futures", "distributed's own actors"),
])
def test_a_dask_runtime_measures_every_figure_and_leaves_nothing(monkeypatch, runtime,
                                                                 no_actors):
    pids = record_child_pids(monkeypatch)
    results = micro.run_runtime(runtime, window=0.05)

    assert set(results) == set(micro.FIGURES)
    errors = {k: r["error"] for k, r in results.items() if "error" in r}
    assert not errors
    for key in ("actor_calls_sync_per_s", "actor_calls_async_per_s"):
        if no_actors is not None:
            assert results[key]["value"] == "n/a"
            assert no_actors in results[key]["detail"]
    for key, record in results.items():
        if no_actors is None or not key.startswith("actor_"):
            assert isinstance(record["value"], float) and record["value"] > 0, record
    assert "LocalCluster" in results["init_s"]["detail"]  # init_s says what it covers

    assert len(pids) == 1
    assert wait_until(lambda: group_gone(pids[0]), timeout=20), \
        f"processes of the {runtime} run are left (process group {pids[0]})"
