"""Instructions: what the scheduler wants done, as plain data.

:meth:`SchedulerState.handle` returns a list of these; the head loop carries them
out (batching messages per destination).  Workers and clients are named by id;
turning an id into a socket address is the head loop's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from .events import GraphId, RefKey, TaskId, WorkerId, quick_init

#: How a dispatched task gets one of its inputs.
#:   ("local",)             the worker already holds it
#:   ("inline", bytes)      the pickled value travels inside the dispatch
#:   ("peer", worker_id)    fetch it from that worker
DepSource = tuple


@quick_init  # one per task: see quick_init
@dataclass(frozen=True, slots=True)
class Dispatch:
    worker: WorkerId
    task: TaskId
    graph: GraphId
    body: bytes
    #: one (object id, source) per input, in the order of the graph's deps
    deps: tuple[tuple[TaskId, DepSource], ...]
    #: report TaskStarted for this task
    notify: bool = False
    #: the waiting task this one may run on top of, on the worker's stack: the
    #: task whose code submitted it, or (dispatched to a worker whose task waits)
    #: the waiting task it was sent for
    parent: TaskId | None = None
    #: how deep in nested calls it is: 1 for a call the driver made, 2 for a
    #: call made by such a task, ...
    depth: int = 1


@quick_init  # one per task: see quick_init
@dataclass(frozen=True, slots=True)
class FreeObjects:
    worker: WorkerId
    objects: tuple[TaskId, ...]


@dataclass(frozen=True, slots=True)
class CancelTasks:
    """Drop these dispatched tasks; interrupt the one running, if it is among them
    (with ``force``: kill the worker's process if it runs one of them)."""

    worker: WorkerId
    tasks: tuple[TaskId, ...]
    force: bool = False


@dataclass(frozen=True, slots=True)
class ForgetGraph:
    """The graph is gone: what was kept for it (its function table) may go."""

    graph: GraphId


@dataclass(frozen=True, slots=True)
class ReportResult:
    graph: GraphId
    node: int
    #: the pickled value, or None when it is large and stays on ``holder``
    inline: bytes | None
    holder: WorkerId | None
    object_id: TaskId


@dataclass(frozen=True, slots=True)
class ReportError:
    """The graph failed.  Either ``error`` (a pickled exception) or ``kind`` + ``message``."""

    graph: GraphId
    node: int
    error: bytes | None = None
    #: name of a daskray error type (``"WorkerCrashedError"``) when the runtime failed
    kind: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class ReportStarted:
    graph: GraphId
    node: int
    worker: WorkerId


@dataclass(frozen=True, slots=True)
class ReportFinished:
    """A task of a ``notify`` graph finished (for dask's posttask callbacks)."""

    graph: GraphId
    node: int
    worker: WorkerId
    inline: bytes | None


@dataclass(frozen=True, slots=True)
class NotifyRef:
    """Tell client ``to`` that a remote object is ready (``inline`` or on ``holder``)
    or failed (``error`` or ``kind`` + ``message``)."""

    to: Any
    ref: RefKey
    inline: bytes | None
    holder: WorkerId | None
    object_id: TaskId
    error: bytes | None
    kind: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class StartActor:
    """Start a process for ``actor`` (again, after a crash, when ``restart``)."""

    actor: str
    resources: dict | None
    restart: bool
    max_concurrency: int = 1
    #: its calls run on threads (max_concurrency > 1, or async methods)
    threaded: bool = False


@dataclass(frozen=True, slots=True)
class ActorMoved:
    """Tell client ``to``, which sent calls straight to ``actor``'s process, that
    the process is gone: its next calls go through the head."""

    to: Any
    actor: str


@dataclass(frozen=True, slots=True)
class StopActor:
    """End the process of ``actor`` (killed, or its last handle is gone)."""

    actor: str
    worker: WorkerId | None


@dataclass(frozen=True, slots=True)
class ReplyActor:
    """The pickled handle of a named actor (None: no actor has that name)."""

    to: Any
    request: int
    handle: bytes | None


@dataclass(frozen=True, slots=True)
class ReplyActorNames:
    """The names of live named actors: names, or [namespace, name] pairs."""

    to: Any
    request: int
    names: list


@dataclass(frozen=True, slots=True)
class StartExtraWorker:
    """Start a worker process named ``worker`` with ``resources`` (besides its one
    CPU), to stand in for worker ``like`` (and its likes) while their tasks wait
    in ``get()``.  It joins as any worker does (``WorkerJoined``)."""

    worker: WorkerId
    resources: dict
    like: WorkerId


@dataclass(frozen=True, slots=True)
class RetireWorker:
    """Stop extra worker ``worker``: it is idle and no longer needed.  The
    scheduler has forgotten it already; its exit needs no replacement."""

    worker: WorkerId


@dataclass(frozen=True, slots=True)
class FreeShared:
    """Remove a shared-memory file: the object in it was freed."""

    path: str


Instruction = (
    Dispatch | FreeObjects | CancelTasks | ForgetGraph | ReportResult | ReportError
    | ReportStarted | ReportFinished | NotifyRef | StartActor | StopActor
    | ReplyActor | ReplyActorNames | FreeShared | StartExtraWorker | RetireWorker | ActorMoved
)
