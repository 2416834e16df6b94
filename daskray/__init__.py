"""daskray: a Dask scheduler backend with Ray's programming model.

>>> import daskray, dask.array as da
>>> daskray.init()                                   # doctest: +SKIP
>>> da.ones((1000, 1000), chunks=100).sum().compute()  # doctest: +SKIP
1000000.0
>>> daskray.shutdown()                               # doctest: +SKIP

daskray's own processes (the head and the workers, which import this package
too) load the public names only on first use, so they start without importing
dask; in any other process they load at once, which also registers
``scheduler="daskray"`` with dask.
"""

import importlib
import os
from typing import Any

from .errors import (
    ActorDiedError, ActorError, ClusterError, DaskrayError, GetTimeoutError, GraphError,
    NestingLimitError, ObjectLostError, ObjectStoreFullError, RemoteTraceback,
    SerializationError, TaskCancelledError, TaskError, WorkerCrashedError,
)

__version__ = "0.1.0"

#: public name -> the module defining it
_LAZY = {
    **dict.fromkeys(
        ["init", "shutdown", "is_initialized", "get", "put", "wait", "cancel", "remote",
         "kill", "get_actor", "object_store_stats", "cluster_resources",
         "available_resources", "nodes", "exit_actor", "get_runtime_context",
         "list_named_actors", "timeline"], "api"),
    "ObjectRef": "refs", "ObjectID": "refs",
    "Actor": "actors", "ActorClass": "actors", "ActorHandle": "actors", "method": "actors",
    "ActorPool": "actors.pool",
    # the function, which replaces its module as the attribute once loaded
    "progress": "progress",
}

__all__ = [
    *_LAZY,
    "DaskrayError", "ClusterError", "GraphError", "SerializationError", "TaskError",
    "RemoteTraceback", "WorkerCrashedError", "ObjectLostError", "TaskCancelledError",
    "GetTimeoutError", "ActorDiedError", "ActorError", "ObjectStoreFullError",
    "NestingLimitError",
]


#: Ray's other names for public names: alias -> the name
_ALIASES = {"ObjectID": "ObjectRef"}


#: subpackages reachable as attributes after ``import daskray``, as ``ray.util`` is
_SUBPACKAGES = {"util"}


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'daskray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "DASKRAY_CONFIG" not in os.environ:  # not one of daskray's own processes
    from . import api as _api  # noqa: F401
