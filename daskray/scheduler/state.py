"""The scheduler: an I/O-free state machine.

Events in, instructions out; :meth:`SchedulerState.handle` is the only way state
changes.  No sockets, no pickle, no threads, no clock: time arrives inside events
(task durations) and payloads are opaque bytes.

State
-----
::

    tasks        :: {task id: TaskState}        every live node of every graph
    graphs       :: {graph id: GraphState}
    refs         :: {ref key: task id}          objects of remote graphs, by ObjectRef key
    workers      :: {worker id: WorkerState}
    ready        :: heap[(priority, task id)]   ready tasks free to run anywhere
    durations    :: DurationEstimates           per task group

    TaskState.state in  waiting ─> ready ─> processing ─> memory ─> (forgotten)
                          │          ^          │  │
                          │          └──────────┘  └─> erred ─> (forgotten)
                          └─────────────────────────────┘   (an input failed)

    and back to waiting (lineage, dask graphs): a memory task whose only copy
    died with its worker runs again, with any of its inputs freed meanwhile;
    its readers that were ready wait again, those already running run again
    if they fail.

    WorkerState.processing :: {task id}     dispatched, not yet reported back
    WorkerState.queue      :: heap          ready tasks placed on this worker
                                            (their large inputs live there, or
                                            only it has the resources they need)
    WorkerState.holds      :: {task id}     results kept by the worker
    WorkerState.waiting    :: [task id]     its tasks waiting in get(), outermost first

Two kinds of graph share the machinery:

* **dask graphs** (``fail_fast``): the first error fails the whole graph; the
  wanted results are held until the client releases the graph.
* **remote graphs** (one ``f.remote()`` call, or a ``put``): every node is an
  object behind an ``ObjectRef``.  An error fails that task and, with the same
  error, everything depending on it.  An object lives while ``refs > 0`` (one per
  process holding an ObjectRef to it, plus pins by pending tasks that carry it
  inside their arguments) or while a dependent has not finished.

A task id is also the id of the object holding its result.  Data nodes are born
in ``memory`` with their value inline.

Tasks waiting in ``get()``
--------------------------
A task that waits in ``get()``/``wait()`` stays on its worker's stack, and its
worker reports what it waits for (``WorkerBlocked``).  Two things keep the
cluster going, whoever submitted the work it waits for and in whatever order:

* **nesting**: the worker runs, on top of the waiting task, a ready task that
  task waits for (directly, or as an input of one it waits for).  That cannot
  deadlock: the waiting task could not go on before it finished anyway.  Any
  other task could wait for one below it on the stack, which cannot resume
  before it returns.  A recursion (``fib``) thus runs depth first on one stack.
* **extra workers**: when a waiting worker has had nothing to run for a while
  (``policy.EXTRA_START_DELAY``, time comes with ``Tick``) and ready work waits
  for a CPU, an *extra* worker process stands in for it, with its resources
  (``StartExtraWorker``; an idle one is reused at once).  Extra workers are
  capped (``max_extra_workers``), are not counted as the cluster's resources,
  take work only while they stand in for a waiting worker, and are retired
  (``RetireWorker``) once idle, at once when no task waits any more, else after
  ``policy.EXTRA_IDLE_SECONDS`` -- unless they hold the only copy of an object
  still needed.

Invariants (checked after every event when ``validate=True``):

* a ``processing`` task is in exactly its worker's ``processing`` set;
* ``waiting_on`` counts the task's inputs not in memory;
* a ``memory`` object still needed has its value inline or at least one holder;
* a worker holds only objects whose task lists it as a holder.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import policy
from .events import (
    ActorStartFailed, CancelRef, ClientLost, Event, GraphCancelled, KillActor, LookupActor, GraphId, GraphReleased, GraphSubmitted,
    ObjectPut, RefKey, RefsChanged, Subscribe, TaskErred, WorkerBlocked, TaskFinished, TaskId,
    TaskReleased, TaskStarted, Tick, WorkerId, WorkerJoined, WorkerLost,
)
from .instructions import (
    CancelTasks, Dispatch, ForgetGraph, FreeObjects, FreeShared, Instruction, NotifyRef, ReplyActor,
    ReportError, ReportFinished, ReportResult, ReportStarted, RetireWorker, StartActor,
    StartExtraWorker, StopActor,
)

WAITING, READY, PROCESSING, MEMORY, ERRED = "waiting", "ready", "processing", "memory", "erred"

#: an event's consequences (fills, stand-ins, retirements) settle in at most this
#: many rounds; what is left waits for the next event
SETTLE_ROUNDS = 4

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
    worker: WorkerId | None = None
    state: str = "pending"  # pending -> alive -> (restarting -> alive)* -> dead
    calls: deque = field(default_factory=deque)
    in_flight: list[TaskId] = field(default_factory=list)
    death: str = ""
    max_concurrency: int = 1
    threaded: bool = False


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


def _fits(needed: dict | None, ws: WorkerState) -> bool:
    return _covers(ws.resources, needed)


def _covers(resources: dict, needed: dict | None) -> bool:
    if not needed:
        return True
    return all(resources.get(name, 0) >= amount for name, amount in needed.items())


class SchedulerState:
    """See the module docstring."""

    def __init__(self, validate: bool = False, max_extra_workers: int = 0) -> None:
        self.tasks: dict[TaskId, TaskState] = {}
        self.graphs: dict[GraphId, GraphState] = {}
        self.refs: dict[RefKey, TaskId] = {}
        self.actors: dict[str, ActorState] = {}
        #: which objects each process holds ObjectRefs to: {identity: {task id}}
        self.ref_holders: dict[bytes, set[TaskId]] = {}
        #: named actors: {name: (actor id, pickled handle)}
        self.actor_names: dict[str, tuple[str, bytes]] = {}
        self.workers: dict[WorkerId, WorkerState] = {}
        self.ready: list[tuple[tuple, TaskId]] = []
        #: resources of every (non-actor) worker that has joined: a dead worker is
        #: replaced by one alike, so a task that fits one of these waits for it
        self.worker_shapes: list[dict] = []
        #: ready tasks whose resources no live worker has (yet): placed on join
        self.awaiting_resources: list[TaskId] = []
        self.durations = policy.DurationEstimates()
        self.validate = validate
        #: extra workers (joined or starting) at most at once
        self.max_extra_workers = max_extra_workers
        #: workers with tasks waiting in get(); what each waiting task waits for
        self.blocked: set[WorkerId] = set()
        self.awaits: dict[TaskId, list[TaskId]] = {}
        #: extra workers that joined; those starting, each with the worker it is for
        self.extras: set[WorkerId] = set()
        self.extras_starting: dict[WorkerId, WorkerId] = {}
        self._next_extra = 0
        #: extra workers in a row that died before they joined: past
        #: ``policy.MAX_EXTRA_START_FAILURES`` no more are started
        self.extra_failures = 0
        #: the time of the latest Tick
        self.now = 0.0
        self._next_task_id = 0
        self._next_graph_seq = 0
        self._out: list[Instruction] = []
        #: the global ready heap got tasks during this event: fill workers at its end
        self._ready_grew = False
        #: workers that got room or work during this event: filled at its end
        self._room: set[WorkerId] = set()
        #: a task became ready during this event (see _review_waiting)
        self._readied = False
        self._handlers = {
            WorkerJoined: self._worker_joined,
            WorkerLost: self._worker_lost,
            GraphSubmitted: self._graph_submitted,
            ObjectPut: self._object_put,
            RefsChanged: self._refs_changed,
            Subscribe: self._subscribe,
            CancelRef: self._cancel_ref,
            KillActor: self._kill_actor,
            ActorStartFailed: self._actor_start_failed,
            LookupActor: self._lookup_actor,
            WorkerBlocked: self._worker_blocked,
            TaskStarted: self._task_started,
            TaskFinished: self._task_finished,
            TaskErred: self._task_erred,
            TaskReleased: self._task_released,
            GraphReleased: self._graph_released,
            GraphCancelled: self._graph_cancelled,
            ClientLost: self._client_lost,
            Tick: self._tick,
        }

    def sizes(self) -> dict[str, int]:
        """How much the state holds, by kind.  Once every ObjectRef and graph is
        released, all but ``workers`` (and named or detached actors) are 0: tests
        check that a workload, faults included, leaves nothing behind."""
        task_workers = [w for w in self.workers.values() if w.actor is None]
        return {
            "workers": len(task_workers),
            "tasks": len(self.tasks),
            "graphs": len(self.graphs),
            "refs": len(self.refs),
            "ref holders": sum(len(held) for held in self.ref_holders.values()),
            "actors": len(self.actors),
            "ready": len(self.ready),
            "awaiting resources": len(self.awaiting_resources),
            "queued": sum(len(w.queue) for w in self.workers.values()),
            "processing": sum(len(w.processing) for w in self.workers.values()),
            "held objects": sum(len(w.holds) for w in self.workers.values()),
            "blocked workers": len(self.blocked),
            "awaited": len(self.awaits),
        }

    # ------------------------------------------------------------------ the one entry

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what must be done because of it."""
        self._out = out = []
        self._readied = False
        self._handlers[type(event)](event)
        for _ in range(SETTLE_ROUNDS):
            if self._ready_grew:
                self._ready_grew = False
                self._fill_round_robin()
            if self._room:
                room, self._room = self._room, set()
                for wid in sorted(room):
                    ws = self.workers.get(wid)
                    if ws is not None:
                        self._fill(ws)
            if self.blocked or self.extras or self.extras_starting:
                self._review_waiting()
            if not (self._ready_grew or self._room):
                break
        if self.validate:
            self.validate_state()
        return out

    # ------------------------------------------------------------------ workers

    def _worker_joined(self, ev: WorkerJoined) -> None:
        if ev.worker in self.workers:
            return
        resources = {"CPU": ev.slots, **(ev.resources or {})}
        ws = self.workers[ev.worker] = WorkerState(ev.worker, ev.slots, resources)
        like = self.extras_starting.pop(ev.worker, None)
        if like is not None:
            self._extra_joined(ws, like)
            return
        if ev.actor is None:
            if resources not in self.worker_shapes:
                self.worker_shapes.append(resources)
            self._room.add(ev.worker)
            waiting, self.awaiting_resources = self.awaiting_resources, []
            for tid in waiting:
                ts = self.tasks.get(tid)
                if ts is not None and ts.state == READY:
                    self._place(ts)
            return
        ws.actor = ev.actor
        actor = self.actors.get(ev.actor)
        if actor is None or actor.state == "dead":
            self._out.append(StopActor(ev.actor, ev.worker))
            return
        actor.worker = ev.worker
        actor.state = "alive"
        self._pump_actor(actor)

    def _extra_joined(self, ws: WorkerState, like: WorkerId) -> None:
        """Extra worker ``ws``, started for worker ``like``, joined: it stands in
        for it if it still waits, else it is a spare (see _review_waiting)."""
        ws.extra = True
        ws.idle_since = self.now
        self.extras.add(ws.id)
        self.extra_failures = 0
        waiting = self.workers.get(like)
        if waiting is not None and waiting.stand_in == ws.id:
            ws.standin_for = waiting.id
            self._room.add(ws.id)

    def _worker_blocked(self, ev: WorkerBlocked) -> None:
        """A task on the worker started or stopped waiting in get(): while one waits,
        the worker runs only what it waits for (_fill_nested), and an extra worker
        may use its CPU (_review_waiting)."""
        ws = self.workers.get(ev.worker)
        if ws is None or ws.actor is not None:
            return
        if ev.blocked:
            ws.waiting.append(ev.task)
            ws.nest = ev.nest
            if ev.task is not None:
                self.awaits[ev.task] = self._await_ids(ev.awaits)
            self.blocked.add(ws.id)
        else:
            if ev.task in ws.waiting:  # the innermost: those below wait on it
                del ws.waiting[len(ws.waiting) - 1 - ws.waiting[::-1].index(ev.task)]
                self.awaits.pop(ev.task, None)
            ws.nest = True  # the one below had room for it
            if not ws.waiting:
                self.blocked.discard(ws.id)
                ws.lending_since = None
                self._release_stand_in(ws)
        self._room.add(ws.id)

    def _await_ids(self, keys: Iterable) -> list[TaskId]:
        """The tasks behind the ObjectRefs a waiting task waits for (those known)."""
        ids = []
        for key in keys:
            try:
                ts = self._lookup(tuple(key))
            except TypeError:  # not a ref key: nothing to wait for
                continue
            if ts is not None:
                ids.append(ts.id)
        return ids

    def _tick(self, ev: Tick) -> None:
        """Time passes: waiting workers with nothing to run start counting how long."""
        self.now = ev.now
        for wid in self.blocked:
            ws = self.workers[wid]
            if ws.lending_since is None and self._lending(ws):
                ws.lending_since = ev.now

    def _worker_lost(self, ev: WorkerLost) -> None:
        like = self.extras_starting.pop(ev.worker, None)
        if like is not None:  # an extra worker that died before it joined
            self.extra_failures += 1
            waiting = self.workers.get(like)
            if waiting is not None and waiting.stand_in == ev.worker:
                waiting.stand_in = None
            return
        ws = self.workers.pop(ev.worker, None)
        if ws is None:
            return
        self._forget_waiting(ws)
        self._drop_holder(ev.worker.encode())
        crashed: list[tuple[TaskState, str]] = []
        if ws.actor is not None:
            crashed = self._actor_lost(ws, ev.reason)
        for tid in sorted(ws.processing) if ws.actor is None else ():
            ts = self.tasks.get(tid)
            if ts is None or ts.state != PROCESSING or ts.worker != ws.id:
                continue
            ts.worker = None
            if ts.retries_left > 0 and not ts.cancel_requested:
                ts.retries_left -= 1
                self._transition(ts, READY)
                self._place(ts)
            else:
                crashed.append((ts, (
                    f"worker {ws.id} died ({ev.reason}) while running task {ts.name}. "
                    "The task may have used too much memory or crashed the interpreter; "
                    "run it with daskray.init(local_mode=True) to debug it."
                )))
        lost: list[tuple[TaskState, str]] = []
        for tid in ws.holds:
            ts = self.tasks.get(tid)
            if ts is None or ts.state != MEMORY:
                continue
            ts.holders.discard(ws.id)
            if not ts.holders and ts.inline is None and (ts.pending_dependents or ts.refs):
                lost.append((ts, (
                    f"worker {ws.id} died ({ev.reason}) holding the result of task "
                    f"{ts.name}, which is still needed."
                )))
        for _, tid in ws.queue:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == READY:
                self._place(ts)
        for ts, message in crashed:
            if ts.id in self.tasks and ts.state == PROCESSING:
                self._fail(ts, (None, "WorkerCrashedError", message))
        for ts, message in lost:
            if ts.id not in self.tasks or ts.state != MEMORY:
                continue  # already being recomputed, for another lost object
            reason = self._recompute(ts)
            if reason is not None:
                self._object_lost(ts, f"{message} It cannot be computed again: {reason}.")
        self._ready_grew = True

    def _recompute(self, lost: TaskState) -> str | None:
        """Lineage: run a lost object's task again, with whatever of its own inputs
        is gone too; what reads it waits for it again.  None when done so, else why
        it cannot be (a ``put`` object, an actor call, retries used up, ...).

        A dask graph's tasks run again while the graph is held.  A remote call's
        task runs again as Ray's do, each time using one of its ``max_retries``;
        ObjectRefs inside its arguments are pinned again while it runs."""
        redo: dict[TaskId, TaskState] = {}
        stack = [lost]
        while stack:
            ts = stack.pop()
            if ts.id in redo:
                continue
            reason = self._cannot_run_again(ts)
            if reason is not None:
                return reason
            redo[ts.id] = ts
            for d in ts.deps:
                dep = self.tasks.get(d)
                if dep is None or dep.state == ERRED:
                    return f"its input {dep.name if dep else d} is gone or failed"
                if dep.state == MEMORY and dep.inline is None and not dep.holders:
                    stack.append(dep)  # freed or lost as well
        repin = {ts.graph.id: ts.graph for ts in redo.values()
                 if ts.graph.pinned and not ts.graph.pins_held}
        for gs in repin.values():
            for pid in gs.pinned:
                pin = self.tasks.get(pid)
                if pin is None or pin.state == ERRED:
                    return "an object its arguments refer to is gone"
        for gs in repin.values():
            for pid in gs.pinned:
                self.tasks[pid].refs += 1
            gs.pins_held = True
        for ts in redo.values():
            if not ts.graph.fail_fast:
                ts.retries_left -= 1
            self._transition(ts, WAITING)
            ts.holders = set()
            ts.inline = None
            self._drop_shared(ts)
            contained, ts.contained = ts.contained, []  # counted again when it finishes
            self._unref(contained)
            ts.graph.unfinished += 1
            if ts.deps_released:
                ts.deps_released = False
                for d in ts.deps:
                    self.tasks[d].pending_dependents += 1
        readers: dict[TaskId, TaskState] = {}
        for ts in redo.values():
            for d in ts.dependents:
                reader = self.tasks.get(d)
                if reader is None or reader.id in redo:
                    continue
                if reader.state == READY:
                    self._transition(reader, WAITING)
                if reader.state == WAITING:
                    readers[reader.id] = reader
                elif reader.state == PROCESSING and reader.actor is None:
                    # an actor call is dispatched in order and left its actor's
                    # queue: it fails as before rather than run out of order
                    reader.input_lost = True
        for ts in (*redo.values(), *readers.values()):  # counted once, from the states
            ts.waiting_on = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
        for ts in sorted(redo.values(), key=lambda t: t.id):
            if ts.waiting_on == 0:
                self._make_ready(ts)
        return None

    def _cannot_run_again(self, ts: TaskState) -> str | None:
        """Why lineage cannot run ``ts`` again, or None if it can."""
        if ts.body is None:
            return (f"{ts.name} is data of its dask graph" if ts.graph.fail_fast
                    else f"{ts.name} was made by put(), not by a task")
        if ts.actor is not None:
            return f"{ts.name} is an actor call, whose actor's state has moved on"
        if ts.graph.fail_fast:
            if ts.graph.id not in self.graphs:
                return f"the dask graph of {ts.name} was released"
        elif ts.retries_left <= 0:
            return f"task {ts.name} has used up its max_retries"
        return None

    def _actor_lost(self, ws: WorkerState, reason: str) -> list[tuple[TaskState, str]]:
        """The process of an actor died: restart it, or fail what it was to run."""
        actor = self.actors.get(ws.actor)
        if actor is None:
            return []
        in_flight = [self.tasks[t] for t in actor.in_flight
                     if t in self.tasks and self.tasks[t].state == PROCESSING]
        actor.in_flight = []
        actor.worker = None
        if actor.state == "dead":
            self._fail_calls(in_flight, f"actor {actor.id} is dead ({actor.death}); "
                                        "the call did not finish")
            return []
        message = (f"the process of actor {actor.id} ({ws.id}) died ({reason}) while the "
                   "call was running or queued")
        failed: list[TaskState] = []
        if actor.restarts_left == 0:
            self._actor_dead(actor, f"its process died ({reason}) and max_restarts is used up")
            self._fail_calls(in_flight, message)
            self._fail_actor_calls(actor)
            creation = self.tasks.get(actor.creation)
            if creation is not None:
                self._release_deps(creation)
            return []
        actor.restarts_left -= 1
        actor.state = "restarting"
        retried = []
        for ts in in_flight:
            ts.worker = None
            if ts.id == actor.creation:  # died in the constructor: it runs again first
                self._transition(ts, READY)
            elif ts.retries_left > 0 and not ts.cancel_requested:
                ts.retries_left -= 1
                self._transition(ts, READY)
                retried.append(ts.id)
            else:
                failed.append(ts)
        creation = self.tasks.get(actor.creation)
        if creation is not None and creation.state in (MEMORY, ERRED):
            self._transition(creation, READY)
            creation.graph.unfinished += 1
            creation.failure = None
        actor.calls.extendleft(reversed(([actor.creation] if creation else []) + retried))
        self._out.append(StartActor(actor.id, actor.resources, True, actor.max_concurrency,
                                        actor.threaded))
        self._fail_calls(failed, message)
        return []

    def _actor_start_failed(self, ev: ActorStartFailed) -> None:
        actor = self.actors.get(ev.actor)
        if actor is None or actor.state == "dead":
            return
        if actor.restarts_left > 0:
            actor.restarts_left -= 1
            self._out.append(StartActor(actor.id, actor.resources, True, actor.max_concurrency,
                                        actor.threaded))
            return
        self._actor_dead(actor, f"its process died before it started ({ev.reason})")
        creation = self.tasks.get(actor.creation)
        if creation is not None and creation.state in (WAITING, READY):
            self._fail(creation, (None, "ActorDiedError", f"actor {actor.id}: {actor.death}"))
        self._fail_actor_calls(actor)

    def _fail_calls(self, calls: list[TaskState], message: str) -> None:
        for ts in calls:
            if ts.id in self.tasks and ts.state in (PROCESSING, WAITING, READY):
                ts.worker = None
                self._fail(ts, (None, "ActorDiedError", message))

    def _fail_actor_calls(self, actor: ActorState) -> None:
        failure = (None, "ActorDiedError", f"actor {actor.id} is dead: {actor.death}")
        calls, actor.calls = list(actor.calls), deque()
        for tid in calls:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state in (WAITING, READY) and tid != actor.creation:
                self._fail(ts, failure)

    def _kill_actor(self, ev: KillActor, reason: str = "it was killed with daskray.kill") -> None:
        actor = self.actors.get(ev.actor)
        if actor is None or actor.state == "dead":
            return
        self._actor_dead(actor, reason)
        self._out.append(StopActor(actor.id, actor.worker))
        creation = self.tasks.get(actor.creation)
        if creation is not None and creation.state in (WAITING, READY):
            self._fail(creation, (None, "ActorDiedError", f"actor {actor.id} is dead: {reason}"))
        self._fail_actor_calls(actor)
        creation = self.tasks.get(actor.creation)
        if creation is not None and creation.state in (MEMORY, ERRED):
            self._release_deps(creation)
            self._release_if_unused(creation)

    def _actor_dead(self, actor: ActorState, reason: str) -> None:
        """The actor will never run again: it frees its name."""
        actor.state = "dead"
        actor.death = reason
        actor.restarts_left = 0
        if actor.name is not None and self.actor_names.get(actor.name, (None,))[0] == actor.id:
            del self.actor_names[actor.name]

    def _lookup_actor(self, ev: LookupActor) -> None:
        found = self.actor_names.get(ev.name)
        self._out.append(ReplyActor(ev.client, ev.request, found[1] if found else None))

    def _pump_actor(self, actor: ActorState) -> None:
        """Dispatch the actor's calls in order, up to the first one not ready."""
        if actor.state != "alive":
            return
        ws = self.workers[actor.worker]
        while actor.calls:
            if actor.creation in actor.in_flight:
                return  # no call may start before the constructor has finished
            ts = self.tasks.get(actor.calls[0])
            if ts is None or ts.state in (MEMORY, ERRED):
                actor.calls.popleft()
                continue
            if ts.state != READY:
                return
            actor.calls.popleft()
            actor.in_flight.append(ts.id)
            self._dispatch(ts, ws)

    def _object_lost(self, ts: TaskState, message: str) -> None:
        """A finished object is gone: fail what still needs it."""
        failure = (None, "ObjectLostError", message)
        gs = ts.graph
        if gs.fail_fast:
            self._fail_graph(gs, ts, failure)
            return
        self._transition(ts, ERRED)
        ts.failure = failure
        self._notify(ts)
        self._fail_dependents(ts, failure)
        self._release_if_unused(ts)

    # ------------------------------------------------------------------ graphs

    def _graph_submitted(self, ev: GraphSubmitted) -> None:
        if ev.graph in self.graphs:
            raise ValueError(f"graph {ev.graph} was submitted twice")
        n = len(ev.names)
        base = self._next_task_id
        self._next_task_id += n
        # calls made by a task (its owner is a worker) go first, newest first: a
        # waiting task's children run before older work, depth first, as if the
        # program ran sequentially -- that bounds the stacks of waiting workers
        nested = self._submitting_worker(ev.graph) is not None
        seq = -self._next_graph_seq if nested else self._next_graph_seq
        caller = self.tasks.get(ev.parent) if ev.parent is not None else None
        gs = GraphState(ev.graph, seq, base, n, ev.fail_fast, ev.notify, ev.retry_exceptions,
                        parent=ev.parent if nested else None,
                        depth=caller.graph.depth + 1 if caller is not None else 1)
        self._next_graph_seq += 1
        self.graphs[ev.graph] = gs
        groups = ev.groups or ev.names
        tasks = self.tasks
        external: dict[int, TaskState | None] = {
            i: self._lookup(ref) for i, ref in (ev.external or {}).items()
        }
        for ref in ev.pinned or ():
            pin = self._lookup(ref)
            if pin is not None:
                pin.refs += 1
                gs.pinned.append(pin.id)
                gs.pins_held = True
        new: list[TaskState] = []
        lost_data: list[TaskState] = []
        for i in range(n):
            if i in external:
                continue
            deps = tuple(
                (external[d].id if external[d] is not None else -1) if d in external else base + d
                for d in ev.deps[i]
            )
            ts = TaskState(
                base + i, gs, i, ev.names[i], groups[i], ev.bodies[i],
                (gs.seq, ev.priorities[i]), deps,
                retries_left=ev.max_retries,
                resources=ev.resources or None,
            )
            ts.store_key = ts.id
            tasks[ts.id] = ts
            new.append(ts)
            gs.live += 1
            if ts.body is None:
                ts.state = MEMORY
                ts.inline = ev.data.get(i)
                ts.nbytes = len(ts.inline or b"")
                ts.shared = ev.shared.get(i) if ev.shared else None
                held = ev.data_holders.get(i) if ev.data_holders else None
                if held is not None:
                    ts.store_key, ts.nbytes = held[1], held[2]
                    if held[0] in self.workers:
                        ts.holders.add(held[0])
                        self.workers[held[0]].holds.add(ts.id)
                    else:
                        lost_data.append(ts)
            else:
                gs.unfinished += 1
            if not gs.fail_fast:
                self.refs[(gs.id[0], gs.id[1], i)] = ts.id
        for i in ev.wanted:
            if i not in external:
                tasks[base + i].refs += 1  # the client's own reference
                tasks[base + i].report_owner = not gs.fail_fast
                if not gs.fail_fast:
                    self.ref_holders.setdefault(ev.graph[0], set()).add(base + i)
        missing: list[TaskState] = []
        for ts in new:
            for d in ts.deps:
                dep = tasks.get(d)
                if dep is None:
                    missing.append(ts)
                    continue
                dep.dependents.append(ts.id)
                dep.pending_dependents += 1
                if dep.state != MEMORY:
                    ts.waiting_on += 1
        for ts in lost_data:
            if ts.id in tasks:
                self._object_lost(ts, f"the worker that stored data {ts.name} is gone")
        if ev.graph not in self.graphs:
            return
        if ev.create_actor is not None or ev.actor is not None:
            self._bind_actor(ev, gs, new)
        for ts in new:
            if ts.id not in tasks or ts.state != WAITING:
                continue
            if ts in missing:
                self._fail(ts, (None, "ObjectLostError",
                                f"task {ts.name} depends on an object that was already freed"))
                continue
            failed = next((tasks[d] for d in ts.deps if tasks[d].state == ERRED), None)
            if failed is not None:
                self._fail(ts, failed.failure)
            elif ts.waiting_on == 0:
                self._make_ready(ts)
        for i in ev.wanted:
            ts = tasks.get(base + i)
            if ts is not None and ts.state == MEMORY:
                self._report_result(ts) if gs.fail_fast else self._notify(ts)
        if not gs.fail_fast and gs.unfinished == 0:
            self._unpin(gs)

    def _bind_actor(self, ev: GraphSubmitted, gs: GraphState, new: list[TaskState]) -> None:
        """Pin the graph's call to its actor (creating the actor for a constructor)."""
        call = next((ts for ts in new if ts.body is not None), None)
        if call is None:
            return
        if ev.create_actor is not None:
            opts = ev.create_actor
            taken = self.actor_names.get(opts.get("name")) if opts.get("name") else None
            if taken is not None:
                call.cancel_requested = True
                self._fail(call, (None, "DaskrayError", (
                    f"an actor named {opts['name']!r} exists already; use "
                    "daskray.get_actor(name), or get_if_exists=True")))
                return
            actor = ActorState(
                opts["id"], call.id, ev.resources, opts.get("max_restarts", 0),
                opts.get("max_task_retries", 0), bool(opts.get("detached")),
                opts.get("name"), max_concurrency=opts.get("max_concurrency", 1),
                threaded=bool(opts.get("threaded")))
            self.actors[actor.id] = actor
            if actor.name is not None:
                self.actor_names[actor.name] = (actor.id, opts.get("handle", b""))
            call.retries_left = 0
            self._out.append(StartActor(actor.id, ev.resources, False, actor.max_concurrency,
                                        actor.threaded))
        else:
            actor = self.actors.get(ev.actor)
            if actor is None or actor.state == "dead":
                why = actor.death if actor is not None else "no such actor in this cluster"
                call.actor = ev.actor
                call.cancel_requested = True
                self._fail(call, (None, "ActorDiedError", f"actor {ev.actor} is dead: {why}"))
                return
            call.retries_left = actor.task_retries
        call.actor = actor.id
        call.resources = None  # the actor's process has them
        actor.calls.append(call.id)

    def _submitting_worker(self, graph: GraphId) -> WorkerState | None:
        """The worker whose task submitted ``graph``, if a task did."""
        owner = graph[0]
        if not isinstance(owner, bytes):
            return None
        ws = self.workers.get(owner.decode(errors="replace"))
        return ws if ws is not None and ws.actor is None else None

    def _lookup(self, ref: RefKey) -> TaskState | None:
        tid = self.refs.get(ref)
        return None if tid is None else self.tasks.get(tid)

    def _object_put(self, ev: ObjectPut) -> None:
        self._graph_submitted(GraphSubmitted(
            ev.graph, [ev.name], [()], [0], [None],
            {0: ev.inline} if ev.inline is not None else {}, [], fail_fast=False,
        ))
        ts = self.tasks[self.refs[(ev.graph[0], ev.graph[1], 0)]]
        ts.shared = ev.shared
        ts.refs += 1  # the owner's ObjectRef
        self.ref_holders.setdefault(ev.graph[0], set()).add(ts.id)
        ts.report_owner = True
        ts.nbytes = ev.nbytes
        if ev.store_key is not None:
            ts.store_key = ev.store_key
        if ev.holder is not None and ev.holder in self.workers:
            ts.holders.add(ev.holder)
            self.workers[ev.holder].holds.add(ts.id)
        if ev.inline is None and not ts.holders:
            self._object_lost(ts, f"the worker that stored {ev.name} is gone")
        else:
            self._notify(ts)

    def _refs_changed(self, ev: RefsChanged) -> None:
        held = self.ref_holders.setdefault(ev.holder, set())
        for ref in ev.added:
            ts = self._lookup(ref)
            if ts is not None and ts.id not in held:
                held.add(ts.id)
                ts.refs += 1
        for ref in ev.dropped:
            ts = self._lookup(ref)
            if ts is not None and ts.id in held:
                held.discard(ts.id)
                ts.refs -= 1
                self._release_if_unused(ts)

    def _drop_holder(self, holder: bytes) -> None:
        """Process ``holder`` is gone, and with it its ObjectRefs."""
        self._unref(self.ref_holders.pop(holder, ()))

    def _subscribe(self, ev: Subscribe) -> None:
        for ref in ev.refs:
            ts = self._lookup(ref)
            if ts is None:
                self._out.append(NotifyRef(ev.client, ref, None, None, -1, None, "ObjectLostError",
                                           f"object {ref} does not exist (any more): every "
                                           "reference to it was dropped, or its cluster ended"))
            elif ts.state in (MEMORY, ERRED):
                self._notify_one(ts, ev.client)
            else:
                ts.subscribers.add(ev.client)

    def _cancel_ref(self, ev: CancelRef) -> None:
        ts = self._lookup(ev.ref)
        if ts is None or ts.state in (MEMORY, ERRED):
            return
        ts.cancel_requested = True
        if ts.state == PROCESSING:
            self._out.append(CancelTasks(ts.worker, (ts.id,)))
        else:
            self._fail(ts, (None, "TaskCancelledError",
                            f"task {ts.name} was cancelled before it ran"))

    def _graph_released(self, ev: GraphReleased) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._forget_graph(gs)

    def _graph_cancelled(self, ev: GraphCancelled) -> None:
        gs = self.graphs.get(ev.graph)
        if gs is not None:
            self._cancel_graph(gs)

    def _client_lost(self, ev: ClientLost) -> None:
        """The client's process is gone: cancel its dask graphs, drop its ObjectRefs
        (references it passed on to other processes keep their objects alive)."""
        for gs in [g for g in self.graphs.values() if g.id[0] == ev.client]:
            if gs.fail_fast:
                self._cancel_graph(gs)
        self._drop_holder(ev.client)

    def _cancel_graph(self, gs: GraphState) -> None:
        """Stop everything of a dask graph: cancel dispatched tasks, free its objects."""
        to_cancel: dict[WorkerId, list[TaskId]] = {}
        for tid in range(gs.base, gs.base + gs.size):
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == PROCESSING and ts.worker in self.workers:
                to_cancel.setdefault(ts.worker, []).append(tid)
        for wid, tids in to_cancel.items():
            self._out.append(CancelTasks(wid, tuple(tids)))
        self._forget_graph(gs)

    def _forget_graph(self, gs: GraphState) -> None:
        """Drop every trace of a graph.  Dispatched tasks stay counted on their
        worker until it reports them back (finished, erred or released)."""
        if self.graphs.pop(gs.id, None) is None:
            return
        frees: dict[WorkerId, list[TaskId]] = {}
        dropped = [self.tasks.pop(tid) for tid in range(gs.base, gs.base + gs.size)
                   if tid in self.tasks]
        for ts in dropped:
            for wid in ts.holders:
                ws = self.workers.get(wid)
                if ws is not None and ts.id in ws.holds:
                    ws.holds.discard(ts.id)
                    frees.setdefault(wid, []).append(ts.store_key)
            ts.holders = set()
        for ts in dropped:
            self._drop_shared(ts)
            self._release_deps(ts)
            contained, ts.contained = ts.contained, []
            self._unref(contained)
        self._unpin(gs)
        for wid, tids in frees.items():
            self._out.append(FreeObjects(wid, tuple(tids)))
        self._out.append(ForgetGraph(gs.id))

    def _unpin(self, gs: GraphState) -> None:
        if gs.pins_held:
            gs.pins_held = False
            self._unref(gs.pinned)

    def _unref(self, tids: Iterable[TaskId]) -> None:
        """Drop one reference to each of these objects (freeing what is then unused)."""
        for tid in tids:
            ts = self.tasks.get(tid)
            if ts is not None:
                ts.refs -= 1
                self._release_if_unused(ts)

    def _drop_shared(self, ts: TaskState) -> None:
        """The value of ``ts`` in shared memory is no longer needed: remove its file."""
        if ts.shared is not None:
            self._out.append(FreeShared(ts.shared))
            ts.shared = None

    # ------------------------------------------------------------------ tasks

    def _task_started(self, ev: TaskStarted) -> None:
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.graph.notify:
            self._out.append(ReportStarted(ts.graph.id, ts.node, ev.worker))

    def _task_finished(self, ev: TaskFinished) -> None:
        ws = self.workers.get(ev.worker)
        ts = self.tasks.get(ev.task)
        if ws is not None:
            self._unqueue(ws, ev.task)
            self._room.add(ws.id)
        if ts is None or ts.state != PROCESSING or ts.worker != ev.worker:
            # a task of a forgotten graph: its result is of no use
            if ws is not None:
                self._out.append(FreeObjects(ws.id, (ev.task,)))
            return
        self.durations.observe(ts.group, ev.duration)
        self._transition(ts, MEMORY)
        ts.worker = None
        ts.input_lost = False
        ts.nbytes = ev.nbytes
        ts.inline = ev.inline
        if ws is not None:
            ts.holders.add(ws.id)
            ws.holds.add(ts.id)
        for ref in ev.contained:
            inner = self._lookup(ref)
            if inner is not None:
                inner.refs += 1
                ts.contained.append(inner.id)
        gs = ts.graph
        gs.unfinished -= 1
        if gs.notify:
            self._out.append(ReportFinished(gs.id, ts.node, ev.worker, ev.inline))
        if gs.fail_fast:
            if ts.refs:
                self._report_result(ts)
        else:
            self._notify(ts)
        self._release_deps(ts)
        for d in ts.dependents:
            dependent = self.tasks.get(d)
            if dependent is None:
                continue
            dependent.waiting_on -= 1
            if dependent.waiting_on == 0 and dependent.state == WAITING:
                self._make_ready(dependent)
        if not gs.fail_fast and gs.unfinished == 0:
            self._unpin(gs)
        self._release_if_unused(ts)

    def _task_erred(self, ev: TaskErred) -> None:
        ws = self.workers.get(ev.worker)
        if ws is not None:
            self._unqueue(ws, ev.task)
            self._room.add(ws.id)
        ts = self.tasks.get(ev.task)
        if ts is None or ts.state != PROCESSING or ts.worker != ev.worker:
            return
        ts.worker = None
        if ts.input_lost and not ts.cancel_requested:  # it read an input that was lost
            ts.input_lost = False
            failed = next((self.tasks[d] for d in ts.deps if self.tasks[d].state == ERRED), None)
            if failed is not None:  # and computing it again failed
                self._fail(ts, failed.failure)
                return
            ts.waiting_on = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
            if ts.waiting_on:
                self._transition(ts, WAITING)
            else:
                self._make_ready(ts)
            return
        if ts.graph.retry_exceptions and ts.retries_left > 0 and not ts.cancel_requested:
            ts.retries_left -= 1
            self._transition(ts, READY)
            self._place(ts)
            return
        self._fail(ts, (ev.error, None, None))

    def _task_released(self, ev: TaskReleased) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        self._unqueue(ws, ev.task)
        self._room.add(ws.id)
        ts = self.tasks.get(ev.task)
        if ts is not None and ts.state == PROCESSING and ts.worker == ev.worker:
            ts.worker = None
            if ts.cancel_requested:
                self._fail(ts, (None, "TaskCancelledError",
                                f"task {ts.name} was cancelled before it ran"))
            else:  # released without being cancelled by us: run it elsewhere
                self._transition(ts, READY)
                self._place(ts)

    # ------------------------------------------------------------------ failures

    def _fail(self, ts: TaskState, failure: Failure) -> None:
        """Task ``ts`` failed: report it; fail its graph (dask) or its dependents."""
        if ts.graph.fail_fast:
            self._fail_graph(ts.graph, ts, failure)
            return
        self._fail_one(ts, failure)
        self._fail_dependents(ts, failure)
        self._release_if_unused(ts)

    def _fail_one(self, ts: TaskState, failure: Failure) -> None:
        gs = ts.graph
        self._transition(ts, ERRED)
        ts.failure = failure
        gs.unfinished -= 1
        self._notify(ts)
        self._release_deps(ts)
        if gs.unfinished == 0:
            self._unpin(gs)

    def _fail_dependents(self, ts: TaskState, failure: Failure) -> None:
        """Fail, with the same error, everything waiting on ``ts`` (iteratively)."""
        stack = list(ts.dependents)
        failed: list[TaskState] = []
        while stack:
            dep = self.tasks.get(stack.pop())
            if dep is None or dep.state not in (WAITING, READY):
                continue
            if dep.graph.fail_fast:
                if dep.graph.id in self.graphs:
                    self._fail_graph(dep.graph, dep, failure)
                continue
            self._fail_one(dep, failure)
            failed.append(dep)
            stack.extend(dep.dependents)
        for dep in failed:
            self._release_if_unused(dep)

    def _fail_graph(self, gs: GraphState, ts: TaskState, failure: Failure) -> None:
        blob, kind, message = failure
        self._out.append(ReportError(gs.id, ts.node, error=blob, kind=kind, message=message))
        self._cancel_graph(gs)

    # ------------------------------------------------------------------ reporting

    def _notify(self, ts: TaskState) -> None:
        """Tell the owner of a remote object (and subscribers) it is ready or failed."""
        if ts.report_owner:
            self._notify_one(ts, ts.graph.id[0])
        for client in ts.subscribers:
            self._notify_one(ts, client)
        ts.subscribers = set()

    def _notify_one(self, ts: TaskState, client: Any) -> None:
        ref = (ts.graph.id[0], ts.graph.id[1], ts.node)
        if ts.state == ERRED:
            blob, kind, message = ts.failure
            self._out.append(NotifyRef(client, ref, None, None, ts.store_key, blob, kind, message))
        else:
            holder = None if ts.inline is not None else next(iter(ts.holders), None)
            self._out.append(
                NotifyRef(client, ref, ts.inline, holder, ts.store_key, None, None, None))

    def _report_result(self, ts: TaskState) -> None:
        holder = None if ts.inline is not None else next(iter(ts.holders), None)
        self._out.append(ReportResult(ts.graph.id, ts.node, ts.inline, holder, ts.store_key))

    # ------------------------------------------------------------------ waiting tasks

    def _review_waiting(self) -> None:
        """While tasks wait in get(), keep the cluster going: waiting workers run
        what their innermost task waits for; idle workers take the work queued on
        waiting ones; a waiting worker with nothing to run lends its CPU to an
        extra worker when ready work waits for one; idle extras retire."""
        if self._readied and self.blocked:  # workers with room were filled already
            self._readied = False
            for wid in sorted(self.blocked):
                self._fill_nested(self.workers[wid])
            for ws in list(self.workers.values()):
                if not ws.processing and not ws.waiting and self._takes_work(ws):
                    self._fill(ws)
        for wid in sorted(self.blocked):
            ws = self.workers[wid]
            if not self._lending(ws):
                ws.lending_since = None
            elif ws.stand_in is None:
                self._find_stand_in(ws)
        self._retire_idle_extras()

    def _find_stand_in(self, ws: WorkerState) -> None:
        """Let an extra worker alike use the CPU of waiting worker ``ws``, if ready
        work waits for a CPU: a spare one, or -- once ``ws`` has had nothing to run
        for ``policy.EXTRA_START_DELAY`` (short waits are not worth a process) -- a
        new one, while under the cap."""
        starting = [name for name, like in self.extras_starting.items() if like == ws.id]
        if starting:  # started for it before, and still on its way: it will do
            ws.stand_in = starting[0]
            return
        spares = [self.workers[e] for e in sorted(self.extras)
                  if self.workers[e].standin_for is None and not self.workers[e].waiting
                  and self.workers[e].resources == ws.resources]
        can_start = (len(self.extras) + len(self.extras_starting) < self.max_extra_workers
                     and self.extra_failures < policy.MAX_EXTRA_START_FAILURES
                     and ws.lending_since is not None
                     and self.now - ws.lending_since >= policy.EXTRA_START_DELAY)
        if not (spares or can_start) or not self._work_waiting(ws):
            return
        if spares:
            extra = min(spares, key=lambda e: len(e.processing))
            extra.standin_for = ws.id
            extra.idle_since = self.now
            ws.stand_in = extra.id
            self._fill(extra)
            return
        self._next_extra += 1
        name = f"x{self._next_extra}"
        self.extras_starting[name] = ws.id
        ws.stand_in = name
        resources = {k: v for k, v in ws.resources.items() if k != "CPU"}
        self._out.append(StartExtraWorker(name, resources, ws.id))

    def _work_waiting(self, ws: WorkerState) -> bool:
        """Whether a ready task a worker like ``ws`` could run waits for a CPU (it
        would have been dispatched had one been free)."""
        tasks = self.tasks
        for heap in (self.ready, *(w.queue for w in self.workers.values())):
            for _, tid in heap:
                ts = tasks.get(tid)
                if (ts is not None and ts.state == READY and ts.actor is None
                        and _fits(ts.resources, ws)):
                    return True
        return False

    def _release_stand_in(self, ws: WorkerState) -> None:
        """Worker ``ws`` no longer waits (or is gone): its stand-in, joined or still
        starting, takes no new work for it."""
        name, ws.stand_in = ws.stand_in, None
        extra = self.workers.get(name) if name is not None else None
        if extra is not None and extra.standin_for == ws.id:
            self._unbind(extra)

    def _unbind(self, extra: WorkerState) -> None:
        """Extra worker ``extra`` stands in for nobody now: it finishes what it was
        sent, and what was queued for it goes elsewhere."""
        extra.standin_for = None
        queue, extra.queue = extra.queue, []
        for _, tid in queue:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == READY:
                self._place(ts)

    def _forget_waiting(self, ws: WorkerState) -> None:
        """Worker ``ws`` is gone: so are its waiting tasks and its stand-in ties."""
        for tid in ws.waiting:
            self.awaits.pop(tid, None)
        self.blocked.discard(ws.id)
        self.extras.discard(ws.id)
        if ws.stand_in is not None:
            self._release_stand_in(ws)
        stood_for = self.workers.get(ws.standin_for) if ws.standin_for is not None else None
        if stood_for is not None and stood_for.stand_in == ws.id:
            stood_for.stand_in = None

    def _retire_idle_extras(self) -> None:
        """Retire the extra workers out of work: at once when no task waits any
        more, else after ``policy.EXTRA_IDLE_SECONDS`` (a spare is kept that long
        for the next worker whose task waits) -- but not one holding the only copy
        of an object still needed."""
        for wid in sorted(self.extras):
            extra = self.workers[wid]
            if extra.processing or extra.waiting or any(
                    tid in self.tasks and self.tasks[tid].state == READY for _, tid in extra.queue):
                continue
            idle_long = self.now - extra.idle_since >= policy.EXTRA_IDLE_SECONDS
            if not idle_long and (extra.standin_for is not None or self.blocked):
                continue
            if self._holds_only_copy(extra):
                continue
            if extra.standin_for is not None:
                self._release_stand_in(self.workers[extra.standin_for])
            self._worker_lost(WorkerLost(wid, "retired: it was idle"))
            self._out.append(RetireWorker(wid))

    def _holds_only_copy(self, ws: WorkerState) -> bool:
        """Whether ``ws`` is the only holder of an object something still needs."""
        for tid in ws.holds:
            ts = self.tasks.get(tid)
            if (ts is not None and ts.inline is None and ts.holders == {ws.id}
                    and (ts.pending_dependents or ts.refs)):
                return True
        return False

    # ------------------------------------------------------------------ placement

    def _transition(self, ts: TaskState, new: str) -> None:
        if (ts.state, new) not in TRANSITIONS:
            raise InvalidTransition(
                f"task {ts.name} (id {ts.id}) cannot go from {ts.state} to {new}; "
                f"history: {ts.history}"
            )
        if self.validate:
            ts.history.append((ts.state, new))
        ts.state = new

    def _make_ready(self, ts: TaskState) -> None:
        self._transition(ts, READY)
        self._place(ts)

    def _place(self, ts: TaskState) -> None:
        """Queue a ready task: on the worker holding most of its large inputs (or the
        least loaded one able to run it), else in the global ready heap.  A call of
        an actor waits in its actor's own queue instead."""
        if ts.actor is not None:
            actor = self.actors.get(ts.actor)
            if actor is not None:
                self._pump_actor(actor)
            return
        self._readied = True
        candidates = [w for w in self.workers.values()
                      if self._takes_work(w) and _fits(ts.resources, w)]
        if ts.resources and not candidates:
            if not self.worker_shapes or any(
                    _covers(shape, ts.resources) for shape in self.worker_shapes):
                self.awaiting_resources.append(ts.id)  # the worker that has them comes back
            else:
                ts.cancel_requested = True  # no retry can help
                self._fail(ts, (None, "DaskrayError", (
                    f"task {ts.name} needs resources {ts.resources}, but no worker has "
                    "them; declare them with daskray.init(resources=...)")))
            return
        held: dict[WorkerId, int] = {}
        for d in ts.deps:
            dep = self.tasks[d]
            if dep.inline is None:
                for w in dep.holders:
                    held[w] = held.get(w, 0) + dep.nbytes
        load = None
        target = None
        if held:
            load = {w.id: len(w.processing) + len(w.queue) for w in candidates}
            target = policy.best_holder(held, load, load.keys())
        if target is None and ts.resources:
            target = min(candidates, key=lambda w: len(w.processing) + len(w.queue)).id
        if target is None and not ts.graph.fail_fast:
            parent = self._submitting_worker(ts.graph.id)
            if parent is not None and self._takes_work(parent) and _fits(ts.resources, parent):
                target = parent.id  # idle workers still take it from there
        if target is None:
            heapq.heappush(self.ready, (ts.priority, ts.id))
            self._ready_grew = True
            return
        heapq.heappush(self.workers[target].queue, (ts.priority, ts.id))
        self._room.add(target)

    def _next_task(self, ws: WorkerState) -> TaskState | None:
        """Pop the best ready task for ``ws``: its own queue or the global one,
        whichever has the higher priority; when both are empty and the worker is
        idle, take the longest other worker's queued work it can run."""
        tasks = self.tasks
        for heap in (ws.queue, self.ready):
            self._drop_stale(heap)
        if ws.queue and (not self.ready or ws.queue[0] <= self.ready[0]):
            return tasks[heapq.heappop(ws.queue)[1]]
        if self.ready:
            return tasks[heapq.heappop(self.ready)[1]]
        if ws.processing:
            return None
        victims = sorted(
            (w for w in self.workers.values()
             if w is not ws and w.queue and w.actor is None),
            key=lambda w: len(w.queue), reverse=True,
        )
        for victim in victims:
            for i, (_, tid) in enumerate(victim.queue):
                ts = tasks.get(tid)
                if ts is not None and ts.state == READY and _fits(ts.resources, ws):
                    victim.queue[i] = victim.queue[-1]
                    victim.queue.pop()
                    heapq.heapify(victim.queue)
                    return ts
        return None

    def _drop_stale(self, heap: list) -> None:
        """Pop the heap's top entries that are no longer ready tasks (forgotten,
        dispatched or waiting again): heaps are cleaned lazily, from the top."""
        tasks = self.tasks
        while heap and (heap[0][1] not in tasks or tasks[heap[0][1]].state != READY):
            heapq.heappop(heap)

    def _next_nested(self, ws: WorkerState) -> TaskState | None:
        """For a worker whose tasks wait in get(): the first ready task (in the order
        awaited) the innermost waiting task waits for, directly or as an input of a
        task it waits for, that ``ws`` can run -- wherever it is queued.  It runs on
        that task's stack, which cannot deadlock: the waiting task could not go on
        before it finished anyway.  Anything else could wait for a task below it on
        the stack, which cannot resume before it returns."""
        awaited = self.awaits.get(ws.waiting[-1])
        if not awaited:
            return None
        tasks = self.tasks
        done = 0
        for tid in awaited:  # finished ones, from the front: they are what it has
            ts = tasks.get(tid)
            if ts is not None and ts.state not in (MEMORY, ERRED):
                break
            done += 1
        del awaited[:done]
        seen: set[TaskId] = set()
        stack = awaited[::-1]
        while stack:
            tid = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            ts = tasks.get(tid)
            if ts is None:
                continue
            if ts.state == READY:
                if ts.actor is None and _fits(ts.resources, ws):
                    return ts  # its entry in a queue is dropped there as stale
            elif ts.state == WAITING:
                stack.extend(reversed(ts.deps))
        return None

    def _fill_nested(self, ws: WorkerState) -> None:
        """A worker whose innermost task waits and which runs nothing else: give it
        a task to run on top of that one, if there is one (see _next_nested)."""
        if ws.nest and self._lending(ws):
            ts = self._next_nested(ws)
            if ts is not None:
                self._dispatch(ts, ws, nested_for=ws.waiting[-1])

    def _lending(self, ws: WorkerState) -> bool:
        """Whether every task dispatched to ``ws`` waits in get(): its CPU is idle.
        (A waiting task is one of its dispatched ones until it has stopped waiting.)"""
        waiting = ws.waiting
        return bool(waiting) and len(ws.processing) <= len(waiting) - waiting.count(None)

    def _takes_work(self, ws: WorkerState) -> bool:
        """Whether ready work may be queued on ``ws``: not an actor's process, nor an
        extra worker that stands in for no waiting worker."""
        return ws.actor is None and (not ws.extra or ws.standin_for is not None)

    def _fill_round_robin(self) -> None:
        """Share new ready work out one task (with its siblings) per worker per
        round, least loaded first."""
        while self.ready:
            progressed = False
            for ws in sorted(self.workers.values(), key=lambda w: len(w.processing)):
                if (self._takes_work(ws) and not ws.waiting
                        and policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate)):
                    ts = self._next_task(ws)
                    if ts is not None:
                        self._dispatch_with_siblings(ts, ws)
                        progressed = True
            if not progressed:
                return

    def _dispatch_with_siblings(self, ts: TaskState, ws: WorkerState) -> None:
        """Dispatch ``ts``, and place on the same worker the next tasks of the
        global ready heap that feed a task ``ts`` feeds too (``x[i, j]`` and
        ``x[j, i]`` of ``x + x.T``, the inputs of one reduction): computed on one
        worker, their results need not move to meet.  Placed, not dispatched: the
        worker takes them as it has room, and an idle worker may still take them
        away, so a worker never hoards them behind a long task."""
        self._dispatch(ts, ws)
        if not ts.dependents or ws.waiting:  # nested: only the waiting task's calls
            return
        feeds = set(ts.dependents)
        for _ in range(policy.MAX_SIBLINGS):
            ready = self.ready
            self._drop_stale(ready)
            if not ready:
                return
            sibling = self.tasks[ready[0][1]]
            if feeds.isdisjoint(sibling.dependents) or not _fits(sibling.resources, ws):
                return
            heapq.heappop(ready)
            heapq.heappush(ws.queue, (sibling.priority, sibling.id))
            self._room.add(ws.id)

    def _fill(self, ws: WorkerState) -> None:
        """Dispatch tasks to ``ws`` while it has room (an actor's process: its calls;
        a worker whose task waits: what that task waits for)."""
        if ws.actor is not None:
            actor = self.actors.get(ws.actor)
            if actor is not None and actor.worker == ws.id:
                self._pump_actor(actor)
            return
        if ws.waiting:
            self._fill_nested(ws)
            return
        if not self._takes_work(ws):
            return
        while policy.has_capacity(len(ws.processing), ws.slots, ws.queued_estimate):
            ts = self._next_task(ws)
            if ts is None:
                return
            self._dispatch_with_siblings(ts, ws)

    def _dispatch(self, ts: TaskState, ws: WorkerState, nested_for: TaskId | None = None) -> None:
        """Send ``ts`` to ``ws``; ``nested_for``: the waiting task it is to run on top of."""
        self._transition(ts, PROCESSING)
        ts.worker = ws.id
        ts.est = self.durations.estimate(ts.group)
        ws.processing.add(ts.id)
        ws.queued_estimate += ts.est
        deps = []
        for d in ts.deps:
            dep = self.tasks[d]
            key = dep.store_key
            if ws.id in dep.holders:
                deps.append((key, ("local",)))
            elif dep.inline is not None:
                deps.append((key, ("inline", dep.inline)))
                # the worker keeps what it was sent, so later tasks read it locally
                dep.holders.add(ws.id)
                ws.holds.add(d)
            else:
                deps.append((key, ("peer", next(iter(dep.holders)))))
        self._out.append(
            Dispatch(ws.id, ts.id, ts.graph.id, ts.body, tuple(deps), ts.graph.notify,
                     ts.graph.parent if nested_for is None else nested_for, ts.graph.depth)
        )

    def _unqueue(self, ws: WorkerState, tid: TaskId) -> None:
        if ws.actor is not None:
            actor = self.actors.get(ws.actor)
            if actor is not None and tid in actor.in_flight:
                actor.in_flight.remove(tid)
        if tid in ws.processing:
            ws.processing.discard(tid)
            ts = self.tasks.get(tid)
            ws.queued_estimate = max(0.0, ws.queued_estimate - (ts.est if ts else 0.0))
            if not ws.processing:
                ws.queued_estimate = 0.0
                ws.idle_since = self.now

    # ------------------------------------------------------------------ freeing

    def _release_deps(self, ts: TaskState) -> None:
        """``ts`` no longer needs its inputs (it finished, failed or was dropped)."""
        if ts.deps_released:
            return
        if ts.actor is not None:
            actor = self.actors.get(ts.actor)
            if actor is not None and actor.creation == ts.id and actor.state != "dead":
                return  # a restart re-runs the constructor with the same arguments
        ts.deps_released = True
        for d in ts.deps:
            dep = self.tasks.get(d)
            if dep is not None:
                dep.pending_dependents -= 1
                self._release_if_unused(dep)

    def _release_if_unused(self, ts: TaskState) -> None:
        """Free the object of ``ts`` when nothing needs it; forget a remote task.
        A dask graph's data stays until the graph goes: lineage may need it to
        compute a lost result again (it was all in memory when the graph came)."""
        if ts.pending_dependents > 0 or ts.refs > 0 or ts.state not in (MEMORY, ERRED):
            return
        if ts.body is None and ts.graph.fail_fast and ts.graph.id in self.graphs:
            return
        if ts.actor is not None:
            actor = self.actors.get(ts.actor)
            if actor is not None and actor.creation == ts.id:
                if actor.state != "dead" and not actor.detached:
                    self._kill_actor(KillActor(actor.id), "all its handles were dropped")
                if actor.state != "dead":
                    return  # a detached actor keeps its constructor, to re-run on restart
                self.actors.pop(actor.id, None)
        for wid in ts.holders:
            ws = self.workers.get(wid)
            if ws is not None:
                ws.holds.discard(ts.id)
                self._out.append(FreeObjects(wid, (ts.store_key,)))
        ts.holders = set()
        ts.inline = None
        self._drop_shared(ts)
        contained, ts.contained = ts.contained, []
        self._unref(contained)
        gs = ts.graph
        if gs.fail_fast or self.tasks.get(ts.id) is not ts:
            return
        if ts.state == MEMORY and ts.body is not None and any(
                d in self.tasks and self.tasks[d].graph is gs for d in ts.dependents):
            return  # lineage: the call behind a num_returns=k call's results stays known
        del self.tasks[ts.id]
        self.refs.pop((gs.id[0], gs.id[1], ts.node), None)
        gs.live -= 1
        if gs.live == 0 and self.graphs.pop(gs.id, None) is not None:
            self._unpin(gs)
            self._out.append(ForgetGraph(gs.id))
            return
        for d in ts.deps:  # an input kept for this one's lineage may go now
            dep = self.tasks.get(d)
            if dep is not None and dep.graph is gs:
                self._release_if_unused(dep)

    # ------------------------------------------------------------------ checks

    def validate_state(self) -> None:
        """Check the invariants of the module docstring; raise AssertionError if broken."""
        for tid, ts in self.tasks.items():
            assert ts.id == tid
            if ts.state == PROCESSING:
                assert ts.worker in self.workers, (ts.name, ts.worker)
                assert tid in self.workers[ts.worker].processing, ts.name
                others = [w for w in self.workers.values() if w.id != ts.worker]
                assert all(tid not in w.processing for w in others), ts.name
            if ts.state == WAITING:
                missing = sum(1 for d in ts.deps if self.tasks[d].state != MEMORY)
                assert ts.waiting_on == missing, (ts.name, ts.waiting_on, missing)
            if ts.state == MEMORY and (ts.pending_dependents or ts.refs):
                assert ts.inline is not None or ts.holders, ts.name
        for ws in self.workers.values():
            for tid in ws.holds:
                ts = self.tasks.get(tid)
                assert ts is not None and ws.id in ts.holders, (ws.id, tid)
            assert bool(ws.waiting) == (ws.id in self.blocked), ws.id
            assert ws.extra == (ws.id in self.extras), ws.id
            if ws.standin_for is not None:
                assert ws.extra and self.workers[ws.standin_for].stand_in == ws.id, ws.id
            if ws.stand_in is not None:
                assert ws.waiting, ws.id
                assert (self.extras_starting.get(ws.stand_in) == ws.id
                        or self.workers[ws.stand_in].standin_for == ws.id), ws.id
        assert len(self.extras) + len(self.extras_starting) <= self.max_extra_workers
