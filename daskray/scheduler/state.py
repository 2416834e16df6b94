"""The scheduler: an I/O-free state machine.

Events in, instructions out; :meth:`SchedulerState.handle` (or :meth:`~SchedulerState.handle_all`
for events that arrive together) is the only way state changes.  No sockets, no pickle, no threads, no clock: time arrives inside events
(task durations, ``Tick``) and payloads are opaque bytes.

Where things are
----------------
``SchedulerState`` (here) holds the state, the event table and ``handle``; each
concern is a mixin working on that one state, in a module of its own:

==============  =============================================================
``model``       the records (TaskState, GraphState, ActorState, WorkerState),
                the task states and the transitions allowed between them
``workers``     workers joining and leaving
``graphs``      graph intake: graphs and ``put`` objects in, released, cancelled
``outcomes``    worker reports on tasks, failures, telling clients of results
``lifetimes``   reference counts, pins, freeing what nothing needs any more
``lineage``     computing lost results again
``actors``      actor creation, calls in order, restarts, death, names
``placement``   where ready tasks go, dispatch, siblings, stealing (the tunable
                choices are in ``policy``)
``waiting``     tasks waiting in ``get()``: nesting and extra workers
==============  =============================================================

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

Invariants (checked after every event, or batch of events, when ``validate=True``):

* a ``processing`` task is in exactly its worker's ``processing`` set;
* ``waiting_on`` counts the task's inputs not in memory;
* a ``memory`` object still needed has its value inline or at least one holder;
* a worker holds only objects whose task lists it as a holder.
* a worker is in ``blocked`` exactly while tasks of it wait in get();
* an extra worker is in ``extras``; it and the waiting worker it stands in
  for name each other; extra workers joined or starting are at most
  ``max_extra_workers``.
"""

from __future__ import annotations

from typing import Iterable

from . import policy
from .events import (
    ActorStartFailed, CancelRef, ClientLost, ClientNamespace, DirectCallDone, Event,
    GraphCancelled, KillActor, ListNamedActors, LookupActor, WatchActor,
    GraphId, GraphReleased, GraphSubmitted, ObjectPut, RefKey, RefsChanged, Subscribe,
    TaskErred, WorkerBlocked, TaskFinished, TaskId, TaskReleased, TaskStarted, Tick, WorkerId,
    WorkerJoined, WorkerLost,
)
from .instructions import Instruction
from .model import (
    WAITING, PROCESSING, MEMORY, TRANSITIONS, InvalidTransition, TaskState,
    GraphState, ActorState, WorkerState,
)
from .workers import Membership
from .graphs import GraphIntake
from .outcomes import TaskOutcomes
from .lifetimes import RefLifetimes
from .lineage import Lineage
from .actors import ActorLifecycle
from .placement import Placement
from .waiting import WaitingTasks

__all__ = ["SchedulerState", "InvalidTransition"]

#: an event's consequences (fills, stand-ins, retirements) settle in at most this
#: many rounds; what is left waits for the next event
SETTLE_ROUNDS = 4


