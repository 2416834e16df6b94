"""daskray: a Dask scheduler backend with Ray's programming model.

>>> import daskray, dask.array as da
>>> daskray.init()                                   # doctest: +SKIP
>>> da.ones((1000, 1000), chunks=100).sum().compute()  # doctest: +SKIP
1000000.0
>>> daskray.shutdown()                               # doctest: +SKIP
"""

from .api import cancel, get, init, is_initialized, put, remote, shutdown, wait
from .refs import ObjectRef
from .errors import (
    ClusterError, DaskrayError, GetTimeoutError, GraphError, ObjectLostError,
    RemoteTraceback, SerializationError, TaskCancelledError, TaskError, WorkerCrashedError,
)

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "get", "put", "wait", "cancel", "remote",
    "ObjectRef",
    "DaskrayError", "ClusterError", "GraphError", "SerializationError", "TaskError",
    "RemoteTraceback", "WorkerCrashedError", "ObjectLostError", "TaskCancelledError",
    "GetTimeoutError",
]
