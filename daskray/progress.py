"""``daskray.progress``: a progress bar of ObjectRefs and dask collections, as
``distributed.progress``.

It shows how many of the tracked objects are done out of how many (a tqdm bar).
In a terminal it blocks until all are done; in Jupyter it returns at once and a
thread keeps the notebook's bar up to date, as ``distributed.progress`` does.
Dask collections are tracked through the ObjectRefs of their persisted results:
one not persisted yet is persisted first, and what ``progress`` returns holds the
persisted one (``dask.persist``'s convention; ``distributed.progress`` takes only
futures and would track nothing there) -- use it, or the work runs again.
Both backends work alike: persisted collections hold ObjectRefs on each.

The bar is refreshed every ``INTERVAL`` seconds (each refresh is one ``wait``
on the refs not done).  A failed task ends the bar: it stops, says how many
failed and which first, and ``progress`` returns (it raises nothing: the error
is raised where the value is read, by ``get`` or ``compute``).  With
``timeout``, a terminal bar stops after that many seconds and raises
:class:`~daskray.errors.GetTimeoutError`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Iterable

import dask
import dask.base

from . import api
from .errors import GetTimeoutError
from .refs import ObjectRef

#: seconds between refreshes of the bar
INTERVAL = 0.1


def progress(*objs: Any, timeout: float | None = None, notebook: bool | None = None,
             file: Any = None) -> Any:
    """Show a bar of how many of ``objs`` (ObjectRefs, lists of them, dask
    collections) are done.  Blocks until all are done in a terminal; in Jupyter
    (``notebook=None`` guesses) returns at once, the bar updating by itself.

    Returns ``objs`` as given (one object if one was given, else a tuple), with
    each dask collection that was not persisted replaced by its persisted self.
    ``timeout``: at most this many seconds (then GetTimeoutError in a terminal;
    the notebook's bar stops).  ``file``: where a terminal bar is drawn
    (default ``sys.stderr``, as tqdm's)."""
    returned = _persisted(objs)
    refs = list(dict.fromkeys(_refs_of(returned)))
    in_notebook = _in_notebook() if notebook is None else notebook
    tracker = _Tracker(refs, _make_bar(len(refs), in_notebook, file))
    if in_notebook:
        threading.Thread(target=tracker.run, args=(timeout,), name="daskray-progress",
                         daemon=True).start()
    elif not tracker.run(timeout):
        raise GetTimeoutError(f"daskray.progress: {tracker.done} of {len(refs)} objects "
                              f"were done after {timeout} s")
    return returned[0] if len(returned) == 1 else tuple(returned)


class _Tracker:
    """Moves a bar as the refs get done; ends it at the first failure."""

    def __init__(self, refs: list[ObjectRef], bar: Any) -> None:
        self.pending = refs
        self.bar = bar
        self.done = 0
        self.failed: list[ObjectRef] = []

    def run(self, timeout: float | None) -> bool:
        """Track until every ref is done, one failed, or ``timeout`` passed (then
        False); the bar is closed whatever happens."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.pending and not self.failed:
                left = INTERVAL if deadline is None else min(INTERVAL,
                                                             deadline - time.monotonic())
                if left <= 0:
                    self.bar.set_description("timed out")
                    return False
                ready, self.pending = api.wait(self.pending, num_returns=len(self.pending),
                                               timeout=left)
                self._advance(ready)
            return True
        finally:
            self.bar.close()

    def _advance(self, ready: list[ObjectRef]) -> None:
        if not ready:
            return
        self.done += len(ready)
        self.bar.update(len(ready))
        self.failed.extend(_failed(ready))
        if self.failed:
            self.bar.set_description(f"erred ({len(self.failed)} failed)")
            self.bar.write(f"daskray.progress: {len(self.failed)} task(s) failed, the first "
                           f"{self.failed[0]!r}; get() or compute() raises its error",
                           file=self.bar.fp if hasattr(self.bar, "fp") else None)


def _failed(refs: list[ObjectRef]) -> list[ObjectRef]:
    """Those of ``refs`` (all done) whose task failed, without fetching any value."""
    session = api._session()
    if getattr(session, "on_dask", False):  # the dask.distributed backend
        return [r for r in refs if session.table.future_of(r._key).status == "error"]
    results = getattr(getattr(session, "conn", None), "results", None)
    if results is None:  # local_mode: every task ran already; a get tells
        return [r for r in refs if _raises(r)]
    return [r for r in refs if (res := results.get(r._key)) is not None
            and (res.error is not None or res.kind is not None)]


def _raises(ref: ObjectRef) -> bool:
    try:
        api.get(ref)
    except Exception:  # noqa: BLE001 - the task's own error
        return True
    return False


def _persisted(objs: Iterable[Any]) -> list[Any]:
    """``objs``, each dask collection not persisted yet persisted (at once, as
    ``dask.persist`` would)."""
    objs = list(objs)
    todo = [i for i, o in enumerate(objs) if dask.is_dask_collection(o)
            and not isinstance(o, ObjectRef) and not _is_persisted(o)]
    if todo:
        done = dask.persist(*[objs[i] for i in todo], scheduler=api.get)
        for i, coll in zip(todo, done):
            objs[i] = coll
    return objs


def _is_persisted(coll: Any) -> bool:
    """Whether every node of the collection's graph is a result held in the
    cluster (an ObjectRef) or a plain value or alias: nothing left to run."""
    from dask._task_spec import Task

    return not any(isinstance(v, Task) for v in dict(coll.__dask_graph__()).values())


def _refs_of(objs: Iterable[Any]) -> Iterable[ObjectRef]:
    for obj in objs:
        if isinstance(obj, ObjectRef):
            yield obj
        elif isinstance(obj, (list, tuple, set)):
            yield from _refs_of(obj)
        elif dask.is_dask_collection(obj):
            yield from (v for v in dict(obj.__dask_graph__()).values()
                        if isinstance(v, ObjectRef))
        else:
            raise TypeError(f"daskray.progress() tracks ObjectRefs and dask collections, "
                            f"not {type(obj).__name__}")


def _make_bar(total: int, in_notebook: bool, file: Any) -> Any:
    if in_notebook:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="daskray")
    from tqdm import tqdm
    return tqdm(total=total, desc="daskray", file=file if file is not None else sys.stderr)


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a guess, as distributed's)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
