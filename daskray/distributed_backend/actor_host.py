"""The worker side of a daskray actor on the dask.distributed backend: its host.

distributed's own actors run every sync method on one thread per worker and promise
no order, so daskray keeps its actor *inside* one: an :class:`ActorHost` is the
distributed actor (its key is the creation ObjectRef's key), and the user's instance
lives in threads of the host's own -- ``max_concurrency`` threads for calls (and as
many as its limit for each of Ray's ``concurrency_groups``), or an event loop thread
for a class with ``async def`` methods, where its sync methods run too -- so one actor
blocked in ``get()`` stalls nothing else on its worker.

Calls reach the host through ``call(caller, seq, method, payload, ...)`` (an ``async def``
run on the worker's event loop by distributed's ``actor_execute``): each caller
numbers its calls to this actor from 1, and the host hands them to its threads in
that order; a call that arrives early waits here, on the loop, for its turn.  A
restarted host takes the first number it sees from each caller as that caller's
start.  Replies are pickled here: ``("ok", bytes, has_refs)`` or ``("error", bytes)``.

Restarts and death are kept on the dask scheduler (the creation key's metadata), so a
new host on another worker knows them: ``restarts`` (how many times the actor was
re-created after its worker died) and ``killed`` (why it ended for good).  A host
whose actor is dead still answers, every call with ``ActorDiedError``.

An actor that ends gracefully (``exit_actor()``, ``__ray_terminate__``, its last handle
gone) runs its ``__ray_shutdown__`` and then the atexit handlers it registered (the
worker's process lives on); ``kill()`` ends it without either, as Ray's does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import inspect
import threading
import traceback
from typing import Any

import cloudpickle
from distributed import get_worker

from ..actors.host import bound_method, capture_atexit, run_atexit
from ..errors import ActorDiedError, ActorError, TaskCancelledError
from ..refs import ObjectRef, collect_pickled_refs
from .worker_side import REMOTE_TRACEBACK, function_of, leave_worker_pool, task_session

#: the creation key's metadata fields the hosts of one actor and its callers share on
#: the scheduler: how many restarts it had, why it ended (if it did), how many it allows
RESTARTS, KILLED, MAX_RESTARTS = "daskray-restarts", "daskray-killed", "daskray-max-restarts"
#: a call key's metadata field: how many times the call reached a host on its own task's
#: worker (a death there takes both, and distributed runs the task again)
DELIVERED = "daskray-delivered"

#: in a thread running an actor's method: ``.host``, the ActorHost it belongs to
running = threading.local()

#: the hosts on this worker by key, for ``released``: held here until then, since
#: distributed drops its own reference to a host before the plugin hears of the release
_hosts: dict[str, ActorHost] = {}


class ExitActor(BaseException):
    """Raised by ``exit_actor()`` in a method: the host ends the actor there."""


class ActorSpec:
    """What a host needs to build the actor: its class (daskray's pickled table of
    ``ActorInit``), constructor arguments (pickled, refs inside) and options."""

    __slots__ = ("actor_id", "class_name", "table_id", "table", "arguments", "options")

    def __init__(self, actor_id: str, class_name: str, table_id: bytes, table: bytes,
                 arguments: bytes, options: dict) -> None:
        self.actor_id = actor_id
        self.class_name = class_name
        self.table_id = table_id
        self.table = table
        self.arguments = arguments
        self.options = options

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)


class ActorHost:
    """The distributed actor that hosts one daskray actor on a dask worker."""

    def __init__(self, spec: ActorSpec, key: str) -> None:
        self.spec = spec
        self.key = key
        self.session = task_session()
        self.worker = get_worker().address
        self.instance: Any = None
        self.init_failure: str | None = None
        self._next: dict[bytes, int] = {}
        self._turns: dict[tuple[bytes, int], asyncio.Event] = {}
        self._skipped: set[tuple[bytes, int]] = set()
        #: calls their callers cancelled: refused when (if) they come
        self._cancelled: set[tuple[bytes, int]] = set()
        #: calls handed to the actor's threads that have not started yet
        self._queued: dict[tuple[bytes, int], concurrent.futures.Future] = {}
        self._held: dict[tuple[bytes, int], Any] = {}
        self._pending: set[asyncio.Future] = set()
        self._threads: set[int] = set()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: a thread pool per concurrency group (Ray's ``concurrency_groups``)
        self._group_executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: on the loop: a semaphore per concurrency group, the default one under ""
        self._limits: dict[str, asyncio.Semaphore] = {}
        #: the atexit handlers the actor registered: run when it ends gracefully
        self._atexit: list = []
        #: whether the shutdown hooks ran (they run once)
        self._shut = False
        metadata = self.session.client.get_metadata([key], default={}) or {}
        self.restarts = int(metadata.get(RESTARTS, 0))
        self.dead: str | None = metadata.get(KILLED) or self._restarts_used_up()
        if MAX_RESTARTS not in metadata:  # for the callers who decide on restarts
            self.session.client.set_metadata([key, MAX_RESTARTS],
                                             self.spec.options["max_restarts"])
        if self.dead is None:
            self._build()
            # a kill while the constructor ran (it may have waited for its arguments)
            self.dead = self.session.client.get_metadata([key, KILLED], default=None)
        _hosts[key] = self

    # ------------------------------------------------------------ building

    def _restarts_used_up(self) -> str | None:
        return restarts_used_up(self.restarts, self.spec.options["max_restarts"])

    def _build(self) -> None:
        """Make the threads and the instance; the constructor runs in a thread of its
        own (it may wait in ``get()``) while this task thread leaves the worker's pool."""
        cls = function_of(self.spec.table_id, self.spec.table).cls
        capture_atexit(lambda: getattr(current_host(), "_atexit", None))
        if self.spec.options["async"]:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True,
                             name=f"daskray-actor-{self.spec.class_name}").start()
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.spec.options["max_concurrency"],
                thread_name_prefix=f"daskray-actor-{self.spec.class_name}")
            self._group_executors = {
                group: concurrent.futures.ThreadPoolExecutor(
                    limit, thread_name_prefix=f"daskray-actor-{self.spec.class_name}-{group}")
                for group, limit in self._concurrency().items() if group}
        done = concurrent.futures.Future()
        threading.Thread(target=self._construct, args=(cls, done), daemon=True,
                         name=f"daskray-actor-init-{self.spec.class_name}").start()
        with leave_worker_pool():
            done.result()

    def _construct(self, cls: type, done: concurrent.futures.Future) -> None:
        try:
            running.host = self
            args, kwargs = cloudpickle.loads(self.spec.arguments)
            args, kwargs = resolve_arguments(self.session, args, kwargs)
            if self._loop is not None:  # an async actor: asyncio objects it makes are the loop's
                self.instance = asyncio.run_coroutine_threadsafe(
                    self._construct_on_loop(cls, args, kwargs), self._loop).result()
            else:
                self.instance = cls(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every call reports it
            self.init_failure = "".join(traceback.format_exception(exc))
        finally:
            running.host = None
            done.set_result(None)

    async def _construct_on_loop(self, cls: type, args: list, kwargs: dict) -> Any:
        running.host = self
        try:
            return cls(*args, **kwargs)
        finally:
            running.host = None

    # ------------------------------------------------------------ calls (worker's loop)

    async def call(self, caller: bytes, seq: int, method: str, payload: bytes, key: str,
                   worker: str, lost: int, group: str | None = None) -> tuple:
        """Run one call in its caller's order; its reply (see the module's docstring).

        ``key`` is the call's task, running on ``worker``; ``lost`` counts the hosts it
        reached before that died while it ran, as far as the task knows; ``group`` is
        its concurrency group (None or "": the default one)."""
        if self.dead is None:
            refused = await self._count_delivery(caller, seq, method, key, worker, lost)
            if refused is not None:
                return refused
        await self._turn(caller, seq)
        if (caller, seq) in self._cancelled:  # cancelled by its caller before it came
            self._cancelled.discard((caller, seq))
            self._advance(caller, seq)
            return failure(self._cancellation(method))
        try:
            if self.dead is not None:
                return failure(self._died(method))
            work = self._dispatch(caller, seq, method, payload, group or "")
            with self._lock:
                if not work.done():
                    self._queued[(caller, seq)] = work
        finally:
            self._advance(caller, seq)
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()
        work.add_done_callback(lambda done: loop.call_soon_threadsafe(
            self._settle, outcome, done, caller, seq, method))
        self._pending.add(outcome)
        try:
            return await outcome
        finally:
            self._pending.discard(outcome)

    def _settle(self, outcome: asyncio.Future, done: concurrent.futures.Future,
                caller: bytes, seq: int, method: str) -> None:
        self._started(caller, seq)  # if it started before ``call`` noted it queued
        if outcome.done():  # the actor ended first: the call failed with it
            return
        if done.cancelled():  # by ``skip`` before it started, or by the actor's end
            outcome.set_result(failure(self._died(method) if self.dead is not None
                                       else self._cancellation(method)))
        elif done.exception() is not None:  # the actor's end, or a fault of the host's own
            outcome.set_result(failure(self._died(method) if self.dead is not None
                                       else done.exception()))
        else:
            outcome.set_result(done.result())

    async def skip(self, caller: bytes, seq: int, cancelled: bool = False) -> None:
        """The caller's call ``seq`` is not to run (``cancelled``), or will never come
        (its arguments failed): the calls after it need not wait for it.  A cancelled
        call that is here already but has not started is dropped; one that comes later
        is refused."""
        with self._lock:
            work = self._queued.pop((caller, seq), None)
        if work is not None:
            work.cancel()  # False once it started: it runs on, as a running task does
            return
        if cancelled:
            self._cancelled.add((caller, seq))
            event = self._turns.get((caller, seq))
            if event is not None:  # it waits for its turn: it refuses itself now
                event.set()
                return
        start = self._next.setdefault(caller, self._first(seq))
        if seq == start:
            self._advance(caller, seq)
        elif seq > start:
            self._skipped.add((caller, seq))

    async def release(self, caller: bytes, seq: int) -> None:
        """The caller holds the refs in its call's result now: drop ours."""
        self._held.pop((caller, seq), None)

    async def stop(self, why: str) -> str | None:
        """End the actor for good (``kill``, ``exit_actor``): the calls in flight and
        every later call raise ActorDiedError.  Its name, if any."""
        self._end(why)
        return self.spec.options.get("name")

    async def _count_delivery(self, caller: bytes, seq: int, method: str, key: str,
                              worker: str, lost: int) -> tuple | None:
        """``max_task_retries`` for a call that reached a host that died while it ran:
        the refusal (ActorDiedError) once they are used up, else None.

        A task on another worker knows when its host was lost (``lost``).  A task on
        this host's worker dies with it, and distributed runs it again knowing nothing,
        so such a delivery is recorded on the scheduler first (the call key's metadata,
        dropped with the key) and a restarted host -- the only kind such a task can
        reach again -- reads it."""
        scheduler = self.session.client.scheduler
        if self.restarts:
            recorded = await scheduler.get_metadata(keys=[key, DELIVERED], default=0)
            lost = max(lost, recorded or 0)
        retries = self.spec.options["max_task_retries"]
        if 0 <= retries < lost:
            await self.skip(caller, seq)  # the caller's later calls must not wait for it
            return failure(ActorDiedError(
                f"the dask worker running {self.spec.class_name}.{method}() died while the "
                f"call ran; the actor allows {retries} retries of such calls "
                "(max_task_retries)"))
        if worker == self.worker:
            await scheduler.set_metadata(keys=[key, DELIVERED], value=lost + 1)
        return None

    def _first(self, seq: int) -> int:
        """Where a caller's numbering starts here: 1, or after a restart wherever the
        first call that reaches this host is."""
        return 1 if self.restarts == 0 else seq

    async def _turn(self, caller: bytes, seq: int) -> None:
        start = self._next.setdefault(caller, self._first(seq))
        if seq <= start or self.dead is not None:
            return
        event = self._turns.setdefault((caller, seq), asyncio.Event())
        try:
            await event.wait()
        finally:
            self._turns.pop((caller, seq), None)

    def _advance(self, caller: bytes, seq: int) -> None:
        if seq != self._next.get(caller):
            return  # a late call (after a restart): it waited for nobody
        seq += 1
        while (caller, seq) in self._skipped:
            self._skipped.discard((caller, seq))
            event = self._turns.get((caller, seq))
            if event is not None:  # a cancelled call that came after all: it refuses itself
                event.set()
            seq += 1
        self._next[caller] = seq
        event = self._turns.get((caller, seq))
        if event is not None:
            event.set()

    def _concurrency(self) -> dict[str, int]:
        """{concurrency group: its limit}, the default group under ""."""
        return {"": self.spec.options["max_concurrency"],
                **(self.spec.options.get("concurrency_groups") or {})}

    def _dispatch(self, caller: bytes, seq: int, method: str, payload: bytes,
                  group: str) -> concurrent.futures.Future:
        """Hand the call to the threads of its concurrency group (in call order)."""
        if self._loop is not None:
            return asyncio.run_coroutine_threadsafe(
                self._run_async(caller, seq, method, payload, group), self._loop)
        executor = self._group_executors.get(group, self._executor)
        assert executor is not None
        return executor.submit(self._run, caller, seq, method, payload)

    async def _run_async(self, caller: bytes, seq: int, method: str, payload: bytes,
                         group: str) -> tuple:
        self._started(caller, seq)
        limit = self._limits.get(group)
        if limit is None:
            limit = self._limits[group] = asyncio.Semaphore(
                self._concurrency().get(group, self.spec.options["max_concurrency"]))
        async with limit:
            result = self._invoke(caller, seq, method, payload)
            if inspect.iscoroutine(result):  # an async method; a plain one is done
                result = await result
            return result

    def _run(self, caller: bytes, seq: int, method: str, payload: bytes) -> tuple:
        self._started(caller, seq)
        result = self._invoke(caller, seq, method, payload)
        if inspect.iscoroutine(result):  # an async method of a sync class: run it here
            result = asyncio.run(result)
        return result

    def _started(self, caller: bytes, seq: int) -> None:
        """A call begins (in an actor thread or on its loop): too late to drop it."""
        with self._lock:
            self._queued.pop((caller, seq), None)

    def _invoke(self, caller: bytes, seq: int, method: str, payload: bytes) -> Any:
        """Run the method (in an actor thread or on its loop); a coroutine comes back
        as one that finishes the job."""
        if self.instance is None:
            return failure(ActorError(
                f"actor {self.spec.class_name} cannot run {method}(): its constructor "
                f"raised.\nThe constructor's traceback:\n{self.init_failure}"))
        ident = threading.get_ident()
        with self._lock:
            self._threads.add(ident)
        running.host = self
        running.task = f"{self.spec.actor_id}-{caller.hex()}-{seq}"
        since = self.session.table.announced
        self.session.table.sync_with_tracker()
        try:
            args, kwargs = cloudpickle.loads(payload)
            result = self._bound(method)(*args, **kwargs)
        except (ExitActor, SystemExit):  # sys.exit() in a method ends its actor, as in Ray
            return self._exit(method)
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            return failure(exc, traceback.format_exc())
        finally:
            running.host = None
            with self._lock:
                self._threads.discard(ident)
        if inspect.iscoroutine(result):
            return self._finish(caller, seq, method, result, since)
        return self._reply(caller, seq, result, since)

    async def _finish(self, caller: bytes, seq: int, method: str, coro: Any,
                      since: int) -> tuple:
        running.host = self
        try:
            result = await coro
        except (ExitActor, SystemExit):
            return self._exit(method)
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            return failure(exc, traceback.format_exc())
        finally:
            running.host = None
        return self._reply(caller, seq, result, since)

    def _reply(self, caller: bytes, seq: int, result: Any, since: int) -> tuple:
        try:
            with collect_pickled_refs() as refs:
                data = cloudpickle.dumps(result, protocol=5)
        except Exception as exc:  # noqa: BLE001
            return failure(exc, traceback.format_exc())
        self.session.settle_received(since)
        if refs:  # kept until the caller announced its own want of them
            self._held[(caller, seq)] = result
        return ("ok", data, bool(refs))

    def _bound(self, method: str) -> Any:
        return bound_method(self.instance, method)

    # ------------------------------------------------------------ the end

    def _exit(self, method: str) -> tuple:
        why = f"it called exit_actor() or sys.exit() in {method}()"
        self._shut_down(self.instance)
        mark_killed(self.session.client, self.key, why)
        self.session.client.loop.add_callback(self._end, why)
        return failure(self._died(method))

    def _cancellation(self, method: str) -> TaskCancelledError:
        return TaskCancelledError(f"{self.spec.class_name}.{method} was cancelled")

    def _died(self, method: str) -> ActorDiedError:
        return ActorDiedError(
            f"actor {self.spec.class_name} is dead ({self.dead}); {method}() did not run")

    def _shut_down(self, instance: Any) -> None:
        """The actor ends gracefully: its ``__ray_shutdown__`` (once), then the atexit
        handlers it registered, last first."""
        with self._lock:
            if instance is None or self._shut:
                return
            self._shut = True
        hook = getattr(instance, "__ray_shutdown__", None)
        if callable(hook):
            try:
                hook()
            except Exception:  # noqa: BLE001 - it ends anyway
                traceback.print_exc()
        run_atexit(self._atexit)

    def _end(self, why: str, graceful: bool = False) -> None:
        """On the worker's loop: mark dead, fail what is in flight, stop the threads;
        when ``graceful``, run the actor's shutdown hooks in a thread of their own."""
        if self.dead is not None and self.instance is None:
            return
        self.dead = self.dead or why
        if graceful:
            threading.Thread(target=self._shut_down, args=(self.instance,), daemon=True,
                             name=f"daskray-actor-end-{self.spec.class_name}").start()
        self.instance = None
        for work in list(self._pending):
            if not work.done():
                work.set_result(failure(ActorDiedError(
                    f"actor {self.spec.class_name} is dead ({self.dead}) while this call ran")))
        for event in self._turns.values():
            event.set()
        with self._lock:
            for ident in self._threads:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(ActorDiedError))
        for executor in [self._executor, *self._group_executors.values()]:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def restarts_used_up(restarts: int, allowed: int) -> str | None:
    """Why an actor made ``restarts`` times after its worker died is dead, or None."""
    if restarts > allowed:
        return f"its dask worker died and its max_restarts={allowed} restart(s) are used up"
    return None


