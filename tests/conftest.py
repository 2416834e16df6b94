"""Shared fixtures for daskray's test suite."""

from __future__ import annotations

import pytest

import daskray

#: the size of the cluster every test that uses ``cluster`` runs on
NUM_WORKERS = 2


@pytest.fixture(scope="session")
def cluster():
    """A daskray cluster (head + ``NUM_WORKERS`` workers), shared by the whole session.

    ``daskray.init`` also makes daskray dask's default scheduler until the
    ``daskray.shutdown()`` at the end.  A test that has to stop the cluster
    (for example to check ``init``/``shutdown`` themselves) must leave one
    running again, started with ``daskray.init(num_workers=NUM_WORKERS)``;
    ``restart_cluster`` below does that for it.
    """
    if daskray.is_initialized():  # someone else's cluster: start ours from scratch
        daskray.shutdown()
    daskray.init(num_workers=NUM_WORKERS)
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
    daskray.init(num_workers=NUM_WORKERS)
