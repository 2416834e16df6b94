"""Ray-style calls over one connection to the head: remote calls, put, get, wait, cancel.

The same logic serves the driver and code running inside a worker; what differs
is the :class:`Connection` underneath:

* in the driver, a :class:`~daskray.runtime.client.Client` whose I/O thread
  files results as they arrive and wakes waiters;
* inside a worker, an :class:`~daskray.runtime.in_task.InTaskConnection` over the
  worker's own socket: a task that waits in ``get`` pumps it and meanwhile runs
  other tasks queued on it, and the head lends the waiting task's slot out, so
  nested parallelism cannot deadlock.

Results of ObjectRefs arrive as ``RefResult`` messages: the owner of a ref is told
unasked, any other process subscribes on first use.  What is known of a ref is
forgotten when this process drops its last ObjectRef to it.

Actor calls go straight to the actor's process when the connection can (the
driver's): a :class:`_Channel` per actor.  The first calls go through the head,
followed by a call of the actor's ``__daskray_direct__``, which says where the
process takes calls; once it has returned, and every call of this process sent
to that actor through the head is known to have ended (or to have started
before it), calls go straight, so they keep their order.  Each is registered
with the head too (``SubmitGraph.direct``, one-way, in the same batch): the head
knows every ref before anything that names it reaches it from here, and treats
the call as running on that process (restarts, deaths, cancels).  A call with
ObjectRefs in its arguments (or several returns, or ``retry_exceptions``) goes
through the head, and the channel waits again for it to end.  When the head
says the process is gone (``ActorMoved``) calls go through the head until a new
``__daskray_direct__`` call says where the actor is.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Protocol, Sequence

from .. import errors
from ..backend import ActorSpec
from ..refs import ObjectRef, RefKey, dask_key_of
from ..remote_function import build_call
from ..scheduler.policy import INLINE_THRESHOLD
from . import protocol as P
from . import shared_memory
from .context import DIRECT
from .serialization import dumps, dumps_frames, frames_nbytes, loads, loads_exception


class Connection(Protocol):
    client_id: bytes
    results: dict

    def next_number(self) -> int: ...
    def send(self, msg: Any) -> None: ...
    def wait_for(self, predicate: Callable[[], bool], timeout: float | None,
                 awaits: Sequence[RefKey] | None = None) -> bool: ...
    def fetch(self, address: str, object_id: Any) -> Any: ...
    def store_large(self, key: str, frames: list) -> str: ...


def refuse_force_on_actor_calls(refs: Sequence[ObjectRef], actor_calls: Any) -> None:
    """Ray's rule: ``cancel(force=True)`` of an actor's call raises ValueError (it
    would kill the actor); ``actor_calls`` are the keys of the calls known here."""
    if any(r._key in actor_calls for r in refs):
        raise ValueError("daskray.cancel(force=True) cannot cancel an actor's call: it "
                         "would kill the actor. Use force=False, or daskray.kill(actor)")


def failed(result: P.RefResult | None) -> bool:
    """Whether ``result`` (None: not known yet) says its object failed."""
    return result is not None and (result.error is not None or result.kind is not None)


def error_of(result: P.RefResult | P.Error) -> BaseException:
    """The exception a failed object raises at ``get``."""
    if result.error is not None:
        return loads_exception(result.error)
    kind = getattr(errors, result.kind or "", None)
    if not (isinstance(kind, type) and issubclass(kind, errors.DaskrayError)):
        kind = errors.DaskrayError
    return kind(result.message or "the task failed")


class _Channel:
    """What a session knows of the way straight to one actor's process."""

    __slots__ = ("address", "worker", "barrier", "pending", "gone", "blind", "tables")

    def __init__(self) -> None:
        #: the process's direct socket and worker id (None: not known, or gone)
        self.address: str | None = None
        self.worker: str | None = None
        #: the ``__daskray_direct__`` call in flight through the head, if any: its
        #: ref key (no ObjectRef is held: the head forgets it once it has answered)
        self.barrier: RefKey | None = None
        #: calls sent through the head whose end has not been seen yet (changed
        #: under the session's channel lock only)
        self.pending: set[RefKey] = set()
        #: calls of ``pending`` whose refs were dropped since (appended by ``forget``,
        #: which may run in any thread, inside a finalizer too)
        self.gone: list[RefKey] = []
        #: the number of the latest call through the head dropped before its end
        #: was seen (0: none): a barrier sent after it must return first
        self.blind = 0
        #: function tables the process was sent by this session, by id
        self.tables: set = set()


