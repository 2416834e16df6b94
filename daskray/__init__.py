"""daskray: a Dask scheduler backend with Ray's programming model.

>>> import daskray, dask.array as da
>>> daskray.init()                                   # doctest: +SKIP
>>> da.ones((1000, 1000), chunks=100).sum().compute()  # doctest: +SKIP
1000000.0
>>> daskray.shutdown()                               # doctest: +SKIP
"""

from .actors import Actor, ActorClass, ActorHandle
from .actors.pool import ActorPool
from .api import (
    cancel, get, get_actor, init, is_initialized, kill, put, remote, shutdown, wait,
)
from .refs import ObjectRef
from .errors import (
    ActorDiedError, ActorError, ClusterError, DaskrayError, GetTimeoutError, GraphError, ObjectLostError,
    RemoteTraceback, SerializationError, TaskCancelledError, TaskError, WorkerCrashedError,
)

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "get", "put", "wait", "cancel", "remote",
    "ObjectRef", "Actor", "ActorClass", "ActorHandle", "ActorPool", "kill", "get_actor",
    "ActorDiedError", "ActorError",
    "DaskrayError", "ClusterError", "GraphError", "SerializationError", "TaskError",
    "RemoteTraceback", "WorkerCrashedError", "ObjectLostError", "TaskCancelledError",
    "GetTimeoutError",
]
