"""What the live dashboard costs the scheduler: W1 (~22.8k tiny tasks, the
workload most sensitive to the head's per-task work) without a dashboard, then
with ``include_dashboard=True`` and the page open in headless Chromium.

Each run starts a fresh cluster (warmed up by one untimed W1), and the two
settings take turns, so that a load that drifts on a shared machine weighs on
both alike; the median of ``--repeat`` runs of each is reported, with the ratio
with/without (target: at most 1.25) and the CPU seconds the browser took.  Needs Debian's
``chromium`` and ``chromium-driver`` and ``pip install -e '.[test]'`` (selenium).

Usage::

    python benchmarks/dashboard_overhead.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any, Iterator

import dask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.dask_workloads import build_overhead  # noqa: E402

TARGET = 1.25
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def browser_on(url: str) -> Iterator[Any]:
    """Headless Chromium showing ``url`` until the block ends (the page loaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        deadline = time.monotonic() + 30
        while not driver.execute_script(
                "return !!(window.Bokeh && Bokeh.documents.length)"):
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard page did not load within 30 s")
            time.sleep(0.1)
        yield driver
    finally:
        driver.quit()


def time_w1(repeat: int) -> list[float]:
    """Seconds of ``repeat`` W1 runs on the running cluster (graph built untimed)."""
    import daskray

    times = []
    for _ in range(repeat):
        obj = build_overhead()
        start = time.perf_counter()
        (value,) = dask.compute(obj, scheduler=daskray.get)
        times.append(time.perf_counter() - start)
        assert value == sum(range(1, 20_001)), value
    return times


def browser_cpu_seconds() -> float:
    """CPU seconds Chromium's processes (children of this one) have used."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run(dashboard: bool) -> tuple[float, float]:
    """One timed W1 on a fresh 2-worker cluster, with the dashboard open in a
    browser or without; (seconds, the browser's CPU seconds meanwhile)."""
    import daskray

    ctx = daskray.init(num_workers=2, include_dashboard=dashboard, dashboard_port=0)
    try:
        time_w1(1)  # warm-up: the workers import what W1 needs
        if not dashboard:
            return time_w1(1)[0], 0.0
        with browser_on(ctx.dashboard_url):
            before = browser_cpu_seconds()
            seconds = time_w1(1)[0]
            return seconds, browser_cpu_seconds() - before
    finally:
        daskray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    without, with_page, browser_cpu = [], [], []
    for _ in range(args.repeat):
        without.append(run(False)[0])
        seconds, cpu = run(True)
        with_page.append(seconds)
        browser_cpu.append(cpu)
    ratio = statistics.median(with_page) / statistics.median(without)
    print(f"W1 without dashboard: median {statistics.median(without):.3f} s {without}")
    print(f"W1 with the page open: median {statistics.median(with_page):.3f} s {with_page}; "
          f"the browser's CPU: {[round(c, 2) for c in browser_cpu]} s")
    print(f"ratio {ratio:.2f} (target <= {TARGET}): {'PASS' if ratio <= TARGET else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"without": without, "with_dashboard": with_page, "ratio": ratio,
                       "browser_cpu": browser_cpu}, f)
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
