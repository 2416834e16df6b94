"""Exception types of daskray.

Every error here is picklable, because errors cross process boundaries: a worker
raises, the head forwards, the driver re-raises.  A task's own exception is *not*
wrapped in one of these: the driver raises the original exception object (so
``except ValueError`` works and its attributes are intact) with the remote
traceback attached as ``__cause__`` (a :class:`RemoteTraceback`), the way
``concurrent.futures.process`` does it.  The types below are for failures of the
runtime itself and for bad input.
"""

from __future__ import annotations


class DaskrayError(Exception):
    """Base class of every error raised by daskray itself."""


class RemoteTraceback(DaskrayError):
    """Carries the formatted traceback of an exception raised in another process.

    Attached as ``__cause__`` of the re-raised task exception, so the traceback
    printed in the driver shows the user's own line in the worker.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class TaskError(DaskrayError):
    """A task raised an exception that could not be carried back as itself.

    Used when the original exception cannot be pickled or unpickled; the type
    name, message and remote traceback are kept as text.  Also what a task that
    called ``sys.exit()`` raises in its caller, with the ``SystemExit`` as
    ``__cause__`` (``reason`` then says so): raised as itself, it would end the
    caller.
    """

    def __init__(self, key: str, type_name: str, message: str, tb: str,
                 reason: str | None = None) -> None:
        super().__init__(key, type_name, message, tb, reason)
        self.key = key
        self.type_name = type_name
        self.message = message
        self.tb = tb
        self.reason = reason

    def __str__(self) -> str:
        why = self.reason or ("the exception itself could not be sent back to the driver; "
                              "remote traceback follows")
        return f"task {self.key!r} raised {self.type_name}: {self.message}\n({why})\n{self.tb}"


class GraphError(DaskrayError, ValueError):
    """The graph handed to ``daskray.get`` is malformed (cycle, missing dependency).

    A ``ValueError`` too, as dask's own schedulers raise ``ValueError`` here.
    """


class SerializationError(DaskrayError, TypeError):
    """A function, argument or result could not be pickled.

    A ``TypeError`` too, as ``pickle`` raises ``TypeError`` for most of these.
    """


class WorkerCrashedError(DaskrayError):
    """The worker process running a task died (killed, segfault, out of memory)."""


class ObjectLostError(DaskrayError):
    """An object is gone: the only process holding it died or it was freed."""


class HolderLostError(ObjectLostError):
    """The process a reader was told holds an object died before the read.  The
    head then computes the object again from its task, or reports it lost: a
    reader asks the head again rather than failing (see ``Session.get``)."""


class TaskCancelledError(DaskrayError):
    """The task was cancelled before it finished."""


class GetTimeoutError(DaskrayError, TimeoutError):
    """``get`` did not finish within its timeout."""


class ClusterError(DaskrayError, RuntimeError):
    """The cluster could not be started, is not running, or stopped unexpectedly."""


class ActorDiedError(DaskrayError):
    """The actor's process is gone (killed, crashed, or its handles were dropped)
    and will not come back for this call."""


class ActorNameTakenError(DaskrayError, ValueError):
    """An actor is created under a name another live actor of its namespace has
    (Ray raises ``ValueError``, at creation)."""


class ActorError(DaskrayError):
    """The actor could not be used: its constructor raised (traceback attached)."""


class ObjectStoreFullError(DaskrayError, MemoryError):
    """A new object does not fit in the object store's memory limit, and the objects
    that could make room are pinned by live views (values still referenced)."""


class NestingLimitError(DaskrayError):
    """A task nested inside other tasks' ``get()`` calls went deeper than
    ``daskray.max-nesting-depth`` allows: its ``.remote()`` call was refused.
    Every call below it waits on the stack of a worker process, so the depth is
    bounded (raise the setting before ``daskray.init()``, or recurse less deep)."""