class Session:
    """Ray's core API over a :class:`Connection`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._subscribed: set[RefKey] = set()
        #: own refs whose result was forgotten (all ObjectRefs dropped); one that
        #: comes back (inside a value) must be asked for like anyone else's
        self._forgotten_own: set[RefKey] = set()
        self._names = itertools.count()
        #: this process's actor calls still referenced (cancel(force=True) refuses them)
        self._actor_calls: set[RefKey] = set()
        #: whether actor calls may go straight to the actors' processes
        self._direct = callable(getattr(conn, "send_direct", None))
        #: {actor id: _Channel}; {call through the head: its channel}
        self._channels: dict[str, _Channel] = {}
        self._pending_on: dict[RefKey, _Channel] = {}
        self._channel_lock = threading.Lock()

    # ---------------------------------------------------------------- submitting

    def submit_call(self, func: Callable, table: Any, args: tuple, kwargs: dict,
                    options: dict) -> ObjectRef | list[ObjectRef]:
        number = self.conn.next_number()
        name = options.get("name") or getattr(func, "__name__", "task")
        parts = build_call(func, table, name, args, kwargs, options, number)
        me = self.conn.client_id
        # made before sending, so the result cannot arrive for a ref not yet counted
        refs = [ObjectRef((me, number, node), owned=True) for node in parts["wanted"]]
        self.conn.send(P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
        return refs[0] if options.get("num_returns", 1) == 1 else refs

    def create_actor(self, actor_class: ActorSpec, args: tuple, kwargs: dict) -> Any:
        number = self.conn.next_number()
        me = self.conn.client_id
        cls = actor_class._cls
        parts = build_call(actor_class._init, actor_class._init_table, f"{cls.__name__}.__init__",
                           args, kwargs, {"max_retries": 0}, number)
        creation = ObjectRef((me, number, parts["wanted"][0]), owned=True)
        handle = actor_class.handle_for(actor_class.new_actor_id(me), creation)
        parts["create_actor"] = actor_class.graph_options(handle._actor_id, dumps(handle))
        parts["resources"] = actor_class.resources()
        self.conn.send(P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
        name = actor_class._options.get("name")
        if name is None:
            return handle
        return self._claimed(handle, name, actor_class._options)

    def _claimed(self, handle: Any, name: str, options: dict) -> Any:
        """``handle`` if its actor got ``name``; else the actor that has it with
        ``get_if_exists``, or ``ValueError`` (Ray's, at creation).  The head handles
        this client's messages in order: the lookup sees the creation's outcome."""
        namespace = options.get("namespace")
        holder = self.get_actor(name, namespace=namespace)
        if holder is None or holder._actor_id == handle._actor_id:
            return handle
        if options.get("get_if_exists"):
            return holder
        raise errors.ActorNameTakenError(
            f"an actor named {name!r} exists already"
            f"{'' if namespace is None else f' in namespace {namespace!r}'}; use "
            "daskray.get_actor(name), or get_if_exists=True")

    def call_actor(self, handle: Any, method: str, args: tuple, kwargs: dict,
                   options: dict) -> ObjectRef | list[ObjectRef]:
        func, table = handle._call(method, options.get("concurrency_group"))
        number = self.conn.next_number()
        opts = {"max_retries": 0, **options}
        parts = build_call(func, table, f"{handle._class_name}.{method}", args, kwargs, opts,
                           number)
        parts["actor"] = handle._actor_id
        simple = (self._direct and not parts["external"] and not parts["pinned"]
                  and opts.get("num_returns", 1) == 1 and not opts.get("retry_exceptions"))
        # the call keeps its actor alive even if the caller drops the handle at once
        parts["pinned"] = parts["pinned"] + [handle._creation._key]
        me = self.conn.client_id
        refs = [ObjectRef((me, number, node), owned=True) for node in parts["wanted"]]
        self._actor_calls.update(r._key for r in refs)
        if not self._direct:
            self.conn.send(P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
        else:
            with self._channel_lock:
                self._send_call(handle, method, number, parts, refs, simple)
        return refs[0] if opts.get("num_returns", 1) == 1 else refs

    def _send_call(self, handle: Any, method: str, number: int, parts: dict,
                   refs: list[ObjectRef], simple: bool) -> None:
        """Send an actor call straight to the actor's process if its channel is
        open (see the module), else through the head."""
        channel = self._channels.get(handle._actor_id)
        if channel is None:
            channel = self._channels[handle._actor_id] = _Channel()
        if simple and method != DIRECT and self._open(channel, handle):
            key = refs[0]._key
            tid = parts["table_id"]
            known = tid in channel.tables
            channel.tables.add(tid)
            parts["direct"] = channel.worker
            self.conn.send_direct(
                channel.address,
                P.DirectCall(key, tid, None if known else parts["function_table"],
                             parts["bodies"][0]),
                then=P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
            return
        self.conn.send(P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
        if method == DIRECT:
            return
        for ref in refs:
            channel.pending.add(ref._key)
            self._pending_on[ref._key] = channel
        if channel.barrier is None and channel.address is None:
            self._send_barrier(channel, handle)

    def _send_barrier(self, channel: _Channel, handle: Any) -> None:
        """Ask the actor, through the head, where its process takes calls; when it
        answers, every call this process sent it through the head before has started."""
        func, table = handle._call(DIRECT)
        number = self.conn.next_number()
        parts = build_call(func, table, f"{handle._class_name}.{DIRECT}", (), {},
                           {"max_retries": 0}, number)
        parts["actor"] = handle._actor_id
        parts["pinned"] = [handle._creation._key]
        key = (self.conn.client_id, number, parts["wanted"][0])
        self.conn.watched.add(key)  # its answer is filed though no ObjectRef is held
        ref = ObjectRef(key, owned=True)
        self.conn.send(P.WatchActor(handle._actor_id))  # first: a move after it is told
        self.conn.send(P.SubmitGraph(graph=number, fail_fast=False, notify=False, **parts))
        del ref  # dropped after it was sent: the head answers, then forgets it
        channel.barrier = key

    def _open(self, channel: _Channel, handle: Any) -> bool:
        """Whether calls to ``handle``'s actor may go straight now (see the module);
        sends a barrier when one is needed."""
        results = self.conn.results
        moved = self.conn.moved_actors
        if moved and handle._actor_id in moved:
            moved.discard(handle._actor_id)
            if channel.address is not None:
                self.conn.close_direct(channel.address)
            channel.address = channel.worker = None
            if channel.barrier is not None:
                self.conn.watched.discard(channel.barrier)
                results.pop(channel.barrier, None)
            channel.barrier = None
            channel.tables = set()
        if channel.barrier is not None:
            result = results.pop(channel.barrier, None)
            if result is None:
                return False
            barrier, channel.barrier = channel.barrier, None
            self.conn.watched.discard(barrier)
            try:
                where = None if failed(result) else self._value(result)
            except Exception:  # noqa: BLE001 - it could not say: calls go through the head
                where = None
            if where is not None:
                channel.address, channel.worker = where
            # what went through the head before the barrier has started
            channel.pending = {k for k in channel.pending if k[1] > barrier[1]}
            if channel.blind < barrier[1]:
                channel.blind = 0
        if channel.address is None:
            return False
        if channel.gone:
            gone, channel.gone = channel.gone, []
            channel.pending.difference_update(gone)
        if channel.pending:
            channel.pending = {k for k in channel.pending if k not in results}
            if channel.pending:
                return False
        if channel.blind:
            if channel.barrier is None:
                self._send_barrier(channel, handle)
            return False
        return True
    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        if self._direct:  # later calls go after the kill, through the head
            with self._channel_lock:
                channel = self._channels.pop(handle._actor_id, None)
                if channel is not None and channel.address is not None:
                    self.conn.close_direct(channel.address)
                if channel is not None and channel.barrier is not None:
                    self.conn.watched.discard(channel.barrier)
                    self.conn.results.pop(channel.barrier, None)
        self.conn.send(P.KillActorRequest(handle._actor_id, no_restart))

    def get_actor(self, name: str, timeout: float | None = 30.0, *,
                  namespace: str | None = None) -> Any:
        """The handle of the actor named ``name`` in ``namespace`` (None: this
        driver's), or None."""
        reply = self._ask(P.GetActor(name, self.conn.next_number(), namespace, self._parent()),
                          timeout, f"no answer about actor {name!r}")
        return None if reply.handle is None else loads(reply.handle)

    def named_actors(self, all_namespaces: bool = False,
                     timeout: float | None = 30.0) -> list:
        """The names of the live named actors in this driver's namespace, or with
        ``all_namespaces`` every one's ``{"name": ..., "namespace": ...}``."""
        reply = self._ask(P.ListActors(self.conn.next_number(), all_namespaces, self._parent()),
                          timeout, "no answer about the named actors")
        if all_namespaces:
            return [{"name": name, "namespace": namespace} for namespace, name in reply.names]
        return list(reply.names)

    def set_namespace(self, namespace: str) -> None:
        """Tell the head this driver's namespace (before anything else is sent)."""
        self.conn.send(P.SetNamespace(namespace))

    def _parent(self) -> int | None:
        """In a task: the task whose code runs (the head finds its driver); else None."""
        return getattr(self.conn, "current", None)

    def resources(self, timeout: float | None = 30.0) -> tuple[dict, dict]:
        """(what the cluster has, what is free now): see ``daskray.cluster_resources``."""
        reply = self._ask(P.GetResources(self.conn.next_number()), timeout,
                          "no answer about the cluster's resources")
        return reply.total, reply.available

    def state_sizes(self, timeout: float | None = 30.0) -> dict[str, int]:
        """How much the head's scheduler state holds, by kind (a debugging aid:
        once every ObjectRef is dropped, only the workers may be left)."""
        reply = self._ask(P.GetStateSizes(self.conn.next_number()), timeout,
                          "no answer about the head's state")
        return reply.sizes

    def task_events(self, timeout: float | None = 60.0) -> list[tuple]:
        """The task runs the head has logged, oldest first: (key, worker, start,
        end, state) with times from ``time.time()`` (see ``daskray.timeline``)."""
        reply = self._ask(P.GetTimeline(self.conn.next_number()), timeout,
                          "no answer about the task events")
        return [tuple(e[1:]) for e in reply.events]

    def _ask(self, msg: Any, timeout: float | None, what: str) -> Any:
        """Send a request to the head and wait for its reply."""
        key = ("reply", msg.request)
        self.conn.send(msg)
        if not self.conn.wait_for(lambda: key in self.conn.results, timeout):
            raise errors.GetTimeoutError(f"{what} within {timeout} s")
        return self.conn.results.pop(key)

    def put(self, value: Any) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("daskray.put() of an ObjectRef is not allowed; pass the ref itself")
        failure = getattr(self.conn, "failure", None)
        if failure is not None:  # the cluster is gone: write nothing where it was
            raise errors.ClusterError(failure)
        number = self.conn.next_number()
        key = (self.conn.client_id, number, 0)
        frames = dumps_frames(value)
        nbytes = frames_nbytes(frames)
        name = f"put-{number}"
        # the ref exists before the message goes (its result may come back at once),
        # and only once nothing can fail any more
        if nbytes <= INLINE_THRESHOLD:
            inline = frames[0] if len(frames) == 1 else dumps(value)
            msg = P.PutObject(number, name, inline, None, nbytes, None, None)
        elif self.conn.shm_prefix is not None:  # one copy, read in place by everyone
            descriptor, path = shared_memory.write(frames, self.conn.shm_prefix, "put")
            msg = P.PutObject(number, name, descriptor, None, nbytes, None, path)
        else:
            store_key = dask_key_of(key)
            holder = self.conn.store_large(store_key, frames)
            msg = P.PutObject(number, name, None, holder, nbytes, store_key, None)
        ref = ObjectRef(key, owned=True)
        self.conn.send(msg)
        return ref

    def cancel(self, refs: Sequence[ObjectRef], force: bool = False,
               recursive: bool = True) -> None:
        """``daskray.cancel``: the head cancels the tasks behind ``refs``."""
        if force:
            refuse_force_on_actor_calls(refs, self._actor_calls)
        self.conn.send(P.CancelRefs([r._key for r in refs], force, recursive))

    # ---------------------------------------------------------------- waiting

    def _subscribe(self, keys: Sequence[RefKey]) -> None:
        me = self.conn.client_id
        new = [k for k in keys if (k[0] != me or k in self._forgotten_own)
               and k not in self._subscribed and k not in self.conn.results]
        if new:
            self._subscribed.update(new)
            self.conn.send(P.SubscribeRefs(new))

    def forget(self, key: RefKey) -> None:
        """This process holds no ObjectRef to ``key`` any more."""
        self._subscribed.discard(key)
        self._actor_calls.discard(key)
        if self._pending_on:
            channel = self._pending_on.pop(key, None)
            if channel is not None:
                channel.gone.append(key)
                if key not in self.conn.results:
                    # it went through the head, and whether it ended is unknown now
                    channel.blind = max(channel.blind, key[1])
        if self.conn.results.pop(key, None) is not None and key[0] == self.conn.client_id:
            self._forgotten_own.add(key)

    def wait(self, refs: Sequence[ObjectRef], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list, list]:
        if not 0 <= num_returns <= len(refs):
            raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}")
        keys = [r._key for r in refs]
        self._subscribe(keys)
        results = self.conn.results
        self.conn.wait_for(lambda: sum(k in results for k in keys) >= num_returns, timeout,
                           awaits=keys)
        ready: list = []
        not_ready: list = []
        for ref in refs:
            (ready if ref._key in results and len(ready) < num_returns else not_ready).append(ref)
        return ready, not_ready

    def get(self, refs: Sequence[ObjectRef], timeout: float | None = None) -> list:
        """The values of ``refs``.  The first of them to fail raises its error at
        once, whatever the others are still doing (Ray's rule).  An object whose
        holder died after the head said where it was is asked for again: the head
        computes it again from its task (lineage) and says where the new copy is,
        or says it is lost, and why."""
        keys = [r._key for r in refs]
        results = self.conn.results
        start = time.monotonic()
        values: dict[int, Any] = {}

        def done() -> bool:
            return all(k in results for k in keys) or any(failed(results.get(k)) for k in keys)

        while True:
            self._subscribe(keys)
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            if not self.conn.wait_for(done, left, awaits=keys):
                missing = sum(1 for k in keys if k not in results)
                raise errors.GetTimeoutError(
                    f"get timed out after {time.monotonic() - start:.1f} s: {missing} of "
                    f"{len(keys)} objects not ready")
            failure = next((results[k] for k in keys if failed(results.get(k))), None)
            if failure is not None:
                raise error_of(failure)
            for i, key in enumerate(keys):
                result = results.get(key)
                if i in values or result is None:
                    continue
                try:
                    values[i] = self._value(result)
                except errors.HolderLostError:
                    if results.get(key) is result:  # not replaced by news meanwhile
                        del results[key]
                    self._subscribed.discard(key)
            if len(values) == len(keys):
                return [values[i] for i in range(len(keys))]

    def _value(self, result: P.RefResult) -> Any:
        if result.error is not None or result.kind is not None:
            raise error_of(result)
        if result.inline is not None:
            return loads(result.inline)
        return self.conn.fetch(result.holder, result.object_id)
