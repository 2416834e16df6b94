"""daskray's actors on the dask.distributed backend: the caller's side.

An actor is a distributed actor hosting daskray's own (``actor_host.ActorHost``),
submitted under its creation ObjectRef's key: the actor lives while any handle, in any
process, holds that ref (the FutureTable turns ref counts into the scheduler's wants).

A method call is an ordinary distributed task (:func:`run_actor_call`) under the
call's ObjectRef key: it resolves the call's top-level ObjectRefs itself (a failed one
still frees the caller's turn at the host), sends the call to the host (worker to
worker, distributed's comm layer) and returns the reply.  Each caller numbers its calls
to an actor, and the host runs them in that order.

When the host's worker dies distributed marks the creation key erred; the first caller
to notice asks distributed to compute it again (under a scheduler lock, counting the
restart in the key's metadata), which makes a new host on another worker: a restart,
or a dead host once ``max_restarts`` is used up.  A call in flight on the dead worker is
sent again ``max_task_retries`` times, else raises ``ActorDiedError``; the host counts
the times (see ``ActorHost.call``), also for a call whose task died with the host and
that distributed runs again.  A call's task goes wherever distributed puts it: worker
restrictions would hang it for good when every worker they name is gone (distributed
never gives a task restricted to workers that left to the ones that joined).

Names are datasets published on the scheduler (``daskray-actor:["NAMESPACE", "NAME"]``:
the creation Future and the pickled handle), which refuses a second actor of the same
name and keeps the actor while published; detached actors without a name are published
too.  A driver publishes its namespace under its owner id (``daskray-namespace:OWNER``),
so the code of its calls, which runs under keys naming that owner, uses it too; an
actor's methods use the namespace it was created in.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any, Sequence

import cloudpickle
from distributed import Lock, get_worker
from distributed.comm.core import CommClosedError
from distributed.core import send_recv

from ..actors import concurrency_of
from ..actors.host import is_async_class
from ..backend import ActorSpec as ActorClassSpec
from ..errors import ActorDiedError, ActorNameTakenError, ClusterError
from ..refs import ObjectRef, RefKey, collect_pickled_refs, dask_key_of, ref_key_of
from .actor_host import (KILLED, MAX_RESTARTS, RESTARTS, ActorHost, ActorSpec, ExitActor,
                         current_host, mark_killed, resolve_arguments, restarts_used_up,
                         running)
from .worker_side import (forget_frames, leave_worker_pool, task_key, unpicklable,
                          task_session)

NAME_PREFIX = "daskray-actor:"
DETACHED_PREFIX = "daskray-actor-detached:"
NAMESPACE_PREFIX = "daskray-namespace:"
#: the keys of calls with many returns: ``daskray-call-OWNER-NUMBER``
_CALL_PREFIX = "daskray-call-"
#: how long a caller waits for a host to come back after its worker died
RESTART_TIMEOUT = 120.0
#: the name of the scheduler lock a restart is decided under
RESTART_LOCK = "daskray-actor-restart"
#: how often a call waiting for its arguments looks whether its actor died
WATCH_INTERVAL = 0.1
#: how long a caller tries to reach a host's worker before asking the scheduler again
CONNECT_TIMEOUT = 10.0
_FOREVER = 1_000_000


class _NotDelivered(Exception):
    """The host's worker could not be reached: the call did not get there."""


class _Lost(Exception):
    """The connection to the host's worker broke while the call was there."""


