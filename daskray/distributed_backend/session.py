"""Ray's core calls over a ``distributed.Client``: the dask.distributed backend's session.

An ObjectRef ``(owner, number, node)`` is the distributed key ``dask_key_of`` gives
it, so dask graphs that mix refs with collections name the same key.  A call is one
distributed task running :func:`~.worker_side.run_call`; its top-level ObjectRefs are
passed as Futures (distributed resolves them to values, moving the data worker to
worker), refs nested in containers travel as refs and are pinned until the task
finished.  ``put`` scatters the value under its own key (equal values stay separate
objects).  Errors are daskray's: a task whose workers kept dying raises
``WorkerCrashedError``, a cancelled one ``TaskCancelledError``, an object the cluster
no longer knows ``ObjectLostError``.

The one rule that differs from the local runtime: a worker that dies while running a
call re-runs it as distributed decides (``distributed.scheduler.allowed-failures``,
default 3, which is also ``max_retries``' default); ``max_retries`` counts the re-runs
after exceptions when ``retry_exceptions=True``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import time
import traceback
import uuid
from typing import Any, Callable, Sequence

import cloudpickle

from ..backend import ActorSpec
from ..errors import (ClusterError, GetTimeoutError, ObjectLostError, RemoteTraceback,
                      TaskCancelledError, WorkerCrashedError)
from ..refs import ObjectRef, RefKey, collect_pickled_refs, dask_key_of, ref_key_of
from ..runtime.session import refuse_force_on_actor_calls
from . import actors, graphs
from .futures import FutureTable
from .worker_side import (REMOTE_TRACEBACK, CallArguments, carried_error, carries_error,
                          forget_frames, interrupt_calls, leave_worker_pool, note_started,
                          nth_return, run_call, unpicklable)

#: the reason distributed gives every client for a key ``daskray.cancel`` cancelled
CANCEL_REASON = "daskray.cancel"

#: values ``put`` need not search for nested ObjectRefs
_PLAIN = (int, float, complex, str, bytes, bool, type(None))

class DistributedSession:
    """The session of one process (the driver, or a dask worker's tasks) on a
    dask.distributed cluster."""

    #: tells a session of this backend from the others without importing this module
    on_dask = True

    def __init__(self, client: Any, *, in_task: bool = False, owns_client: bool = False) -> None:
        self.client = client
        self.in_task = in_task
        self.owns_client = owns_client
        self.owner = os.urandom(8)
        self._numbers = itertools.count(1)
        self.table = FutureTable(client)
        self._cancelled: set[RefKey] = set()
        #: this process's actor calls still referenced (cancel(force=True) refuses them)
        self._actor_call_keys: set[RefKey] = set()
        #: the driver writes what remote calls print (``output.write_event``)
        self.output_subscribed = False

    # ---------------------------------------------------------------- lifetimes

    def wake(self) -> None:
        """The ref tracker has news: announce the refs received, on the client's loop."""
        try:
            self.client.loop.add_callback(self.table.sync_with_tracker)
        except Exception:  # the client is closing: nothing left to announce to
            pass

    def forget(self, key: RefKey) -> None:
        """This process holds no ObjectRef to ``key`` any more."""
        self.table.release(key)
        self._cancelled.discard(key)
        self._actor_call_keys.discard(key)

    def settle_received(self, since: int, timeout: float = 30.0) -> None:
        """At the end of a task: make sure the scheduler has recorded this process's
        wants of the refs it received since ``since`` (``table.announced``) before the
        task's end lets their senders drop them: its result may hold them."""
        self.table.sync_with_tracker()
        if self.table.announced != since:
            self.barrier(timeout)

    def barrier(self, timeout: float) -> None:
        """Wait until the scheduler processed every message this client sent so far:
        it answers a report request about a key nobody has with "cancelled"."""
        marker = f"daskray-barrier-{uuid.uuid4().hex}"
        from distributed import Future

        future = Future(marker, self.client)
        self.client._send_to_scheduler({"op": "report-key", "key": marker})
        try:
            self._wait([future], timeout)
        except TimeoutError:
            raise ClusterError(
                f"the dask scheduler did not answer within {timeout:.0f} s") from None
        finally:
            future.release()

    # ---------------------------------------------------------------- submitting

    def _call_arguments(self, args: tuple, kwargs: dict) -> tuple[CallArguments, list]:
        """The arguments as distributed gets them: the top-level ObjectRefs as Futures
        (resolved to values there, the data moving worker to worker), the rest opaque."""
        slots, futures = [], []
        clean_args, clean_kwargs = list(args), dict(kwargs)
        for slot, value in itertools.chain(enumerate(args), kwargs.items()):
            if type(value) is ObjectRef:
                slots.append(slot)
                futures.append(self.table.future_of(value._key))
                if type(slot) is int:
                    clean_args[slot] = None
                else:
                    clean_kwargs[slot] = None
        return CallArguments(tuple(clean_args), clean_kwargs, tuple(slots)), futures

    def submit_call(self, func: Callable, table: Any, args: tuple, kwargs: dict,
                    options: dict) -> ObjectRef | list[ObjectRef]:
        number = next(self._numbers)
        name = options.get("name") or getattr(func, "__name__", "task")
        num_returns = options.get("num_returns", 1)
        keys, base_key = self.call_keys(number, num_returns)
        retries = options.get("max_retries", 3)
        exception_retries = (10**6 if retries == -1 else retries) \
            if options.get("retry_exceptions") else 0
        call, inputs = self._call_arguments(args, kwargs)
        with collect_pickled_refs() as pinned:
            try:
                base = self.client.submit(run_call, table.id, table.data, exception_retries, call,
                                          *inputs, key=base_key, pure=False,
                                          **self._placement(options))
            except Exception as exc:
                raise _unpicklable(f"task {name}", (args, kwargs), exc) from exc
        if self.in_task:
            note_started(keys)
        return self.returns(base, keys, name, list(dict.fromkeys(pinned)))

    def call_keys(self, number: int, num_returns: int) -> tuple[list[RefKey], str]:
        """The ObjectRef keys of call ``number``, and the dask key its task runs under
        (its one ref's, or a key of its own whose value the refs take apart)."""
        keys = [(self.owner, number, i) for i in range(num_returns)]
        base_key = dask_key_of(keys[0]) if num_returns == 1 else \
            f"daskray-call-{self.owner.hex()}-{number}"
        return keys, base_key

    def returns(self, base: Any, keys: list[RefKey], name: str,
                pins: list[RefKey]) -> ObjectRef | list[ObjectRef]:
        """The ObjectRefs of a submitted call whose task is ``base``: with
        ``num_returns`` > 1, one small task per value takes it out of the result.
        ``pins`` live until the call ran."""
        if len(keys) == 1:
            futures = [base]
        else:
            futures = [self.client.submit(nth_return, base, i, len(keys), name,
                                          key=dask_key_of(k), pure=False)
                       for i, k in enumerate(keys)]
        for key, future in zip(keys, futures):
            self.table.own(key, future, pins)
        refs = [ObjectRef(k, owned=True) for k in keys]
        return refs[0] if len(keys) == 1 else refs

    def _placement(self, options: dict) -> dict:
        """distributed's ``resources=`` for a call's options; refused at once when no
        worker offers them (the task would wait forever)."""
        resources = dict(options.get("resources") or {})
        if options.get("num_gpus"):
            resources["GPU"] = options["num_gpus"]
        if options.get("num_cpus", 1) > 1:
            resources["CPU"] = options["num_cpus"]
        if not resources:
            return {}
        offered = [w.get("resources") or {} for w in self._workers().values()]
        if not any(all(r.get(name, 0) >= amount for name, amount in resources.items())
                   for r in offered):
            raise ValueError(
                f"no dask worker offers the resources {resources}: start workers that "
                "declare them, e.g. `dask worker ADDRESS --resources \"GPU=1 CPU=4\"` "
                "(num_cpus > 1 asks for the resource CPU)")
        return {"resources": resources}

    def put(self, value: Any) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("daskray.put() of an ObjectRef is not allowed; pass the ref itself")
        key = (self.owner, next(self._numbers), 0)
        try:
            pins = () if isinstance(value, _PLAIN) else nested_refs(value)
            futures = self.client.scatter({dask_key_of(key): value}, hash=False)
        except Exception as exc:
            raise _unpicklable("the value given to put()", value, exc) from exc
        self.table.own(key, futures[dask_key_of(key)], pins)
        return ObjectRef(key, owned=True)

    def cancel(self, refs: Sequence[ObjectRef], force: bool = False,
               recursive: bool = True) -> None:
        """``daskray.cancel``: distributed drops the calls not started; a running one
        gets a KeyboardInterrupt in its thread (``force``: its dask worker restarts),
        and with ``recursive`` cancels the calls it started (see ``interrupt_calls``)."""
        if force:
            refuse_force_on_actor_calls(refs, self._actor_call_keys)
        pending = []
        for ref in refs:
            future = self.table.future_of(ref._key)
            if not future.done():
                self._cancelled.add(ref._key)
                pending.append(future)
        if not pending:
            return
        actors.cancelled(self, refs)
        keys = [f.key for f in pending]
        running_on = [w for w, doing in self.client.processing().items()
                      if not set(keys).isdisjoint(doing)] if force else []
        self._cancel_for_everyone(pending)
        # distributed lets a running task run on: stop it where it runs
        self.client.run(interrupt_calls, keys, recursive, on_error="ignore")
        if running_on:  # the nanny starts the worker's process again
            self.client.restart_workers(running_on, raise_for_error=False)

    def cancel_keys(self, keys: Sequence[RefKey], recursive: bool) -> None:
        """Cancel the calls of ``keys`` (this process made them; it may hold no
        ObjectRef of them any more): how a cancelled call cancels those it started."""
        pending = [f for f in (self.table.future_of(k) for k in keys) if not f.done()]
        self._cancelled.update(keys)
        if pending:
            self._cancel_for_everyone(pending)
            self.client.run(interrupt_calls, [f.key for f in pending], recursive,
                            on_error="ignore")

    def _cancel_for_everyone(self, futures: list) -> None:
        """Cancel ``futures`` for every client that wants them (``force``): tasks
        waiting in ``get()`` for one, elsewhere, raise TaskCancelledError at once (see
        ``_error``), even while the cancelled task itself is still stuck in C code."""
        self.client.cancel(futures, force=True, reason=CANCEL_REASON,
                           msg="daskray.cancel() of it, or of a task it depends on")

    # ---------------------------------------------------------------- waiting

    def get(self, refs: Sequence[ObjectRef], timeout: float | None = None) -> list:
        futures = [self.table.future_of(r._key) for r in refs]
        start = time.monotonic()
        # objects already made need no task to run: keep the worker's thread slot
        waiting = leave_worker_pool() if not all(f.done() for f in futures) \
            else contextlib.nullcontext()
        with waiting:
            if timeout is not None:
                try:
                    self._wait_all_or_failure(futures, timeout)
                except TimeoutError:
                    missing = sum(1 for f in futures if not f.done())
                    raise GetTimeoutError(
                        f"get timed out after {time.monotonic() - start:.1f} s: {missing} "
                        f"of {len(futures)} objects not ready") from None
            try:
                return self.client.gather(futures)
            except BaseException as exc:
                exc = self._earliest_failure(exc, futures)
                error = self._error(_unshared(exc, futures))
                raise error from _cause(exc, error)

    def _earliest_failure(self, exc: BaseException, futures: list) -> BaseException:
        """What ``gather`` raises for the first failed Future in ``futures``' order,
        when ``exc`` is a failed Future's: gather checks its Futures in the order of a
        set, and ``get`` of a list raises the failure of its earliest ref, as Ray does."""
        from distributed.client import FutureCancelledError

        failed = [f for f in futures if f.status in ("error", "cancelled")]
        a_failure = isinstance(exc, FutureCancelledError) or any(
            f.status == "error" and f.exception() is exc for f in failed)
        if len(failed) < 2 or not a_failure:  # an interrupt, a lost connection: itself
            return exc
        try:
            self.client.gather([failed[0]])
        except BaseException as earliest:  # noqa: BLE001 - it is what is raised, instead
            return earliest
        return exc

    def wait(self, refs: Sequence[ObjectRef], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list, list]:
        if not 0 <= num_returns <= len(refs):
            raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}")
        futures = [self.table.future_of(r._key) for r in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        with leave_worker_pool():
            while sum(f.done() for f in futures) < num_returns:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    self._wait([f for f in futures if not f.done()], left, "FIRST_COMPLETED")
                except TimeoutError:
                    break
        ready: list = []
        not_ready: list = []
        for ref, future in zip(refs, futures):
            (ready if future.done() and len(ready) < num_returns else not_ready).append(ref)
        return ready, not_ready

    def _wait_all_or_failure(self, futures: list, timeout: float) -> None:
        """Wait until every one of ``futures`` is done or one of them failed (``get``
        raises the first failure without waiting for the others, as ``gather`` does);
        TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [f for f in futures if not f.done()]
            if not pending or any(f.status in ("error", "cancelled") for f in futures):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._wait(pending, left, "FIRST_COMPLETED")

    def _wait(self, futures: list, timeout: float | None,
              return_when: str = "ALL_COMPLETED") -> None:
        """``distributed.wait`` on this session's client (not dask's default one)."""
        from distributed.client import FuturesCancelledError, _wait

        try:
            self.client.sync(_wait, futures, timeout=timeout, return_when=return_when)
        except FuturesCancelledError as exc:  # done all the same: gather tells why
            forget_frames(exc)
        except TimeoutError as exc:
            forget_frames(exc)
            raise

    def _error(self, exc: BaseException) -> BaseException:
        """daskray's error for what distributed raised from a gather."""
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        carried = carried_error(exc)
        if carried is not None:
            return carried
        if isinstance(exc, KilledWorker):
            return WorkerCrashedError(
                f"the dask workers running task {exc.task!r} died (distributed gave up after "
                f"distributed.scheduler.allowed-failures deaths; last: {exc.last_worker})")
        if isinstance(exc, FutureCancelledError):
            key = ref_key_of(exc.key)
            if key in self.table.adopted and key not in self._cancelled \
                    and getattr(exc, "reason", None) != CANCEL_REASON:
                # a ref received from elsewhere whose key the scheduler no longer has
                return ObjectLostError(
                    f"the object {exc.key!r} is gone from the dask cluster (it was released, "
                    "or its data was lost); compute it again")
            return TaskCancelledError(
                f"task {exc.key!r} was cancelled (daskray.cancel, of it or of a task it "
                "depends on)")
        return exc

    # ---------------------------------------------------------------- for graphs

    def new_number(self) -> int:
        """A number no other object of this session has (``graphs.persist`` names
        its results' ObjectRefs with it)."""
        return next(self._numbers)

    def waiting(self) -> contextlib.AbstractContextManager:
        """:func:`leave_worker_pool`, for ``graphs`` (which this module imports)."""
        return leave_worker_pool()

    def daskray_error(self, exc: BaseException) -> BaseException:
        """What to raise for ``exc`` from a gather: daskray's error, with the task's
        remote traceback as ``__cause__``."""
        error = self._error(exc)
        error.__cause__ = _cause(exc, error)
        return error

    # ---------------------------------------------------------------- the cluster

    def _workers(self) -> dict:
        return self.client.scheduler_info(n_workers=-1).get("workers", {})

    def resources(self) -> tuple[dict, dict]:
        """(total, free): ``CPU`` is a worker's threads, or the CPU resource it
        declares; other dask resources by name."""
        total: dict[str, float] = {"CPU": 0.0}
        free: dict[str, float] = {"CPU": 0.0}
        for info in self._workers().values():
            offered = _offered(info)
            busy = float((info.get("metrics") or {}).get("executing", 0))
            for name, amount in offered.items():
                total[name] = total.get(name, 0.0) + amount
                spare = max(0.0, amount - busy) if name == "CPU" else amount
                free[name] = free.get(name, 0.0) + spare
        return total, free

    def nodes(self) -> list[dict]:
        """One entry per dask worker, in Ray's ``nodes()`` shape."""
        out = []
        for address, info in sorted(self._workers().items()):
            out.append({"NodeID": address, "Alive": True,
                        "NodeManagerAddress": info.get("host", ""),
                        "NodeManagerHostname": str(info.get("name", address)),
                        "Resources": _offered(info)})
        return out

    def compute(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """``daskray.get(dsk, keys)``: a dask graph's results (see ``graphs``)."""
        return graphs.get(self, dsk, keys, **kwargs)

    def persist(self, collections: list, optimize_graph: bool = True, **kwargs: Any) -> list:
        """``dask.persist``: the collections with their data kept on the cluster."""
        return graphs.persist(self, collections, optimize_graph, **kwargs)

    def runtime_ids(self) -> dict:
        """What ``get_runtime_context()`` tells here: in a task, its dask worker and
        key; in the driver, the client's id as the job's."""
        from distributed.worker import thread_state

        in_actor = actors.runtime_ids(self)
        if in_actor is not None:
            return in_actor
        key = getattr(thread_state, "key", None) if self.in_task else None
        worker = None
        if self.in_task:
            from distributed import get_worker

            worker = get_worker().address
        return {"in_worker": self.in_task, "worker_id": worker, "actor_id": None,
                "task_id": key, "job_id": None if self.in_task else self.client.id,
                "node_id": worker or "driver"}

    def dashboard_url(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def record_task_stream(self) -> None:
        """Have the scheduler record its task stream from now on (distributed's
        ``TaskStreamPlugin``, which ``Client.get_task_stream`` installs on first use)."""
        self.client.get_task_stream(start=time.time())

    def task_events(self) -> list[tuple]:
        """The task runs the scheduler's task stream holds (its own bounded
        buffer), as (key, worker, start, end, state), times from ``time.time()``."""
        events = []
        for run in self.client.get_task_stream():
            for part in run.get("startstops", ()):
                if part.get("action") == "compute":
                    events.append((str(run["key"]), str(run.get("worker", "?")), part["start"],
                                   part["stop"], "erred" if run.get("status") == "error"
                                   else "finished"))
        return sorted(events, key=lambda e: e[3])

    # ---------------------------------------------------------------- actors

    def create_actor(self, actor_class: ActorSpec, args: tuple, kwargs: dict) -> Any:
        return actors.create_actor(self, actor_class, args, kwargs)

    def call_actor(self, handle: Any, method: str, args: tuple, kwargs: dict,
                   options: dict) -> ObjectRef | list[ObjectRef]:
        refs = actors.call_actor(self, handle, method, args, kwargs, options)
        self._actor_call_keys.update(r._key for r in (refs if isinstance(refs, list) else [refs]))
        return refs

    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        if not no_restart:
            raise ClusterError(
                "daskray.kill(actor, no_restart=False) needs daskray's own runtime: on the "
                "dask.distributed backend an actor restarts only when its dask worker dies")
        actors.kill_actor(self, handle)

    def get_actor(self, name: str, timeout: float | None = None, *,
                  namespace: str | None = None) -> Any:
        """The handle of the actor named ``name`` in ``namespace``, or None."""
        return actors.get_actor(self, name, namespace)

    def named_actors(self, all_namespaces: bool = False) -> list:
        """See ``daskray.util.list_named_actors``."""
        return actors.named_actors(self, all_namespaces)

    def set_namespace(self, namespace: str) -> None:
        """The driver's namespace (``init(namespace=...)`` or an anonymous one)."""
        actors.set_namespace(self, namespace)

    def exit_actor(self) -> None:
        """``exit_actor()`` in an actor's method: end that actor, for good."""
        actors.exit_actor()

    def close(self) -> None:
        """End this session: release its objects; close the client if it opened it."""
        actors.close(self)
        self.table.clear()
        if self.owns_client:
            self.client.close()
        elif self.output_subscribed:  # the caller's client lives on: it stops printing
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic("daskray-output")


def _offered(worker_info: dict) -> dict[str, float]:
    """What one dask worker offers in Ray's terms: its dask resources, with ``CPU``
    its thread count unless it declares a CPU resource of its own."""
    offered = {"CPU": float(worker_info.get("nthreads", 0))}
    offered.update({k: float(v) for k, v in (worker_info.get("resources") or {}).items()})
    return offered


def _unshared(exc: BaseException, futures: list) -> BaseException:
    """The exception to raise for ``exc``, from ``gather``: a copy when it is the one
    distributed keeps for an erred Future.  Raised itself, it would take the frames
    it passes through into its traceback, and they hold the refs waited for: a cycle
    through the client's Futures that keeps those refs -- and the actors their calls
    pin -- alive for good.  The copy carries the task's traceback from its worker."""
    stored = next((f for f in futures if f.status == "error" and f.exception() is exc), None)
    if stored is None:  # not a task's exception (an interrupt, a lost connection)
        return exc
    exc.__traceback__ = None  # drop the frames distributed's raise gave it
    try:
        own = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied: itself
        return exc
    return own.with_traceback(stored.traceback())


def _unpicklable(what: str, value: Any, exc: BaseException) -> BaseException:
    """A SerializationError naming what cannot be pickled, when that is why
    distributed refused ``value``; else ``exc`` itself."""
    try:
        cloudpickle.dumps(value)
    except Exception as cause:
        return unpicklable(what, cause)
    return exc


def nested_refs(value: Any) -> list[RefKey]:
    """The keys of the ObjectRefs inside ``value`` (found by pickling it with its
    large buffers left out, so an array costs no copy)."""
    with collect_pickled_refs() as found:
        cloudpickle.dumps(value, protocol=5, buffer_callback=lambda _buffer: None)
    return list(dict.fromkeys(found))


def _cause(exc: BaseException, error: BaseException) -> BaseException | None:
    """The ``__cause__`` of ``error``, raised for ``exc`` from a gather: its own when
    the task's error carried it (``carried_error``), else the task's traceback."""
    return error.__cause__ if carries_error(exc) else _remote_cause(exc)


def _remote_cause(exc: BaseException) -> BaseException | None:
    """The traceback a task's exception had on its worker, as a RemoteTraceback."""
    text = exc.__dict__.get(REMOTE_TRACEBACK) if hasattr(exc, "__dict__") else None
    if text is None and exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(exc))
    return None if text is None else RemoteTraceback(text)
