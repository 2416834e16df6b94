"""Events: everything that can happen to the scheduler, as plain data.

The head loop decodes messages and process notifications into these and feeds
them to :meth:`SchedulerState.handle`.  They carry no sockets, no clocks, no
unpickled user data: task bodies and results are opaque ``bytes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

WorkerId = str
ClientId = str
GraphId = tuple  # (client id, the client's own graph number)
RefKey = tuple  # (client id, graph number, node): what an ObjectRef names
TaskId = int


def quick_init(cls: type) -> type:
    """Give a frozen, slotted dataclass a faster ``__init__`` (a class decorator,
    above ``@dataclass``).

    A frozen dataclass's own ``__init__`` sets each field through
    ``object.__setattr__``, some 0.25 us a field: for the records made once per
    task (a dispatch, a finish report, an object freed) that was a tenth of the
    head's time on 20,000 tiny tasks.  This one writes the slots through their
    descriptors, 5 times faster.  Instances stay frozen (assigning a field still
    raises), compare and hash as before.  Fields with a default factory or
    keyword-only fields are not handled (a TypeError says so)."""
    namespace: dict[str, Any] = {}
    params, lines = [], []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING or f.kw_only:
            raise TypeError(f"quick_init: {cls.__name__}.{f.name} has a default factory "
                            "or is keyword-only")
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        namespace[f"_set_{f.name}"] = cls.__dict__[f.name].__set__  # the slot's own
        lines.append(f"    _set_{f.name}(self, {f.name})")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    return cls


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker: WorkerId
    slots: int = 1
    #: custom resources the worker offers, e.g. {"GPU": 1}
    resources: dict | None = None
    #: the actor this worker process was started for (it runs nothing else)
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class WorkerBlocked:
    """Task ``task`` on ``worker`` started (``blocked``) or stopped waiting in
    ``get``/``wait``.  While it waits its worker runs no other work but the
    tasks ``task`` waits for (on the same stack), so its CPU is lent out."""

    worker: WorkerId
    blocked: bool
    task: TaskId | None = None
    #: the ObjectRefs (ref keys) the task waits for
    awaits: tuple = ()
    #: whether the worker's stack has room for a task run on top of this one
    nest: bool = True


@dataclass(frozen=True, slots=True)
class WorkerLost:
    worker: WorkerId
    #: why, in words for the user: "exited with signal SIGKILL", "stopped answering"
    reason: str
    #: it ended itself for ``daskray.cancel(force=True)`` of a task it ran: the
    #: other tasks it held were not at fault, and run again without spending a retry
    force_cancelled: bool = False


@dataclass(frozen=True, slots=True)
class GraphSubmitted:
    """A whole graph, numbered ``0..n-1`` in dependency order (see ``GraphSpec``)."""

    graph: GraphId
    #: one name per node, for messages ("task 'inc-3' ...")
    names: list[str]
    #: per node: the numbers of the nodes it reads
    deps: list[tuple[int, ...]]
    #: per node: dask.order priority (lower runs first)
    priorities: list[int]
    #: per node: the pickled task body, or None for a data node
    bodies: list[bytes | None]
    #: per data node: its pickled value
    data: dict[int, bytes]
    #: the nodes whose values go back to the client
    wanted: list[int]
    #: what follows is given by name: a reader of the call sees what each value is
    _: KW_ONLY
    #: per node: a duration group (tasks of one group take similar time)
    groups: list[str] = field(default_factory=list)
    #: stop the whole graph at the first error (dask semantics)
    fail_fast: bool = True
    #: tell the client when each task starts and finishes (dask callbacks)
    notify: bool = False
    #: nodes that stand for existing objects (ObjectRefs): {node: ref key}
    external: dict | None = None
    #: ObjectRefs carried inside task arguments: kept alive until the tasks are done
    pinned: list | None = None
    #: times a task is re-run after its worker died (and, with
    #: ``retry_exceptions``, after it raised)
    max_retries: int = 0
    retry_exceptions: bool = False
    #: resources every task of the graph needs, e.g. {"CPU": 1, "GPU": 1}
    resources: dict | None = None
    #: the graph is a call of this actor's method (runs on its process, in order)
    actor: str | None = None
    #: the graph creates an actor: its options (see ActorOptions)
    create_actor: dict | None = None
    #: data nodes stored on workers beforehand: {node: (worker, store key, nbytes)}
    data_holders: dict | None = None
    #: the task whose code submitted the graph (see SchedulerState, nested calls)
    parent: TaskId | None = None
    #: data nodes in shared memory: {node: file}; ``data`` holds their descriptors
    shared: dict | None = None
    #: the caller sent the call straight to this process of its actor: it runs
    #: there already, nothing is dispatched (see ActorLifecycle._bind_direct)
    direct: WorkerId | None = None


@dataclass(frozen=True, slots=True)
class ObjectPut:
    """``daskray.put``: an object that exists before anything runs, as graph ``graph``."""

    graph: GraphId
    name: str
    #: the pickled value when small; else it lives on ``holder``
    inline: bytes | None
    holder: WorkerId | None
    nbytes: int
    #: the name the holder keeps it under
    store_key: str | None = None
    #: the shared-memory file ``inline`` describes, to remove when it is freed
    shared: str | None = None


@dataclass(frozen=True, slots=True)
class RefsChanged:
    """Process ``holder`` (its identity) started or stopped holding ObjectRefs to
    these objects; when it dies, what it held is dropped."""

    added: list
    dropped: list
    holder: bytes | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``client`` wants to know when these objects are ready (or failed)."""

    client: ClientId
    refs: list


