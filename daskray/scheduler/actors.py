"""Actors: creation, their calls in order, restarts, death and names; calls their
callers sent straight to the actor's process (see :meth:`ActorLifecycle._bind_direct`)."""

from __future__ import annotations

from collections import deque

from .events import (
    ActorStartFailed, ClientId, ClientNamespace, DirectCallDone, GraphSubmitted, KillActor,
    ListNamedActors, LookupActor, RefKey, TaskErred, TaskFinished, TaskId, TaskReleased,
    WatchActor,
)
from .instructions import (
    ActorMoved, FreeObjects, ReplyActor, ReplyActorNames, StartActor, StopActor,
)
from .model import (
    WAITING, READY, PROCESSING, MEMORY, ERRED, TaskState, GraphState, ActorState, WorkerState,
)


def direct_key(ref: RefKey) -> str:
    """The name a call sent straight to an actor's process runs as there, and its
    result is kept under: the caller, the process and the head all derive it from
    the call's ObjectRef key."""
    owner, graph, node = ref
    owner_text = owner.hex() if isinstance(owner, bytes) else str(owner)
    return f"direct-{owner_text}-{graph}-{node}"


def ref_of_direct_key(key: str) -> RefKey | None:
    """The ObjectRef key :func:`direct_key` made ``key`` of (a driver's: its owner
    is bytes), or None."""
    try:
        prefix, rest = key.split("-", 1)
        owner, graph, node = rest.rsplit("-", 2)
        return (bytes.fromhex(owner), int(graph), int(node)) if prefix == "direct" else None
    except ValueError:
        return None