class ActorCalls:
    """One session's actor bookkeeping: call numbers per actor, names it published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seqs: dict[str, itertools.count] = {}
        #: names (datasets) of non-detached actors this session made: unpublished at its end
        self.names: list[str] = []
        #: the driver's namespace (None in a task's session: see namespace_of)
        self.namespace: str | None = None
        #: in a task's session: the namespaces of the drivers whose calls ran here
        self.drivers: dict[bytes, str] = {}
        #: call key -> (creation key, seq) of calls not known to be finished
        self.calls: dict[RefKey, tuple[RefKey, int]] = {}

    def next_seq(self, actor_id: str) -> int:
        with self._lock:
            counter = self._seqs.setdefault(actor_id, itertools.count(1))
            return next(counter)


def state_of(session: Any) -> ActorCalls:
    """The actor bookkeeping of ``session``, made on first use."""
    state = session.__dict__.get("_actor_calls")
    if state is None:
        state = session.__dict__.setdefault("_actor_calls", ActorCalls())
    return state


# ---------------------------------------------------------------- creating


def create_actor(session: Any, actor_class: ActorClassSpec, args: tuple, kwargs: dict) -> Any:
    """Submit the actor's host; its handle at once (the constructor runs there)."""
    opts = actor_class._options
    if opts.get("name") is not None and opts.get("lifetime") != "detached" \
            and state_of(session).namespace is None:
        raise ClusterError(
            f"actor {opts['name']!r}: on the dask.distributed backend a named actor created "
            "inside a task or an actor cannot end with its creator (Ray's fate sharing "
            "needs daskray's own runtime); create it with lifetime='detached' (and "
            "daskray.kill it when done), or create it in the driver")
    namespace = namespace_of(session, opts.get("namespace"))
    number = next(session._numbers)
    key = (session.owner, number, 0)
    handle = actor_class.handle_for(actor_class.new_actor_id(session.owner),
                                    ObjectRef(key, owned=True))
    name = opts.get("name")
    detached = opts.get("lifetime") == "detached"
    with collect_pickled_refs() as pinned:
        arguments = _pickled((args, kwargs), f"the arguments of {actor_class._cls.__name__}()")
    spec = ActorSpec(handle._actor_id, actor_class._cls.__name__, actor_class._init_table.id,
                     actor_class._init_table.data, arguments,
                     {**_host_options(actor_class, handle._actor_id), "namespace": namespace})
    future = session.client.submit(ActorHost, spec, dask_key_of(key), actor=True,
                                   key=dask_key_of(key), pure=False,
                                   **session._placement({"resources": actor_class.resources()}
                                                        if actor_class.resources() else {}))
    session.table.own(key, future, list(dict.fromkeys(pinned)))
    if name is not None:
        return _publish_name(session, _name_key(namespace, name), future, handle,
                             opts.get("get_if_exists", False), detached)
    if detached:
        session.client.publish_dataset(**{DETACHED_PREFIX + handle._actor_id: [future]})
    return handle


def _host_options(actor_class: ActorClassSpec, actor_id: str) -> dict:
    graph = actor_class.graph_options(actor_id, b"")
    opts = actor_class._options
    groups = concurrency_of(actor_class)  # type: ignore[arg-type]
    return {"max_restarts": graph["max_restarts"], "max_task_retries": graph["max_task_retries"],
            "max_concurrency": groups.get("", graph["max_concurrency"]),
            "concurrency_groups": {group: n for group, n in groups.items() if group},
            "name": opts.get("name"),
            "async": is_async_class(actor_class._cls)}


def _name_key(namespace: str, name: str) -> str:
    """The dataset a named actor is published as."""
    return NAME_PREFIX + json.dumps([namespace, name])


def _publish_name(session: Any, key: str, future: Any, handle: Any, get_if_exists: bool,
                  detached: bool) -> Any:
    """Claim the name (dataset ``key``) for the new actor on the scheduler; a name
    taken meanwhile gives the existing actor (``get_if_exists``) or ``ValueError``."""
    try:
        session.client.publish_dataset(**{key: [future, cloudpickle.dumps(handle)]})
    except KeyError:
        found = session.client.get_dataset(key, default=None) if get_if_exists else None
        if found is not None:
            return cloudpickle.loads(found[1])
        namespace, name = json.loads(key[len(NAME_PREFIX):])
        raise ActorNameTakenError(
            f"an actor named {name!r} exists already in namespace {namespace!r}; use "
            "daskray.get_actor(name), or get_if_exists=True") from None
    if not detached:
        state_of(session).names.append(key)
    return handle


def get_actor(session: Any, name: str, namespace: str | None = None) -> Any:
    """The handle of the actor published as ``name`` in ``namespace`` (None: the
    caller's, see :func:`namespace_of`), or None."""
    found = session.client.get_dataset(_name_key(namespace_of(session, namespace), name),
                                       default=None)
    return None if found is None else cloudpickle.loads(found[1])


def named_actors(session: Any, all_namespaces: bool = False) -> list:
    """See ``Session.named_actors``: from the datasets published on the scheduler."""
    pairs = [json.loads(key[len(NAME_PREFIX):]) for key in session.client.list_datasets()
             if isinstance(key, str) and key.startswith(NAME_PREFIX)]
    if all_namespaces:
        return [{"name": name, "namespace": namespace} for namespace, name in sorted(pairs)]
    mine = namespace_of(session, None)
    return sorted(name for namespace, name in pairs if namespace == mine)


def set_namespace(session: Any, namespace: str) -> None:
    """The driver's namespace: published under its owner id for its calls' code."""
    state_of(session).namespace = namespace
    session.client.publish_dataset(**{NAMESPACE_PREFIX + session.owner.hex(): namespace},
                                   override=True)


