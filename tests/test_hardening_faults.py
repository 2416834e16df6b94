"""Faults the runtime must survive: exceptions that do not pickle the usual way,
workers that keep dying.

Task functions live at module level so the workers can import them.
"""

from __future__ import annotations

import threading

import dask
import pytest

import daskray

pytestmark = pytest.mark.usefixtures("cluster")


# =========================================================================== tasks


def _recurse(n):
    return _recurse(n + 1)


@daskray.remote
def recurse_forever():
    import dask  # noqa: F401  - as any task may: it installs tblib's exception pickling

    return _recurse(0)


@daskray.remote
def raise_while_handling_an_unpicklable_error():
    import dask  # noqa: F401

    try:
        raise KeyError(threading.Lock())  # a lock does not pickle
    except KeyError:
        raise ValueError("raised while handling an unpicklable error")


class RefusesPickling(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


class CannotBeRebuilt(Exception):
    """Pickles, but unpickling calls ``__init__`` with one argument of two."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no text for this one")

    def __reduce__(self):
        raise TypeError("nor pickling")


@daskray.remote
def raise_it(kind):
    if kind == "refuses":
        raise RefusesPickling("refused-marker")
    if kind == "rebuilt":
        raise CannotBeRebuilt("rebuilt-marker", "why")
    raise UnprintableError()


def _run_a_dask_graph_first():
    """Workers that ran a dask graph have imported dask (and so tblib)."""
    import dask.array as da

    x = da.arange(40, chunks=5)
    assert int((x + 1).sum().compute()) == sum(range(1, 41))


# =========================================================================== exceptions


@pytest.mark.timeout(60)
def test_recursion_error_arrives_as_itself_after_a_dask_graph():
    _run_a_dask_graph_first()
    with pytest.raises(RecursionError) as info:
        daskray.get(recurse_forever.remote(), timeout=50)
    assert isinstance(info.value.__cause__, daskray.RemoteTraceback)
    assert "_recurse" in str(info.value.__cause__)


@pytest.mark.timeout(60)
def test_an_exception_whose_context_does_not_pickle_arrives_as_itself():
    _run_a_dask_graph_first()
    with pytest.raises(ValueError, match="raised while handling") as info:
        daskray.get(raise_while_handling_an_unpicklable_error.remote(), timeout=50)
    assert isinstance(info.value.__cause__, daskray.RemoteTraceback)
    assert "KeyError" in str(info.value.__cause__)  # the chain is in the text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, marker", [
    ("refuses", "RefusesPickling: refused-marker"),
    ("rebuilt", "CannotBeRebuilt: rebuilt-marker: why"),
    ("unprintable", "UnprintableError: <unprintable UnprintableError>"),
])
def test_an_exception_that_cannot_travel_arrives_as_a_task_error(kind, marker):
    with pytest.raises(daskray.TaskError) as info:
        daskray.get(raise_it.remote(kind), timeout=50)
    text = str(info.value)
    assert marker in text
    assert "could not be sent back" in text and "raise_it" in text  # the remote traceback