class SchedulerState(Membership, GraphIntake, TaskOutcomes, RefLifetimes, Lineage,
                     ActorLifecycle, Placement, WaitingTasks):
    """The scheduler's whole state, changed only by :meth:`handle` (see the module
    docstring; each concern's methods are in its own module).

    State
    -----
    Every container of the state (the records' own fields are in ``model``)::

        tasks              :: {task id: TaskState}       every live node of every graph
        graphs             :: {graph id: GraphState}     graphs not yet released or done
        refs               :: {ref key: task id}         objects of remote graphs, by ObjectRef key
        ref_holders        :: {process: {task id}}       the ObjectRefs each process holds
        actors             :: {actor id: ActorState}     actors until dead and unreferenced
        actor_names        :: {(namespace, name): (actor id, handle)} named actors alive
        namespaces         :: {client id: namespace}     each driver's namespace
        owned_actors       :: {owner: [actor id]}        actors that end with their owner
        workers            :: {worker id: WorkerState}   joined workers, actors' processes too
        ready              :: heap[(priority, task id)]  ready tasks free to run anywhere
        worker_shapes      :: [resources]                of every task worker that joined
        awaiting_resources :: [task id]                  ready tasks no live worker can run yet
        durations          :: DurationEstimates          per task group
        blocked            :: {worker id}                workers with tasks waiting in get()
        awaits             :: {task id: [task id]}       what each waiting task waits for
        direct_early       :: {ref key: DirectCallDone}  outcomes of direct calls not yet registered
        direct_seen        :: {client: graph number}     highest direct call registered per caller
        extras             :: {worker id}                extra workers that joined
        extras_starting    :: {worker id: worker id}     extra workers starting, and for whom
        extra_failures     :: int                        extras that died unjoined, in a row
        now                :: float                      the time of the latest Tick

    and, per event (emptied by :meth:`handle`): ``_out`` (the instructions),
    ``_room`` (workers to fill), ``_ready_grew`` and ``_readied`` (the ready
    heap grew; a task became ready).  ``validate``, ``max_extra_workers`` and
    the id counters ``_next_task_id``, ``_next_graph_seq``, ``_next_extra``
    complete it.

    ::

        TaskState.state in  waiting ─> ready ─> processing ─> memory ─> (forgotten)
                              │          ^          │  │
                              │          └──────────┘  └─> erred ─> (forgotten)
                              └─────────────────────────────┘   (an input failed)

        and back to waiting (lineage, dask graphs): a memory task whose only copy
        died with its worker runs again, with any of its inputs freed meanwhile;
        its readers that were ready wait again, those already running run again
        if they fail.  (``model.TRANSITIONS`` lists every transition allowed.)

        TaskState.dependents   :: [task id]    tasks reading this one's result
        TaskState.holders      :: {worker id}  workers holding its result
        TaskState.subscribers  :: {client}     told when it is ready or failed
        TaskState.contained    :: [task id]    objects whose ObjectRefs its value holds

        GraphState.pinned      :: [task id]    objects its arguments refer to

        ActorState.calls       :: deque        calls not yet dispatched, in order
        ActorState.in_flight   :: [task id]    calls dispatched, not yet reported back
                                               (and calls sent to it straight by callers)
        ActorState.direct_callers :: {client}  callers sending calls to its process straight

        WorkerState.processing :: {task id}    dispatched, not yet reported back
        WorkerState.queue      :: heap         ready tasks placed on this worker
                                               (their large inputs live there, or
                                               only it has the resources they need)
        WorkerState.holds      :: {task id}    results kept by the worker
        WorkerState.waiting    :: [task id]    its tasks waiting in get(), outermost first
    """

    def __init__(self, validate: bool = False, max_extra_workers: int = 0) -> None:
        self.tasks: dict[TaskId, TaskState] = {}
        self.graphs: dict[GraphId, GraphState] = {}
        self.refs: dict[RefKey, TaskId] = {}
        self.actors: dict[str, ActorState] = {}
        #: which objects each process holds ObjectRefs to: {identity: {task id}}
        self.ref_holders: dict[bytes, set[TaskId]] = {}
        #: named actors: {(namespace, name): (actor id, pickled handle)}
        self.actor_names: dict[tuple[str, str], tuple[str, bytes]] = {}
        #: each driver's namespace, as it said (see ActorLifecycle._namespace_of)
        self.namespaces: dict[bytes, str] = {}
        #: actors that end when their owner ends (Ray's fate sharing): {owner: [actor id]}
        self.owned_actors: dict[tuple, list[str]] = {}
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
        #: outcomes of calls sent straight to an actor, come before the caller's
        #: registration of the call: {ref key: DirectCallDone}
        self.direct_early: dict[RefKey, DirectCallDone] = {}
        #: per caller, the highest graph number of its direct calls registered: an
        #: outcome of a lower one whose call is gone was registered and forgotten
        self.direct_seen: dict = {}
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
            ListNamedActors: self._list_named_actors,
            ClientNamespace: self._client_namespace,
            WorkerBlocked: self._worker_blocked,
            TaskStarted: self._task_started,
            TaskFinished: self._task_finished,
            TaskErred: self._task_erred,
            TaskReleased: self._task_released,
            GraphReleased: self._graph_released,
            GraphCancelled: self._graph_cancelled,
            ClientLost: self._client_lost,
            DirectCallDone: self._direct_call_done,
            WatchActor: self._watch_actor,
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
            "early direct outcomes": len(self.direct_early),
        }

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what must be done because of it."""
        self._out = out = []
        self._readied = False
        self._handlers[type(event)](event)
        self._settle()
        return out

    def handle_all(self, events: Iterable[Event]) -> list[Instruction]:
        """Apply events that arrived together (a worker's batch of reports), in
        order; return what must be done because of them.

        The same as :meth:`handle` of each in turn, but idle workers are filled
        once, at the end: a batch of fifty reports becomes one round of dispatch
        with fifty tasks, not fifty rounds of one (the end state differs only in
        which ready task went where).
        """
        self._out = out = []
        self._readied = False
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)
        self._settle()
        return out

    def _settle(self) -> None:
        """Fill the workers that got room and share out new ready work (what
        an event may start); then check the invariants if asked to."""
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

    def _transition(self, ts: TaskState, new: str) -> None:
        if (ts.state, new) not in TRANSITIONS:
            raise InvalidTransition(
                f"task {ts.name} (id {ts.id}) cannot go from {ts.state} to {new}; "
                f"history: {ts.history}"
            )
        if self.validate:
            ts.history.append((ts.state, new))
        ts.state = new

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
