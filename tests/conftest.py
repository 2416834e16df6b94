"""Shared fixtures for daskray's test suite."""

from __future__ import annotations

import signal

import pytest

import daskray
from helpers import start_cluster


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
