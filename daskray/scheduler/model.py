"""The records the scheduler state is made of: tasks, graphs, actors, workers,
and the task states with the transitions allowed between them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .events import GraphId, TaskId, WorkerId

WAITING, READY, PROCESSING, MEMORY, ERRED = "waiting", "ready", "processing", "memory", "erred"

#: allowed (from, to) transitions; anything else is a bug and raises
TRANSITIONS = {
    (WAITING, READY), (READY, PROCESSING), (PROCESSING, MEMORY), (PROCESSING, READY),
    (PROCESSING, ERRED), (WAITING, ERRED), (READY, ERRED),
    (MEMORY, ERRED),  # its only copy was lost
    (MEMORY, READY), (ERRED, READY),  # an actor's constructor, re-run after a crash
    # lineage: a dask intermediate whose only copy was lost runs again, and what
    # was about to read it waits for it again
    (MEMORY, WAITING), (READY, WAITING), (PROCESSING, WAITING),
}

#: a failure: (pickled exception or None, daskray error type name or None, message)
Failure = tuple


class InvalidTransition(RuntimeError):
    """The scheduler tried a transition its table does not allow: a bug in daskray."""


@dataclass(slots=True, eq=False)
class TaskState:
    id: TaskId
    graph: "GraphState"
    node: int
    name: str
    group: str
    body: bytes | None
    priority: tuple
    deps: tuple[TaskId, ...]
    state: str = WAITING
    dependents: list[TaskId] = field(default_factory=list)
    waiting_on: int = 0
    #: dependents that have not finished yet; while > 0 the object is kept
    pending_dependents: int = 0
    #: references from outside the graph machinery (client, ObjectRefs, pins)
    refs: int = 0
    worker: WorkerId | None = None
    est: float = 0.0
    holders: set[WorkerId] = field(default_factory=set)
    inline: bytes | None = None
    nbytes: int = 0
    #: the name workers keep the object under (the task id, or a put's own key)
    store_key: Any = None
    failure: Failure | None = None
    retries_left: int = 0
    cancel_requested: bool = False
    #: the owner holds an ObjectRef to it: tell the owner when it is done
    report_owner: bool = False
    #: clients to tell when the object is ready or failed (besides the owner)
    subscribers: set = field(default_factory=set)
    #: its dependencies' counts were released (it finished, failed or was dropped)
    deps_released: bool = False
    resources: dict | None = None
    #: objects referenced by ObjectRefs inside this one's value: kept while it is
    contained: list[TaskId] = field(default_factory=list)
    #: the actor this task is a call of (or the constructor of)
    actor: str | None = None
    #: the shared-memory file holding the value (``inline`` is its descriptor)
    shared: str | None = None
    #: running while an input it reads was lost and is being recomputed: if it
    #: fails (reading that input), it runs again instead of failing its graph
    input_lost: bool = False
    history: list[tuple[str, str]] = field(default_factory=list)
    #: an actor's call its caller sent straight to the actor's process: the
    #: process keeps it (and its result) under ``store_key``, not under the task id
    direct: bool = False
    #: a direct call whose outcome came before its registration: the caller has
    #: been told it (by the actor's process, or when it was applied), not again
    outcome_early: bool = False


@dataclass(slots=True, eq=False)
class GraphState:
    id: GraphId
    seq: int
    base: TaskId
    size: int
    fail_fast: bool
    notify: bool
    retry_exceptions: bool = False
    #: nodes of this graph still in ``tasks``
    live: int = 0
    #: nodes not yet finished or failed
    unfinished: int = 0
    #: the task whose code submitted this graph, if a task did
    parent: TaskId | None = None
    #: how deep in nested calls its tasks are (1: the driver's own calls)
    depth: int = 1
    #: objects of other graphs kept alive until this graph's tasks are done
    #: (ObjectRefs inside its arguments); pinned again if lineage runs a task again
    pinned: list[TaskId] = field(default_factory=list)
    pins_held: bool = False


@dataclass(slots=True, eq=False)
class ActorState:
    """An actor: its process (a worker of its own) and its calls, in order.

    ``calls`` holds the calls not yet dispatched, constructor first; the first
    one not ready (its ObjectRef arguments are pending) holds back the rest.
    """

    id: str
    creation: TaskId
    resources: dict | None
    restarts_left: int
    task_retries: int
    #: survives its handles (named or ``lifetime="detached"``)
    detached: bool
    name: str | None = None
    #: the namespace its name is in
    namespace: str = ""
    #: what it ends with (Ray's fate sharing): ("client", id), ("task", id) or
    #: ("actor", id); None for a ``lifetime="detached"`` one
    owner: tuple | None = None
    worker: WorkerId | None = None
    state: str = "pending"  # pending -> alive -> (restarting -> alive)* -> dead
    calls: deque = field(default_factory=deque)
    in_flight: list[TaskId] = field(default_factory=list)
    death: str = ""
    max_concurrency: int = 1
    threaded: bool = False
    #: clients sending calls straight to its process: told when the process goes
    direct_callers: set = field(default_factory=set)


@dataclass(slots=True, eq=False)
class WorkerState:
    id: WorkerId
    slots: int
    resources: dict = field(default_factory=dict)
    processing: set[TaskId] = field(default_factory=set)
    queue: list[tuple[tuple, TaskId]] = field(default_factory=list)
    holds: set[TaskId] = field(default_factory=set)
    queued_estimate: float = 0.0
    actor: str | None = None
    #: tasks of this worker waiting in get(), outermost first: the worker runs them
    #: nested on one stack, so while any waits it may run only what the innermost
    #: waits for (see SchedulerState._next_nested)
    waiting: list[TaskId] = field(default_factory=list)
    #: its stack has room for one more task on top of the innermost waiting one
    nest: bool = True
    #: an extra worker, started to stand in for workers whose tasks wait
    extra: bool = False
    #: (an extra worker) the waiting worker whose CPU it uses now; None: it takes
    #: no new work
    standin_for: WorkerId | None = None
    #: (a waiting worker) the extra worker standing in for it, joined or starting
    stand_in: WorkerId | None = None
    #: (a waiting worker) the first Tick since when it has had nothing to run
    lending_since: float | None = None
    #: when it last ran out of work (the time of the latest Tick)
    idle_since: float = 0.0


def fits(needed: dict | None, ws: WorkerState) -> bool:
    return covers(ws.resources, needed)


def covers(resources: dict, needed: dict | None) -> bool:
    if not needed:
        return True
    return all(resources.get(name, 0) >= amount for name, amount in needed.items())
