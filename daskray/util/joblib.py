"""A joblib parallel backend on daskray: scikit-learn's ``n_jobs`` work on the cluster.

>>> from daskray.util.joblib import register_daskray       # doctest: +SKIP
>>> register_daskray()                                      # doctest: +SKIP
>>> with joblib.parallel_backend("daskray"):               # doctest: +SKIP
...     GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

Each batch joblib hands the backend runs as one remote call, so it goes where
daskray's scheduler puts it (and is retried if its worker dies).  Large arguments
(``X`` and ``y`` of every fit) are put in the object store once per ``Parallel``
call and reach the tasks as ObjectRefs.  A batch that raises raises its own
exception in the caller; joblib then aborts, and the calls still running or queued
are cancelled.  joblib calls made inside a batch (a ``RandomForestClassifier`` in a
``GridSearchCV``) run in that task, one after another: the outer call already
spreads work over every CPU.

This module imports joblib: ``import daskray`` does not, so joblib (which comes with
scikit-learn) stays an optional dependency.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from joblib import register_parallel_backend
from joblib._parallel_backends import (AutoBatchingMixin, ParallelBackendBase,
                                       SequentialBackend)
from joblib.parallel import parallel_config

import daskray

from ._watch import RefWatcher

__all__ = ["DaskrayBackend", "register_daskray", "register_ray"]

#: arguments at least this big (``sys.getsizeof``) go to the object store once per
#: ``Parallel`` call instead of travelling inside every batch: daskray's own
#: threshold for values sent inside messages
LARGE_ARGUMENT = 100 * 1024


def register_daskray() -> None:
    """Make ``joblib.parallel_backend("daskray")`` (and ``parallel_config``) run
    joblib's work, scikit-learn's ``n_jobs`` included, on the daskray cluster."""
    register_parallel_backend("daskray", DaskrayBackend)


def register_ray() -> None:
    """Ray's ``ray.util.joblib.register_ray``: the backend under Ray's name ``"ray"``
    (and ``"daskray"``), so code written for Ray runs unchanged."""
    register_daskray()
    register_parallel_backend("ray", DaskrayBackend)


class _Stored:
    """Stands in a batch for a large argument: the task's ``index``-th extra argument."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple:
        return _Stored, (self.index,)


class _Batch:
    """One batch of joblib calls as a task runs it: the calls, their large
    arguments replaced by :class:`_Stored`, and the backend nested calls use."""

    def __init__(self, items: list, nested: Any) -> None:
        self.items = items
        self.nested = nested  # (backend, n_jobs), as joblib's BatchedCalls has it

    def __call__(self, stored: tuple) -> list:
        backend, n_jobs = self.nested
        with parallel_config(backend=backend, n_jobs=n_jobs):
            return [func(*_fill(args, stored), **dict(zip(kwargs, _fill(kwargs.values(), stored))))
                    for func, args, kwargs in self.items]


def _fill(values: Any, stored: tuple) -> list:
    return [stored[v.index] if isinstance(v, _Stored) else v for v in values]


def _run_batch(batch: Callable, *stored: Any) -> list:
    """The task: one batch of calls; ``stored`` are its large arguments, resolved
    from their ObjectRefs before the call, as top-level arguments are."""
    if isinstance(batch, _Batch):
        return batch(stored)
    return batch()


class DaskrayBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend protocol on daskray's public API: a batch is a remote call.

    ``remote_args`` (Ray's name ``ray_remote_args`` is accepted too) are options of
    those calls, e.g. ``{"num_cpus": 2}`` or ``{"resources": {"GPU": 1}}``.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 remote_args: dict | None = None, ray_remote_args: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.remote_args = dict(remote_args or ray_remote_args or {})
        self._watcher = RefWatcher("daskray-joblib")
        self._stored: dict[int, tuple[Any, daskray.ObjectRef]] = {}

    def __reduce__(self) -> tuple:
        # BatchedCalls pickle the backend nested calls use; never this one with its thread
        return DaskrayBackend, (self.nesting_level, self.inner_max_num_threads, self.remote_args)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches run at once: ``n_jobs``, where -1 is all the cluster's
        CPUs (``daskray.cluster_resources()["CPU"]``), -2 all but one, ..."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            cpus = int(daskray.cluster_resources().get("CPU", 1))
            return max(cpus + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def get_nested_backend(self) -> tuple:
        # calls made inside a batch run there, one after another
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def submit(self, func: Callable, callback: Callable | None = None) -> daskray.ObjectRef:
        """Run the batch ``func`` as a remote call; ``callback(ref)`` once it finished."""
        batch, stored = self._batch_of(func)
        task = daskray.remote(_run_batch)
        if self.remote_args:
            task = task.options(**self.remote_args)
        ref = task.remote(batch, *stored)
        if callback is not None:
            self._watcher.watch(ref, callback)
        return ref

    def retrieve_result_callback(self, out: daskray.ObjectRef) -> list:
        """The batch's results, or its own exception raised."""
        return daskray.get(out)

    def retrieve_result(self, out: daskray.ObjectRef, timeout: float | None = None) -> list:
        return daskray.get(out, timeout=timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """joblib gave up on this call (a batch raised, or the caller was
        interrupted): cancel the batches still queued or running."""
        running = self._watcher.watching()
        self._watcher.forget(running)
        for ref in running:
            try:
                daskray.cancel(ref)
            except daskray.DaskrayError:  # finished or gone meanwhile: nothing to stop
                pass

    def stop_call(self) -> None:
        # the large arguments of the call are freed with their last ObjectRef
        self._stored.clear()

    def terminate(self) -> None:
        self._stored.clear()
        self.reset_batch_stats()

    def _batch_of(self, func: Callable) -> tuple[Callable, list]:
        """``func`` (a joblib ``BatchedCalls``) with its large arguments put in the
        store once, and the ObjectRefs that stand for them."""
        items = getattr(func, "items", None)
        nested = (getattr(func, "_backend", None), getattr(func, "_n_jobs", None))
        if not isinstance(items, list) or nested[0] is None:
            return func, []  # not joblib's BatchedCalls: run as it is
        refs: list = []
        slots: dict[int, int] = {}

        def replace(value: Any) -> Any:
            if not _is_large(value):
                return value
            if id(value) not in slots:
                slots[id(value)] = len(refs)
                refs.append(self._store(value))
            return _Stored(slots[id(value)])

        batch = [(f, [replace(a) for a in args], {k: replace(v) for k, v in kwargs.items()})
                 for f, args, kwargs in items]
        if not refs:
            return func, []
        return _Batch(batch, nested), refs

    def _store(self, value: Any) -> daskray.ObjectRef:
        """The ObjectRef of ``value``, put once per ``Parallel`` call (the value is
        kept with it, so its ``id`` cannot be reused meanwhile)."""
        known = self._stored.get(id(value))
        if known is None:
            known = self._stored[id(value)] = (value, daskray.put(value))
        return known[1]


def _is_large(value: Any) -> bool:
    try:
        return sys.getsizeof(value) >= LARGE_ARGUMENT
    except TypeError:
        return False