def namespace_of(session: Any, given: str | None) -> str:
    """The namespace a name means: the one given; else the driver's; in an actor's
    method, the actor's; in a call's code, the namespace of the driver that made the
    call (published by :func:`set_namespace`)."""
    if given is not None:
        return given
    own = state_of(session).namespace
    if own is not None:
        return own
    host = current_host()
    if host is not None and host.spec.options.get("namespace") is not None:
        return host.spec.options["namespace"]
    owner = _owner_of_key(task_key())
    found = None if owner is None else state_of(session).drivers.get(owner)
    if found is None and owner is not None:
        found = session.client.get_dataset(NAMESPACE_PREFIX + owner.hex(), default=None)
        if found is not None:  # a driver's namespace never changes
            state_of(session).drivers[owner] = found
    if found is None:
        raise ClusterError(
            "on the dask.distributed backend only the driver's own calls, and the methods "
            "of actors, know the driver's namespace (a call made by a call does not); "
            "pass namespace= explicitly")
    return found


def _owner_of_key(key: Any) -> bytes | None:
    """The session that made the call running under dask key ``key``, or None."""
    ref = ref_key_of(key)
    if ref is not None:
        return ref[0]
    if isinstance(key, str) and key.startswith(_CALL_PREFIX):
        try:
            return bytes.fromhex(key[len(_CALL_PREFIX):].rsplit("-", 1)[0])
        except ValueError:
            return None
    return None


def _pickled(value: Any, what: str) -> bytes:
    try:
        return cloudpickle.dumps(value, protocol=5)
    except Exception as exc:
        raise unpicklable(what, exc, "actor") from exc


# ---------------------------------------------------------------- calling


def call_actor(session: Any, handle: Any, method: str, args: tuple, kwargs: dict,
               options: dict) -> ObjectRef | list[ObjectRef]:
    """Submit one method call as a task under its ObjectRef's key."""
    num_returns = options.get("num_returns", 1)
    label = f"{handle._class_name}.{method}"
    with collect_pickled_refs() as pinned:
        payload = _pickled((args, kwargs), f"the arguments of {label}()")
    seq = state_of(session).next_seq(handle._actor_id)
    number = next(session._numbers)
    keys, base_key = session.call_keys(number, num_returns)
    creation = handle._creation._key
    group, _ = handle._group_of(method, options.get("concurrency_group"))
    base = session.client.submit(run_actor_call, creation, session.owner, seq, method, payload,
                                 group, key=base_key, pure=False)
    calls = state_of(session).calls
    calls[keys[0]] = (creation, seq)
    base.add_done_callback(lambda _f, k=keys[0]: calls.pop(k, None))
    # the call keeps its actor alive even if the caller drops the handle at once
    return session.returns(base, keys, label, list(dict.fromkeys([*pinned, creation])))


def cancelled(session: Any, refs: Sequence[ObjectRef]) -> None:
    """``daskray.cancel`` of actor calls: their hosts stop waiting for them, so the
    caller's later calls still run."""
    calls = state_of(session).calls
    for ref in refs:
        found = calls.pop(ref._key, None)
        if found is not None:
            try:
                _send(session, found[0], "skip", session.owner, found[1], True)
            except (_NotDelivered, _Lost, ActorDiedError):
                pass  # no host to tell: none waits


def run_actor_call(creation: RefKey, caller: bytes, seq: int, method: str,
                   payload: bytes, group: str | None = None) -> Any:
    """On a dask worker: one method call (in concurrency ``group``), from its
    arguments to its value."""
    session = task_session()
    with session.table.borrowed(creation) as actor:
        return _run_actor_call(session, actor, caller, seq, method, payload, group)


def _run_actor_call(session: Any, actor: Any, caller: bytes, seq: int, method: str,
                    payload: bytes, group: str | None) -> Any:
    """``run_actor_call`` with the actor's creation Future in hand."""
    since = session.table.announced
    session.table.sync_with_tracker()
    try:
        args, kwargs = cloudpickle.loads(payload)
        if any(type(v) is ObjectRef for v in [*args, *kwargs.values()]):
            _await_arguments(session, actor, args, kwargs)
            args, kwargs = resolve_arguments(session, args, kwargs)
            payload = cloudpickle.dumps((args, kwargs), protocol=5)
    except BaseException:
        try:  # the caller's later calls must not wait for this one
            _send_to(session, actor, "skip", caller, seq)
        except (_NotDelivered, _Lost, ActorDiedError):
            pass
        raise
    reply = _deliver(session, actor, caller, seq, method, payload, group)
    if reply[0] == "error":
        raise cloudpickle.loads(reply[1])
    value = cloudpickle.loads(reply[1])
    session.settle_received(since)
    if reply[2]:  # refs in the value: this process wants them now, the host may let go
        try:
            _send_to(session, actor, "release", caller, seq)
        except (_NotDelivered, _Lost, ActorDiedError):
            pass
    return value


