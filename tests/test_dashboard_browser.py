"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing downloads a browser) watches a
graph run.  Skipped, with the reason printed, only when Chromium is missing and
cannot be installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import daskray
from helpers import NUM_WORKERS, start_cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: the columns of a named Bokeh data source, as JSON (BokehJS keeps them as a Map
#: or a plain object depending on its version)
SOURCE_JS = """
const model = Bokeh.documents[0].get_model_by_name(arguments[0]);
if (model == null) return null;
const data = model.data;
const out = {};
for (const [k, v] of (data instanceof Map ? data.entries() : Object.entries(data)))
    out[k] = Array.from(v);
return JSON.stringify(out);
"""
#: the text of a named table's cells as drawn (SlickGrid's cells, in Bokeh's shadow DOM)
CELLS_JS = """
const model = Bokeh.documents[0].get_model_by_name(arguments[0]);
const view = model == null ? null : Bokeh.index.find_one(model);
if (view == null) return [];
return Array.from(view.shadow_el.querySelectorAll('.slick-row')).map(
    row => Array.from(row.querySelectorAll('.slick-cell')).map(c => c.textContent));
"""
READY_JS = ("return !!(window.Bokeh && Bokeh.documents.length && "
            "Bokeh.documents[0].get_model_by_name('workers_source'))")
STATUS_JS = "return Bokeh.documents[0].get_model_by_name('status').text"


def _install_chromium() -> str | None:
    """Install Debian's chromium and chromium-driver if missing (as root with
    apt-get); the reason they are unavailable, or None."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "chromium and chromium-driver are not installed (and this is no root with apt-get)"
    done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not os.path.exists(CHROMEDRIVER):
        return f"could not install chromium: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = _install_chromium()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1200", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    # the driver's own path given: Selenium Manager downloads nothing
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard_cluster(restart_cluster):
    daskray.shutdown()
    ctx = daskray.init(num_workers=NUM_WORKERS, include_dashboard=True, dashboard_port=0)
    yield ctx
    daskray.shutdown()
    start_cluster()


def _sleepy(i: int) -> int:
    time.sleep(0.02)  # the workload: long enough to watch it run
    return i


def _source(driver, name: str) -> dict:
    text = driver.execute_script(SOURCE_JS, name)
    return {} if text is None else json.loads(text)


def _rows(driver, name: str) -> list[list[str]]:
    """The rows of the named table as the page shows them."""
    return driver.execute_script(CELLS_JS, name) or []


def _page_updates(driver, timeout: float = 10.0) -> bool:
    """Whether the page's status line changes within ``timeout`` (it counts redraws)."""
    before = driver.execute_script(STATUS_JS)
    return wait_until(lambda: driver.execute_script(STATUS_JS) != before, timeout, 0.1)


@pytest.mark.timeout(240)
def test_the_page_shows_a_graph_run_live(dashboard_cluster, browser, tmp_path):
    browser.get(dashboard_cluster.dashboard_url)
    assert wait_until(lambda: browser.execute_script(READY_JS), 30, 0.2), \
        "the Bokeh page never loaded"

    def task_workers() -> list:  # columns: worker, kind, pid, CPU, memory, current, queue
        return [r[0] for r in _rows(browser, "workers") if len(r) > 1 and r[1] == "task"]

    assert wait_until(lambda: len(task_workers()) == NUM_WORKERS, 30, 0.2), \
        f"the page shows task workers {task_workers()}, not {NUM_WORKERS}"

    keys = [f"browser-sleepy-{i}" for i in range(300)]
    result: dict = {}
    run = threading.Thread(target=lambda: result.setdefault(
        "value", daskray.get({k: (_sleepy, i) for i, k in enumerate(keys)}, keys)))
    run.start()
    try:
        def bars() -> list:
            data = _source(browser, "task_stream_source")
            return [(k, w) for k, w in zip(data.get("key", []), data.get("worker", []))
                    if k.startswith("browser-sleepy-")]

        assert wait_until(lambda: bars(), 60, 0.2), "no task appeared in the task stream"
        assert _page_updates(browser), "the page stopped updating while the graph ran"
    finally:
        run.join(120)
    assert not run.is_alive() and result["value"] == tuple(range(300))

    def progress_done() -> bool:  # columns: prefix, done, running, waiting, erred, % done
        return ["browser-sleepy", "300", "0", "0", "0", "100.0"] in _rows(browser, "progress")

    assert wait_until(progress_done, 30, 0.2), \
        f"progress did not reach 100%: {_rows(browser, 'progress')}"
    workers_used = {w for _, w in bars()}
    assert workers_used <= set(task_workers()) and workers_used
    assert _page_updates(browser), "the page stopped updating after the graph ran"
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
