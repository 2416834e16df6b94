"""Shared fixtures for daskray's test suite."""

from __future__ import annotations

import signal

import dask
import pytest

import daskray
from helpers import running_backend, start_cluster, start_dask_cluster

#: the backends a test that takes the ``backend`` fixture runs on
BACKENDS = ["local", "distributed"]


@pytest.fixture(scope="session")
def cluster():
    """A daskray cluster (head + ``helpers.NUM_WORKERS`` workers), shared by the whole
    session, whose scheduler core checks its invariants after every event.

    ``daskray.init`` also makes daskray dask's default scheduler until the
    ``daskray.shutdown()`` at the end.  A test that has to stop the cluster
    (for example to check ``init``/``shutdown`` themselves) must leave one
    running again, started with ``helpers.start_cluster()``;
    ``restart_cluster`` below does that for it.
    """
    if daskray.is_initialized():  # someone else's cluster: start ours from scratch
        daskray.shutdown()
    start_cluster()
    try:
        yield daskray
    finally:
        daskray.shutdown()


@pytest.fixture
def restart_cluster(cluster):
    """For tests that stop the shared cluster: a fresh one runs again afterwards."""
    yield cluster
    if daskray.is_initialized():
        daskray.shutdown()
    start_cluster()


@pytest.fixture
def cluster_without_checks(cluster):
    """The shared cluster restarted without the core's invariant checks, for a test
    of so many tasks that they would take minutes: each check walks every task the
    head holds, after every event.  The checked cluster runs again afterwards."""
    daskray.shutdown()
    start_cluster(_validate=False)
    try:
        yield daskray
    finally:
        daskray.shutdown()
        start_cluster()


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in the main thread during the test, whatever
    this process inherited: started in the background of a non-interactive shell
    (as CI jobs often are), a process ignores SIGINT and Python then installs no
    handler, so a simulated Ctrl-C would do nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask.distributed cluster (scheduler + ``helpers.NUM_WORKERS`` worker
    processes), started once for the tests of the dask.distributed backend."""
    # tests kill dask workers: LocalCluster gives up on one whose nanny has not brought
    # it back within this time, which a loaded machine may well exceed (default 15 s)
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "300s"}), \
            start_dask_cluster() as dask_cluster:
        try:
            yield dask_cluster
        finally:  # daskray's client first, or it would wait for the scheduler to come back
            if running_backend() == "distributed":
                daskray.shutdown()


def _run_on_dask(dask_cluster) -> None:
    """daskray on ``dask_cluster`` (not merely on some dask cluster a test left it on)."""
    if running_backend() != "distributed" or \
            daskray.init(ignore_reinit_error=True).address_info["address"] \
            != dask_cluster.scheduler_address:
        daskray.shutdown()
        daskray.init(address=dask_cluster.scheduler_address)


@pytest.fixture
def on_distributed(cluster, dask_cluster):
    """daskray running on the dask.distributed cluster ``dask_cluster`` (the value),
    for tests of that backend alone; they run with the other distributed tests, last."""
    _run_on_dask(dask_cluster)
    yield dask_cluster


@pytest.fixture(params=BACKENDS)
def backend(request, cluster):
    """daskray running on each backend in turn: its own runtime (the shared
    ``cluster``) and a dask.distributed cluster (``dask_cluster``).  The value is the
    backend's name.  Tests on the distributed backend run after all the others (see
    ``pytest_collection_modifyitems``), so the switch happens once."""
    if request.param == "distributed":
        _run_on_dask(request.getfixturevalue("dask_cluster"))
    elif running_backend() != "local":
        daskray.shutdown()
        start_cluster()
    yield request.param


def pytest_collection_modifyitems(items):
    """Tests on the dask.distributed backend last: daskray then switches backend once.
    A local test that restarts the cluster after them still gets a local one."""
    def runs_on_dask(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return "on_distributed" in getattr(item, "fixturenames", ()) or (
            callspec is not None and callspec.params.get("backend") == "distributed")

    items.sort(key=runs_on_dask)
