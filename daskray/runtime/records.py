"""The typed records inside messages: a worker's reports and the tasks of a ``Run``.

Each is a NamedTuple marked with :func:`record`, which puts it on the allow-list
(``RECORDS``) of the classes ``protocol.decode`` lets a message name: a record's
construction runs no code but a tuple's, and checks its number of fields.  See
the protocol module's docstring for why records travel as themselves.
"""

from __future__ import annotations

from typing import NamedTuple

#: the record classes a message may hold, by name: the decoder's allow-list
RECORDS: dict[str, type] = {}


def _reduce_record(self: tuple) -> tuple:
    return type(self), tuple(self)


def record(cls: type) -> type:
    """Class decorator: a NamedTuple that may travel inside messages.  It pickles
    as its class and its fields (no more: faster than a NamedTuple's own way)."""
    if not (issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise TypeError(f"{cls.__name__}: a record is a NamedTuple")
    if cls.__name__ in RECORDS:
        raise ValueError(f"record {cls.__name__} defined twice")
    cls.__reduce__ = _reduce_record
    RECORDS[cls.__name__] = cls
    return cls


@record
class FinishedReport(NamedTuple):
    """A task finished; its result stays in the worker's store."""

    task: int
    #: the result's size, pickled
    nbytes: int
    #: the pickled result, when small (or when the driver wants every value)
    inline: bytes | None
    #: seconds it ran
    duration: float
    #: the ObjectRefs pickled inside the result
    contained: tuple


@record
class ErredReport(NamedTuple):
    """A task raised (or its result could not be pickled)."""

    task: int
    #: the pickled exception (``serialization.dumps_exception``)
    error: bytes


@record
class StartedReport(NamedTuple):
    """A task started (sent only for tasks whose driver wants to know)."""

    task: int


@record
class ReleasedReport(NamedTuple):
    """A task the worker was sent is handed back unrun (cancelled, or given
    back by a task waiting in ``get()``)."""

    task: int


@record
class RefsReport(NamedTuple):
    """ObjectRefs this process started (``added``) or stopped (``dropped``) holding."""

    added: list
    dropped: list


@record
class BlockedReport(NamedTuple):
    """Task ``task`` started (``blocked``) or stopped waiting in ``get()``/``wait()``."""

    blocked: bool
    task: int | None
    #: the ObjectRef keys it waits for
    awaits: tuple = ()
    #: whether the worker's stack has room for a task run on top of this one
    nest: bool = True


@record
class DirectFinishedReport(NamedTuple):
    """A call the caller sent straight to this actor's process finished; its
    result is kept under ``object_id`` (see ``scheduler.actors.direct_key``)."""

    ref: tuple
    object_id: str
    nbytes: int
    inline: bytes | None
    duration: float
    contained: tuple


@record
class DirectErredReport(NamedTuple):
    """A call the caller sent straight to this actor's process raised."""

    ref: tuple
    error: bytes


@record
class DirectReleasedReport(NamedTuple):
    """A call the caller sent straight to this actor's process was dropped unrun
    (it was cancelled while queued)."""

    ref: tuple


@record
class RunTask(NamedTuple):
    """One task of a :class:`Run`."""

    task: int
    #: the id of the function table its body refers to
    table_id: bytes
    #: the pickled task (``serialization.decode_task``)
    body: bytes
    #: one ``(object id, source)`` per input, in the order of the graph's deps;
    #: source ``("local",)``, ``("inline", pickled)`` or ``("peer", address)``
    deps: tuple
    #: report its start (``StartedReport``) and send its value inline
    notify: bool
    #: the waiting task it may run on top of, on the worker's stack
    parent: int | None
    #: how deep in nested calls it is (1: a call the driver made)
    depth: int
