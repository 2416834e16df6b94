"""``daskray.progress``: a tqdm bar of refs and dask collections, as distributed.progress."""

from __future__ import annotations

import io
import os
import threading
import time

import dask.array as da
import pytest

import daskray
from daskray.refs import ObjectRef

from helpers import wait_until


@daskray.remote
def square(i: int) -> int:
    return i * i


@daskray.remote
def held(release: str) -> int:
    """Runs until the file ``release`` exists."""
    while not os.path.exists(release):
        time.sleep(0.01)
    return 1


@daskray.remote
def broken() -> None:
    raise ValueError("broken on purpose")


def final_count(bar_text: str) -> str:
    """The last ``done/total`` a terminal bar drew."""
    import re

    return re.findall(r"(\d+/\d+) \[", bar_text)[-1]


@pytest.mark.timeout(120)
def test_the_bar_counts_refs_to_their_total(backend):
    refs = [square.remote(i) for i in range(30)]
    out = io.StringIO()
    assert daskray.progress(refs, file=out) == refs
    assert final_count(out.getvalue()) == "30/30"
    ready, _ = daskray.wait(refs, num_returns=30, timeout=0)
    assert len(ready) == 30
    one = square.remote(7)
    out = io.StringIO()
    assert daskray.progress(one, file=out) is one
    assert final_count(out.getvalue()) == "1/1"


@pytest.mark.timeout(120)
def test_a_collection_is_persisted_and_its_chunks_counted(backend):
    x = da.arange(100, chunks=10) * 2
    out = io.StringIO()
    persisted = daskray.progress(x, file=out)
    assert final_count(out.getvalue()) == "10/10"
    graph = dict(persisted.__dask_graph__())
    assert all(isinstance(v, ObjectRef) for v in graph.values())
    assert persisted.sum().compute() == x.sum().compute(scheduler="sync")
    out = io.StringIO()
    assert daskray.progress(persisted, file=out) is persisted  # already persisted: as is
    assert final_count(out.getvalue()) == "10/10"


@pytest.mark.timeout(120)
def test_a_failed_task_ends_the_bar_and_is_reported(cluster, tmp_path):
    release = str(tmp_path / "release")
    bad = broken.remote()
    daskray.wait([bad], timeout=60)
    slow = [held.remote(release) for _ in range(3)]
    out = io.StringIO()
    try:
        daskray.progress([bad, *slow], file=out)  # returns, though the others still run
        assert not os.path.exists(release)
        assert "1 task(s) failed" in out.getvalue()
        assert "erred" in out.getvalue()
        with pytest.raises(ValueError, match="broken on purpose"):
            daskray.get(bad)
    finally:
        open(release, "w").close()
    assert daskray.get(slow, timeout=60) == [1, 1, 1]


@pytest.mark.timeout(120)
def test_a_timeout_stops_the_bar_and_raises(cluster, tmp_path):
    release = str(tmp_path / "release")
    slow = [held.remote(release) for _ in range(2)]
    out = io.StringIO()
    try:
        start = time.monotonic()
        with pytest.raises(daskray.GetTimeoutError, match="0 of 2 objects"):
            daskray.progress(slow, timeout=0.5, file=out)
        assert time.monotonic() - start < 30
        assert "timed out" in out.getvalue()
    finally:
        open(release, "w").close()
    assert daskray.get(slow, timeout=60) == [1, 1]


def _progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "daskray-progress"]


@pytest.mark.timeout(120)
def test_in_a_notebook_it_returns_at_once_and_the_bar_follows(cluster, tmp_path, capsys):
    release = str(tmp_path / "release")
    slow = [held.remote(release) for _ in range(2)]
    try:
        assert daskray.progress(slow, notebook=True) == slow  # the tasks still wait
        assert _progress_threads()
    finally:
        open(release, "w").close()
    assert wait_until(lambda: not _progress_threads(), timeout=60)
    assert "2/2" in capsys.readouterr().err


def test_progress_refuses_what_it_cannot_track(cluster):
    with pytest.raises(TypeError, match="ObjectRefs and dask collections"):
        daskray.progress(42)