def _await_arguments(session: Any, actor: Any, args: tuple, kwargs: dict) -> None:
    """Wait until the call's top-level ObjectRefs are made, watching its actor: when
    its worker dies meanwhile and the actor does not come back (restarts used up,
    killed), the call fails at once rather than once its arguments are there."""
    refs = [v for v in (*args, *kwargs.values()) if type(v) is ObjectRef]
    futures = [session.table.future_of(r._key) for r in refs]
    with leave_worker_pool():
        while True:
            pending = [f for f in futures if not f.done()]
            if not pending:
                return
            if actor.status == "error":  # its worker died: made again, or dead for good
                host_address(session, actor)
            try:
                session._wait(pending, WATCH_INTERVAL, "FIRST_COMPLETED")
            except TimeoutError:
                pass


def _deliver(session: Any, actor: Any, caller: bytes, seq: int, method: str,
             payload: bytes, group: str | None) -> tuple:
    """Send the call to the actor's host until it answers.  A call whose host died
    while it ran is sent to the restarted host, which runs it again if its
    ``max_task_retries`` allow (and else answers ActorDiedError): the host is told how
    many times it was lost before, and where this task runs (when it is the host's
    worker, a death takes this task with it, and distributed runs it again)."""
    lost = 0
    here = get_worker().address
    while True:
        address = host_address(session, actor)
        try:
            return _execute(session, address, actor.key, "call", caller, seq, method, payload,
                            task_key(), here, lost, group)
        except _NotDelivered:
            _wait_for_news(session, actor, address)
        except _Lost:
            _wait_for_news(session, actor, address)
            lost += 1


def _send(session: Any, creation: RefKey, function: str, *args: Any) -> Any:
    """One request to the actor of ``creation``'s host (waiting for it to be up)."""
    with session.table.borrowed(creation) as actor:
        return _send_to(session, actor, function, *args)


def _send_to(session: Any, actor: Any, function: str, *args: Any) -> Any:
    """One request to the host of the actor whose creation Future is ``actor``."""
    return _execute(session, host_address(session, actor), actor.key, function, *args)


def _execute(session: Any, address: str, key: str, function: str, *args: Any) -> Any:
    """``function(*args)`` on the host of the actor ``key`` at ``address``, this
    thread off the worker's pool while it waits."""
    try:
        with leave_worker_pool():
            return session.client.sync(_execute_async, session.client.rpc, address, key,
                                       function, list(args))
    except (_NotDelivered, _Lost) as exc:  # handled by the callers: keep no frames alive
        forget_frames(exc)
        raise