def released(key: str) -> None:
    """On a dask worker's loop, when dask releases the task ``key`` there (daskray's
    worker plugin): a host's actor has no handle left anywhere, so it ends now -- its
    threads stop, and the handles its instance holds go, ending their actors in turn
    -- rather than whenever Python collects it."""
    host = _hosts.pop(key, None)
    if host is not None:
        host._end("its last handle is gone", graceful=True)


def failure(exc: BaseException, text: str | None = None) -> tuple:
    """A reply that makes the caller raise ``exc`` (with this side's traceback)."""
    exc.__dict__[REMOTE_TRACEBACK] = text or "".join(traceback.format_exception(exc))
    try:
        return ("error", cloudpickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
        return ("error", cloudpickle.dumps(ActorError(
            f"{type(exc).__name__}: {exc} (raised in the actor; the exception cannot "
            f"be pickled)\n{exc.__dict__[REMOTE_TRACEBACK]}")))


def mark_killed(client: Any, key: str, why: str) -> None:
    """Record on the scheduler that the actor of ``key`` ended for good: a host made
    again for it (after its worker died) starts dead."""
    client.set_metadata([key, KILLED], why)


def resolve_arguments(session: Any, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """The top-level ObjectRefs of a call's arguments replaced by their values."""
    slots = [s for s, v in [*enumerate(args), *kwargs.items()] if type(v) is ObjectRef]
    if not slots:
        return list(args), dict(kwargs)
    args, kwargs = list(args), dict(kwargs)
    values = session.get([args[s] if type(s) is int else kwargs[s] for s in slots])
    for slot, value in zip(slots, values):
        if type(slot) is int:
            args[slot] = value
        else:
            kwargs[slot] = value
    return args, kwargs


def current_host() -> ActorHost | None:
    """The host whose method runs in this thread, or None."""
    return getattr(running, "host", None)