class ActorLifecycle:
    """An actor is a process of its own running its calls in order; it restarts
    after a crash while ``max_restarts`` lasts, and dies when killed, when its
    handles are dropped (unless named or detached), when what created it ends
    (unless detached: Ray's fate sharing, see :meth:`_owner_of`) or when it cannot
    restart.  A name is unique within its namespace; a driver says its namespace
    (``ClientNamespace``), and the code of its tasks and actors uses it too.

    A part of :class:`SchedulerState`, working on its containers."""

    def _bind_actor(self, ev: GraphSubmitted, gs: GraphState, new: list[TaskState]) -> None:
        """Pin the graph's call to its actor (creating the actor for a constructor)."""
        call = next((ts for ts in new if ts.body is not None), None)
        if call is None:
            return
        if ev.create_actor is not None:
            opts = ev.create_actor
            namespace = self._namespace_of(ev.graph[0], ev.parent, opts.get("namespace"))
            name = opts.get("name")
            if name is not None and (namespace, name) in self.actor_names:
                call.cancel_requested = True
                self._fail(call, (None, "DaskrayError", (
                    f"an actor named {name!r} exists already in namespace {namespace!r}; "
                    "use daskray.get_actor(name), or get_if_exists=True")))
                return
            actor = ActorState(
                opts["id"], call.id, ev.resources, opts.get("max_restarts", 0),
                opts.get("max_task_retries", 0), bool(opts.get("detached")),
                name, namespace, self._owner_of(ev, opts),
                max_concurrency=opts.get("max_concurrency", 1),
                threaded=bool(opts.get("threaded")))
            self.actors[actor.id] = actor
            if name is not None:
                self.actor_names[(namespace, name)] = (actor.id, opts.get("handle", b""))
            if actor.owner is not None:
                self.owned_actors.setdefault(actor.owner, []).append(actor.id)
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
        if ev.direct is not None and ev.create_actor is None and len(new) == 1 and not call.deps:
            self._bind_direct(ev, call, actor)
            return
        actor.calls.append(call.id)

    def _bind_direct(self, ev: GraphSubmitted, call: TaskState, actor: ActorState) -> None:
        """Register a call the caller sent straight to process ``ev.direct`` of
        ``actor``: it is in flight there.  If that process is no longer the actor's,
        the call runs again through the head (while ``max_task_retries`` lasts) or
        fails, unless its outcome came already and is whole."""
        client, number = ev.graph
        ref = (client, number, call.node)
        if number > self.direct_seen.get(client, -1):
            self.direct_seen[client] = number
        early = self.direct_early.pop(ref, None)
        ws = self.workers.get(ev.direct)
        here = actor.state == "alive" and actor.worker == ev.direct and ws is not None
        whole = early is not None and not early.released and (
            early.inline is not None or early.error is not None)
        call.direct = True
        call.store_key = direct_key(ref)
        if here or whole:
            self._transition(call, READY)
            self._transition(call, PROCESSING)
            call.worker = ev.direct
            if ws is not None:
                ws.processing.add(call.id)
            if here:
                actor.in_flight.append(call.id)
                actor.direct_callers.add(client)
            if early is not None:
                call.outcome_early = True
                self._direct_call_done(early)
            return
        # the process it was sent to is gone: the caller sends through the head now
        self._out.append(ActorMoved(client, actor.id))
        call.direct = False
        call.store_key = call.id
        message = (f"the process of actor {actor.id} that the call was sent to "
                   f"({ev.direct}) ended before it reported the call")
        if actor.state == "dead":
            self._fail(call, (None, "ActorDiedError", f"actor {actor.id} is dead: {actor.death}"))
        elif call.retries_left > 0:
            call.retries_left -= 1
            self._transition(call, READY)
            actor.calls.append(call.id)
            self._queue_call(call)
        else:
            self._fail(call, (None, "ActorDiedError", message))

    def _direct_call_done(self, ev: DirectCallDone) -> None:
        """An actor's process reports a call sent to it straight: its outcome is
        the call's, as a dispatched call's report would be (the owner is told only
        if the process did not reply to it).  One not registered yet waits."""
        tid = self.refs.get(ev.ref)
        ts = self.tasks.get(tid) if tid is not None else None
        if ts is None:
            client, number = ev.ref[0], ev.ref[1]
            if number > self.direct_seen.get(client, -1):
                self.direct_early[ev.ref] = ev  # its registration is on its way
            elif ev.worker in self.workers:  # registered and forgotten already
                self._out.append(FreeObjects(ev.worker, (ev.object_id,)))
            return
        if not ts.direct or ts.state != PROCESSING or ts.worker != ev.worker:
            if ev.worker in self.workers and not ev.released:  # it ran again elsewhere
                self._out.append(FreeObjects(ev.worker, (ev.object_id,)))
            return
        if ev.released:  # cancelled while queued there: the owner hears it from here
            if ev.worker in self.workers:
                self._task_released(TaskReleased(ts.id, ev.worker))
            return
        owner = ts.report_owner
        if ev.replied:  # else the owner hears it from here, as for any call
            ts.report_owner = False
        try:
            if ev.error is not None:
                self._task_erred(TaskErred(ts.id, ev.worker, ev.error))
            else:
                self._task_finished(TaskFinished(ts.id, ev.worker, ev.nbytes, ev.inline,
                                                 ev.duration, ev.contained))
        finally:
            ts.report_owner = owner

    def _direct_dropped(self, ev: TaskReleased) -> None:
        """The process dropped a direct call, named by its key, that a cancel
        reached before it ran (see ``_cancel_task``)."""
        ref = ref_of_direct_key(ev.task)
        if ref is not None:
            self._direct_call_done(DirectCallDone(ref, ev.worker, ev.task, released=True))

    def _after_direct_calls(self, actor: ActorState, ts: TaskState) -> bool:
        """Whether call ``ts`` must wait for calls its caller sent the actor's process
        straight before it: they may not have reached the process yet (another
        socket), and calls run in the order they were made.  (The caller's
        registrations of those came before ``ts``, on the same socket.)  Calls of a
        threaded actor keep no order, as in Ray."""
        client, number = ts.graph.id
        for tid in actor.in_flight:
            other = self.tasks.get(tid)
            if other is not None and other.direct and other.graph.id[0] == client \
                    and other.graph.id[1] < number:
                return True
        return False

    def _watch_actor(self, ev: WatchActor) -> None:
        """``ev.client`` is learning where the actor's process is: it hears when
        that process goes.  (A dead actor's calls fail anyway.)"""
        actor = self.actors.get(ev.actor)
        if actor is not None and actor.state != "dead":
            actor.direct_callers.add(ev.client)

    def _tell_direct_callers(self, actor: ActorState) -> None:
        """The actor's process is going: the callers that send it calls straight
        send through the head from now on."""
        for client in sorted(actor.direct_callers, key=repr):
            self._out.append(ActorMoved(client, actor.id))
        actor.direct_callers = set()

    def _actor_process_joined(self, ws: WorkerState, actor_id: str) -> None:
        """The process started for actor ``actor_id`` joined: it runs the actor's
        calls, or stops at once if the actor died meanwhile."""
        ws.actor = actor_id
        actor = self.actors.get(actor_id)
        if actor is None or actor.state == "dead":
            self._out.append(StopActor(actor_id, ws.id))
            return
        actor.worker = ws.id
        actor.state = "alive"
        self._pump_actor(actor)

    def _queue_call(self, ts: TaskState) -> None:
        """Actor call ``ts`` is ready: it runs when its actor gets to it, in order."""
        actor = self.actors.get(ts.actor)
        if actor is not None:
            self._pump_actor(actor)

    def _fill_actor_process(self, ws: WorkerState) -> None:
        """The process of an actor has room: it takes the actor's next calls."""
        actor = self.actors.get(ws.actor)
        if actor is not None and actor.worker == ws.id:
            self._pump_actor(actor)

    def _call_returned(self, ws: WorkerState, tid: TaskId) -> None:
        """The process of an actor reported call ``tid`` back: no longer in flight."""
        actor = self.actors.get(ws.actor)
        if actor is not None and tid in actor.in_flight:
            actor.in_flight.remove(tid)

    def _constructor_of_live_actor(self, ts: TaskState) -> bool:
        """Whether ``ts`` is the constructor of an actor not dead: a restart runs it
        again, so its inputs are kept."""
        actor = self.actors.get(ts.actor)
        return actor is not None and actor.creation == ts.id and actor.state != "dead"

    def _drop_actor_of(self, ts: TaskState) -> bool:
        """Nothing references the object of ``ts`` any more.  If ``ts`` is an
        actor's constructor, its handles are all gone: the actor is killed (unless
        detached) and forgotten once dead.  Whether the object may be freed: not
        while a detached actor lives (a restart runs its constructor again)."""
        actor = self.actors.get(ts.actor)
        if actor is None or actor.creation != ts.id:
            return True
        if actor.state != "dead" and not actor.detached:
            self._kill_actor(KillActor(actor.id), "all its handles were dropped")
        if actor.state != "dead":
            return False
        self.actors.pop(actor.id, None)
        return True

    def _actor_lost(self, ws: WorkerState, reason: str) -> list[tuple[TaskState, str]]:
        """The process of an actor died: restart it, or fail what it was to run."""
        actor = self.actors.get(ws.actor)
        if actor is None:
            return []
        self._tell_direct_callers(actor)
        # what its process created ends with it, restart or not (Ray's owner died)
        self._owner_ended(("actor", actor.id), f"the process of the actor that created it "
                                               f"({actor.id}) died")
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
        self._tell_direct_callers(actor)
        if ev.restart and actor.restarts_left > 0:
            # its process is stopped; its end restarts it as a crash would.  No call
            # goes to the process meanwhile: they wait for the new one
            if actor.state == "alive":
                actor.state = "restarting"
            self._out.append(StopActor(actor.id, actor.worker))
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
        """The actor will never run again: it frees its name, and the actors it
        created end with it."""
        actor.state = "dead"
        actor.death = reason
        actor.restarts_left = 0
        self._tell_direct_callers(actor)
        key = (actor.namespace, actor.name)
        if actor.name is not None and self.actor_names.get(key, (None,))[0] == actor.id:
            del self.actor_names[key]
        siblings = self.owned_actors.get(actor.owner) if actor.owner is not None else None
        if siblings is not None and actor.id in siblings:
            siblings.remove(actor.id)
            if not siblings:
                del self.owned_actors[actor.owner]
        self._owner_ended(("actor", actor.id), f"the actor that created it ({actor.id}) died")

    # ------------------------------------------------------------ owners

    def _owner_of(self, ev: GraphSubmitted, opts: dict) -> tuple | None:
        """What the new actor ends with, as Ray's fate sharing has it: the driver
        that created it, or the actor whose code did; a named one created by a task
        ends with that task (an unnamed one with its handles, as ever).  None for a
        ``lifetime="detached"`` actor: it lives until killed."""
        if opts.get("lifetime") == "detached":
            return None
        caller = self.tasks.get(ev.parent) if ev.parent is not None else None
        if caller is None:
            return ("client", ev.graph[0])
        if caller.actor is not None:
            return ("actor", caller.actor)
        return ("task", caller.id) if opts.get("name") is not None else None

    def _owner_ended(self, owner: tuple, why: str) -> None:
        """``owner`` (see :meth:`_owner_of`) ended: so do the actors it created."""
        for actor_id in self.owned_actors.pop(owner, ()):
            self._kill_actor(KillActor(actor_id), why)

    def _task_ended(self, ts: TaskState) -> None:
        """A run of task ``ts`` ended (finished, raised, or its worker died; it may
        run again): the named actors it made end, as they would with Ray's worker."""
        if ("task", ts.id) in self.owned_actors:
            self._owner_ended(("task", ts.id), f"the task that created it ({ts.name}) ended")

    def _client_actors_end(self, client: ClientId) -> None:
        """A driver is gone: its actors end (unless detached), its namespace is forgotten."""
        self.namespaces.pop(client, None)
        self._owner_ended(("client", client), "the driver that created it ended")
        # its direct calls' outcomes still to come are of no use: they are freed
        self.direct_seen[client] = float("inf")
        for ref in [r for r in self.direct_early if r[0] == client]:
            ev = self.direct_early.pop(ref)
            if ev.worker in self.workers:
                self._out.append(FreeObjects(ev.worker, (ev.object_id,)))
        for actor in self.actors.values():
            actor.direct_callers.discard(client)

    # ------------------------------------------------------------ names

    def _client_namespace(self, ev: ClientNamespace) -> None:
        self.namespaces[ev.client] = ev.namespace

    def _driver_of(self, client: ClientId, parent: TaskId | None) -> ClientId:
        """The driver whose work a request is: the client itself, or for one made by
        a task's code, the client of the graph that task belongs to, up the nesting."""
        while parent is not None:
            ts = self.tasks.get(parent)
            if ts is None:
                break
            client, parent = ts.graph.id[0], ts.graph.parent
        return client

    def _namespace_of(self, client: ClientId, parent: TaskId | None,
                      given: str | None) -> str:
        """The namespace a request means: the one given, else its driver's."""
        if given is not None:
            return given
        return self.namespaces.get(self._driver_of(client, parent), "")

    def _lookup_actor(self, ev: LookupActor) -> None:
        namespace = self._namespace_of(ev.client, ev.parent, ev.namespace)
        found = self.actor_names.get((namespace, ev.name))
        self._out.append(ReplyActor(ev.client, ev.request, found[1] if found else None))

    def _list_named_actors(self, ev: ListNamedActors) -> None:
        if ev.all_namespaces:
            names: list = sorted([namespace, name] for namespace, name in self.actor_names)
        else:
            mine = self._namespace_of(ev.client, ev.parent, None)
            names = sorted(name for namespace, name in self.actor_names if namespace == mine)
        self._out.append(ReplyActorNames(ev.client, ev.request, names))

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
            if actor.in_flight and not actor.threaded and self._after_direct_calls(actor, ts):
                return
            actor.calls.popleft()
            actor.in_flight.append(ts.id)
            if ts.direct:  # sent straight once, run again through the head
                ts.direct = False
                ts.store_key = ts.id
            self._dispatch(ts, ws)
