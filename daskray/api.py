"""The public entry points: ``init``, ``shutdown``, ``is_initialized``, ``get``.

One runtime per driver process, held here.  ``init`` starts a local cluster (or,
with ``local_mode=True``, nothing: graphs then run serially in this process) and
makes daskray dask's default scheduler; ``shutdown`` undoes both.  ``shutdown``
also runs at interpreter exit and is safe to call twice.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

import dask
import dask.base
import dask.local

from . import dask_scheduler
from .errors import ClusterError
from .runtime.cluster import LocalCluster

_UNSET = object()
_lock = threading.RLock()
_runtime: "_Runtime | None" = None


class _Runtime:
    """What ``init`` started, and the dask settings it replaced."""

    def __init__(self, cluster: LocalCluster | None, set_dask_scheduler: bool) -> None:
        self.cluster = cluster
        self.local_mode = cluster is None
        self.saved_config: dict[str, Any] = {}
        if set_dask_scheduler:
            self._set_config("scheduler", get)
            if dask.config.get("dataframe.shuffle.method", None) is None:
                # p2p needs distributed's workers, "disk" a shared disk: tasks work anywhere
                self._set_config("dataframe.shuffle.method", "tasks")

    def _set_config(self, key: str, value: Any) -> None:
        self.saved_config[key] = dask.config.get(key, _UNSET)
        dask.config.set({key: value})

    def restore_config(self) -> None:
        for key, old in self.saved_config.items():
            if old is _UNSET:
                head, _, leaf = key.rpartition(".")
                parent = dask.config.config
                for part in head.split(".") if head else ():
                    parent = parent.get(part, {})
                parent.pop(leaf, None)
            else:
                dask.config.set({key: old})


def init(
    num_workers: int | None = None,
    *,
    local_mode: bool = False,
    set_dask_scheduler: bool = True,
    ignore_reinit_error: bool = False,
    _validate: bool = False,
) -> None:
    """Start daskray on this machine: a head process and ``num_workers`` workers.

    ``num_workers`` defaults to the number of cores.  With ``local_mode=True`` no
    process is started: graphs run serially in this process, with ordinary
    tracebacks and breakpoints -- for debugging.  Unless
    ``set_dask_scheduler=False``, daskray becomes dask's default scheduler until
    :func:`shutdown`.  Calling ``init`` twice raises :class:`ClusterError` unless
    ``ignore_reinit_error=True``.
    """
    global _runtime
    with _lock:
        if _runtime is not None:
            if ignore_reinit_error:
                return
            raise ClusterError(
                "daskray.init() was called twice; call daskray.shutdown() first, or "
                "pass ignore_reinit_error=True to keep the running cluster"
            )
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        cluster = None
        if not local_mode:
            cluster = LocalCluster(num_workers or os.cpu_count() or 1, validate=_validate)
        _runtime = _Runtime(cluster, set_dask_scheduler)


def is_initialized() -> bool:
    """Whether :func:`init` has been called (and :func:`shutdown` not since)."""
    return _runtime is not None


def shutdown() -> None:
    """Stop the cluster, remove its files and restore dask's scheduler. Safe to call twice."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
        if runtime is None:
            return
        runtime.restore_config()
        if runtime.cluster is not None:
            runtime.cluster.close()


atexit.register(shutdown)


def _current() -> _Runtime:
    runtime = _runtime
    if runtime is None:
        raise ClusterError("daskray is not running: call daskray.init() first")
    return runtime


def get(dsk: Any, keys: Any = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of the dask graph ``dsk``: dask's scheduler ``get``.

    Use it as ``dask.compute(x, scheduler=daskray.get)``, ``scheduler="daskray"``,
    or just ``x.compute()`` after :func:`init`.  ``keys`` may be one key, a list
    or nested lists of keys; lists come back as tuples.  Unknown keyword
    arguments are accepted and ignored.
    """
    runtime = _current()
    if runtime.local_mode:
        kwargs.pop("num_workers", None)
        return dask.local.get_sync(dsk, keys, **kwargs)
    return dask_scheduler.get(runtime.cluster.client, dsk, keys, **kwargs)


dask.base.named_schedulers["daskray"] = get