@dataclass(frozen=True, slots=True)
class CancelRef:
    """``daskray.cancel``: drop the task if queued, interrupt it if running (kill
    its worker process if ``force``); if ``recursive``, the same for the tasks it
    started, and theirs."""

    ref: RefKey
    force: bool = False
    recursive: bool = True


@dataclass(frozen=True, slots=True)
class KillActor:
    """``daskray.kill``: end the actor now, without restarting it -- or with
    ``restart``, as if its process had crashed (it restarts while
    ``max_restarts`` lasts)."""

    actor: str
    restart: bool = False


@dataclass(frozen=True, slots=True)
class ActorStartFailed:
    """The process started for ``actor`` died before it joined."""

    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class LookupActor:
    """``daskray.get_actor(name)``: ``client`` wants the handle of a named actor."""

    client: ClientId
    name: str
    request: int
    #: None: the namespace of the caller's driver
    namespace: str | None = None
    #: the task whose code asks, if a task does
    parent: TaskId | None = None


@dataclass(frozen=True, slots=True)
class ListNamedActors:
    """``daskray.util.list_named_actors()``: ``client`` wants the names of the live
    named actors in its driver's namespace (or in all, as (namespace, name))."""

    client: ClientId
    request: int
    all_namespaces: bool = False
    parent: TaskId | None = None


@dataclass(frozen=True, slots=True)
class ClientNamespace:
    """A driver says its namespace: the names it and its tasks use by default."""

    client: ClientId
    namespace: str


@dataclass(frozen=True, slots=True)
class TaskStarted:
    task: TaskId
    worker: WorkerId


@quick_init
@dataclass(frozen=True, slots=True)
class TaskFinished:
    task: TaskId
    worker: WorkerId
    nbytes: int
    #: the pickled result when it is small enough to travel inside messages
    inline: bytes | None
    duration: float
    #: ObjectRefs pickled inside the result
    contained: tuple = ()


@dataclass(frozen=True, slots=True)
class TaskErred:
    task: TaskId
    worker: WorkerId
    #: the pickled exception (see serialization.dumps_exception)
    error: bytes


@dataclass(frozen=True, slots=True)
class TaskReleased:
    """A worker dropped a dispatched task without running it (it was cancelled)."""

    task: TaskId
    worker: WorkerId


@dataclass(frozen=True, slots=True)
class GraphReleased:
    """The client has every result it wanted (or gave up): forget the graph."""

    graph: GraphId


@dataclass(frozen=True, slots=True)
class GraphCancelled:
    graph: GraphId


@dataclass(frozen=True, slots=True)
class ClientLost:
    client: Any


@dataclass(frozen=True, slots=True)
class WatchActor:
    """``client`` is learning where ``actor``'s process takes calls straight: tell
    it when that process goes (``ActorMoved``)."""

    client: Any
    actor: str


@dataclass(frozen=True, slots=True)
class DirectCallDone:
    """An actor's process ran (or dropped) a call its caller sent it straight;
    the caller has the outcome already.  It may come before the caller's
    registration of the call (another socket): then it waits for it."""

    ref: RefKey
    worker: WorkerId
    #: what the process keeps the result under (see actors.direct_key)
    object_id: str
    nbytes: int = 0
    inline: bytes | None = None
    duration: float = 0.0
    contained: tuple = ()
    #: the pickled exception when the call raised
    error: bytes | None = None
    #: dropped unrun (cancelled while queued)
    released: bool = False
    #: the caller got the outcome from the process (not when the result holds
    #: ObjectRefs: the head, which learns of them here, tells the caller then)
    replied: bool = True


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes: ``now`` is the head's monotonic clock, in seconds.  Extra
    workers idle for long enough are retired on a tick."""

    now: float


Event = (
    WorkerJoined | WorkerBlocked | WorkerLost | GraphSubmitted | ObjectPut | RefsChanged | Subscribe
    | CancelRef | KillActor | ActorStartFailed | LookupActor | ListNamedActors | ClientNamespace
    | TaskStarted | TaskFinished | TaskErred | TaskReleased | GraphReleased
    | GraphCancelled | ClientLost | DirectCallDone | WatchActor | Tick
)
