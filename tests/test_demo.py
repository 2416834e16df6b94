"""``python -m daskray.demo`` (issue 15, item 6): every step runs, is checked and
timed, the whole demo takes under a minute, and it leaves nothing behind."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest

from daskray import demo
from daskray.runtime.cluster import OWNER_FILE, SESSION_PREFIX

REPO = Path(__file__).resolve().parent.parent
STEPS = ["daskray.init()", "dask array", "dask DataFrame", "remote functions, put",
         "Arrow table in place", "actor in a dask graph", "Dataset.from_arrow", "Trainer.fit",
         "search (ASHA)"]
#: a step's line: name, seconds, verdict, what it computed
LINE = re.compile(r"(?P<name>.+?)\s+(?P<seconds>\d+\.\d\d) s  (?P<verdict>ok|FAILED)  (?P<detail>.+)")


def processes_with(token: str) -> list[str]:
    """Live processes whose environment carries ``token`` (the demo and everything
    it started inherit it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DASKRAY_DEMO_TEST") == token \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {proc.cmdline()}")
        except psutil.Error:
            continue
    return found


def sessions_of(pid: int) -> list[str]:
    """The demo's session directories: in /dev/shm (named by the driver's pid) and
    in the temp directory (holding the driver's pid)."""
    left = glob.glob(f"/dev/shm/daskray-{pid}-*")
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SESSION_PREFIX + "*")):
        try:
            if Path(path, OWNER_FILE).read_text().strip() == str(pid):
                left.append(path)
        except OSError:
            continue
    return left


@pytest.mark.timeout(150)
def test_the_demo_checks_and_times_every_step_and_leaves_nothing_behind():
    token = uuid.uuid4().hex
    env = {**os.environ, "DASKRAY_DEMO_TEST": token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "daskray.demo"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output

    lines = [LINE.fullmatch(line) for line in output.splitlines()]
    steps = [m for m in lines if m is not None]
    assert [m["name"] for m in steps] == STEPS, output
    assert all(m["verdict"] == "ok" for m in steps), output
    summary = re.search(rf"^{len(STEPS)} of {len(STEPS)} steps ok in (\d+\.\d) s$", output, re.M)
    assert summary, output
    assert float(summary[1]) < 60, output

    assert processes_with(token) == [], "the demo left processes running"
    assert sessions_of(proc.pid) == [], "the demo left its session directories"


def test_a_step_that_fails_or_raises_is_reported_and_the_next_still_runs(capsys):
    assert demo._run("wrong", lambda: ("2 + 2 = 5", False)) is False
    assert demo._run("broken", lambda: 1 / 0) is False
    assert demo._run("fine", lambda: ("2 + 2 = 4", True)) is True
    out = capsys.readouterr().out
    assert re.search(r"^wrong\s+\d+\.\d\d s  FAILED  2 \+ 2 = 5$", out, re.M), out
    assert re.search(r"^broken\s+\d+\.\d\d s  FAILED  raised:", out, re.M), out
    assert "ZeroDivisionError" in out
    assert re.search(r"^fine\s+\d+\.\d\d s  ok  2 \+ 2 = 4$", out, re.M), out