async def _execute_async(pool: Any, address: str, key: str, function: str, args: list) -> Any:
    try:
        comm = await pool.connect(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise _NotDelivered(str(exc)) from None
    try:
        reply = await send_recv(comm, op="actor_execute", actor=key, function=function,
                                args=args, kwargs={})
    except (OSError, CommClosedError) as exc:
        comm.abort()
        raise _Lost(str(exc)) from None
    pool.reuse(address, comm)
    if reply.get("status") != "OK":
        exc = reply.get("exception")
        if isinstance(exc, KeyError):  # the worker no longer hosts it: ask again where
            raise _NotDelivered(str(exc))
        raise exc
    return reply["result"]


# ---------------------------------------------------------------- where the host is


def host_address(session: Any, actor: Any) -> str:
    """The address of the worker hosting the actor whose creation Future is
    ``actor``, once it is up; an actor whose worker died is made again first, or
    raises ActorDiedError when it may not be (restarts used up, killed)."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        with leave_worker_pool():
            session._wait([actor], None)
        if actor.status == "finished":
            try:
                return actor.result()._address
            except Exception:  # noqa: BLE001 - its worker died just now: look again
                continue
        if actor.status == "cancelled":
            raise ActorDiedError("the actor is gone from the dask cluster (its key was "
                                 "released or cancelled); create it again")
        why = _restart(session, actor)
        if why is not None:
            raise ActorDiedError(f"the actor is dead ({why})")
        _wait_until(lambda: actor.status != "error", deadline,
                    "the actor's host did not come back after its worker died")


def _wait_for_news(session: Any, actor: Any, address: str) -> None:
    """After the host at ``address`` could not be reached: wait until the scheduler
    says where it is now (or that it died)."""
    def news() -> bool:
        if actor.status != "finished":
            return True
        try:
            return session.client.who_has([actor]).get(actor.key) != (address,)
        except Exception:  # noqa: BLE001 - ask again
            return False
    _wait_until(news, time.monotonic() + RESTART_TIMEOUT,
                f"the dask worker {address} hosting the actor cannot be reached")


def _wait_until(done: Any, deadline: float, what: str) -> None:
    """Poll the client's view of the cluster until ``done()``; it changes by itself
    (the scheduler's reports), so this only checks now and then."""
    pause = 0.01
    with leave_worker_pool():
        while not done():
            if time.monotonic() > deadline:
                raise ActorDiedError(f"{what} within {RESTART_TIMEOUT:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _restart(session: Any, future: Any) -> str | None:
    """After the actor's worker died: ask distributed to compute the erred creation
    key again (a new host), once, as many callers may notice the death at the same
    time.  Why the actor is dead for good instead (killed, or its restarts used up:
    no host is made then), or None."""
    client = session.client
    why = _death(client, future.key)
    if why is not None:
        return why
    # one lock for every actor: restarts are rare, and a lock per actor would stay on
    # the scheduler for good (distributed keeps each lock's name)
    with leave_worker_pool(), Lock(RESTART_LOCK, client.scheduler, client.loop):
        status = client.sync(client.scheduler.get_task_status, keys=[future.key])
        if status.get(future.key) != "erred":
            return None
        metadata = client.get_metadata([future.key], default=None) or {}
        restarts = metadata.get(RESTARTS, 0) + 1
        allowed = metadata.get(MAX_RESTARTS)  # None: its first host never came up
        why = None if allowed is None else restarts_used_up(restarts, allowed)
        if why is not None:
            mark_killed(client, future.key, why)
            return why
        client.set_metadata([future.key, RESTARTS], restarts)
        client.retry([future])
        return None


def _death(client: Any, key: str) -> str | None:
    """Why the actor of ``key`` ended for good, as recorded on the scheduler, or None."""
    return client.get_metadata([key, KILLED], default=None)


# ---------------------------------------------------------------- ending


def kill_actor(session: Any, handle: Any) -> None:
    """End the actor for good: no restart; calls in flight and later ones raise
    ActorDiedError; its name is free again."""
    creation = handle._creation._key
    future = session.table.future_of(creation)
    mark_killed(session.client, future.key, "killed with daskray.kill()")
    name = None
    if future.status == "finished":
        try:
            name = _execute(session, future.result()._address, future.key, "stop",
                            "killed with daskray.kill()")
        except (_NotDelivered, _Lost):
            pass  # its worker died: the host made again starts dead
    named = _published_names(session, name, handle._actor_id) if name else []
    for dataset in named + [DETACHED_PREFIX + handle._actor_id]:
        try:
            session.client.unpublish_dataset(dataset)
        except KeyError:
            pass


def _published_names(session: Any, name: str, actor_id: str) -> list[str]:
    """The datasets publishing actor ``actor_id`` as ``name`` (in whichever namespace)."""
    found = []
    for key in session.client.list_datasets():
        if isinstance(key, str) and key.startswith(NAME_PREFIX) \
                and json.loads(key[len(NAME_PREFIX):])[1] == name:
            published = session.client.get_dataset(key, default=None)
            if published is not None and cloudpickle.loads(published[1])._actor_id == actor_id:
                found.append(key)
    return found


def exit_actor() -> None:
    """``exit_actor()`` in a method: end its actor (the host catches this)."""
    if current_host() is None:
        raise TypeError("exit_actor() ends the actor it is called in: call it from a "
                        "method of an actor")
    raise ExitActor()


def close(session: Any) -> None:
    """The session ends: the names of its non-detached actors are free again (the
    actors end with their last handle, the driver's), so is its namespace's record."""
    state = state_of(session)
    datasets = list(state.names)
    if state.namespace is not None:
        datasets.append(NAMESPACE_PREFIX + session.owner.hex())
    for dataset in datasets:
        try:
            session.client.unpublish_dataset(dataset)
        except Exception:  # noqa: BLE001 - killed meanwhile, or the scheduler is gone
            pass


def runtime_ids(session: Any) -> dict | None:
    """Inside an actor's method: its worker and actor; else None."""
    host = current_host()
    if host is None:
        return None
    return {"in_worker": True, "worker_id": host.worker, "actor_id": host.spec.actor_id,
            "task_id": getattr(running, "task", None), "job_id": None, "node_id": host.worker}
