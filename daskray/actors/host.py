"""The actor side of an actor process: the one instance, and how calls reach it.

An actor process is a worker started for one actor.  Its first task is the
constructor (:class:`ActorInit`), which makes the instance; every later task is
a method call (:class:`ActorCall`).  Calls arrive in submission order and run one
at a time (or ``max_concurrency`` at a time on a thread pool).  In an async actor
(a class with an ``async def`` method) the constructor and every method, sync ones
too, run on one event loop thread owned by the process, as in Ray: a sync method
may set an ``asyncio.Event`` an async one awaits.  With Ray's
``concurrency_groups`` each call waits for a place in its group before it runs.
"""

from __future__ import annotations

import atexit
import inspect
import os
import threading
import traceback
from typing import Any

from .. import backend
from ..errors import ActorError
from ..runtime import context
from ..runtime import protocol as P
from ..remote_function import RemoteFunction

#: Ray's methods of every actor: True once constructed; end after the calls before it
READY, TERMINATE = "__ray_ready__", "__ray_terminate__"
#: daskray's method of every actor: where its process takes calls straight
#: (``(address, worker id)``, or None); a caller's calls made before it went
#: through the head have all started when it returns (see runtime.session)
DIRECT = context.DIRECT

#: the instance this process hosts, once its constructor has run
instance: Any = None
#: the traceback of the constructor, when it raised
init_failure: str | None = None
_loop: Any = None  # an asyncio event loop, made on first use
#: whether the instance's class has ``async def`` methods (its calls run on the loop)
is_async = False
#: whether the instance's ``__ray_shutdown__`` ran (it runs once)
_shutdown_ran = False
#: {concurrency group: semaphore} of the running calls, made on first use
_groups: dict = {}
_groups_lock = threading.Lock()


class ActorInit:
    """Task body of an actor's constructor: build the instance in this process."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        global instance, init_failure, is_async
        instance = None
        capture_atexit(lambda: _registered)
        is_async = is_async_class(self.cls)
        try:
            if is_async:  # asyncio objects it makes belong to its loop
                instance = _run(_call_on_loop(self.cls, args, kwargs))
            else:
                instance = self.cls(*args, **kwargs)
        except BaseException as exc:
            init_failure = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise
        init_failure = None


class ActorCall:
    """Task body of a method call: run ``method`` on the instance, in concurrency
    ``group`` (at most ``limit`` calls of it at once) when the class declares groups."""

    __slots__ = ("cls_name", "method", "group", "limit")

    def __init__(self, cls_name: str, method: str, group: str | None = None,
                 limit: int | None = None) -> None:
        self.cls_name = cls_name
        self.method = method
        self.group = group
        self.limit = limit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._run(args, kwargs)
        except SystemExit:  # sys.exit() in a method ends the actor as exit_actor() does
            exit_actor(backend.current())
            raise

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if instance is None:
            raise ActorError(
                f"actor {self.cls_name} cannot run {self.method}(): its constructor "
                f"raised.\nThe constructor's traceback:\n{init_failure or '(not available)'}")
        func = bound_method(instance, self.method)
        if is_async:
            return _run(self._on_loop(func, args, kwargs))
        if self.group is None:
            return _finish(func(*args, **kwargs))
        with _group_semaphore(self.group, self.limit, threading.Semaphore):
            return _finish(func(*args, **kwargs))

    async def _on_loop(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """An async actor's call, on its loop: sync methods run there too (Ray's rule)."""
        import asyncio

        if self.group is None:
            return await _awaited(func(*args, **kwargs))
        async with _group_semaphore(self.group, self.limit, asyncio.Semaphore):
            return await _awaited(func(*args, **kwargs))


def bound_method(obj: Any, method: str) -> Any:
    """The callable a call of ``method`` runs on the actor instance ``obj``: its
    method, or one of Ray's methods every actor has."""
    if method == READY:
        return lambda: True
    if method == TERMINATE:
        return _terminate
    if method == DIRECT:
        return lambda: context.direct_channel
    if method in getattr(obj, "__dict__", ()):  # an attribute of the instance itself
        return getattr(obj, method)
    key = (type(obj), method)
    attr = _class_remote.get(key, False)
    if attr is False:  # looked up once per class and method (inspect's lookup is slow)
        found = inspect.getattr_static(type(obj), method, None)
        attr = _class_remote[key] = found if isinstance(found, RemoteFunction) else None
    if attr is not None:  # marked @daskray.remote in a daskray.Actor
        return lambda *args, **kwargs: attr.__wrapped__(obj, *args, **kwargs)
    return getattr(obj, method)


#: {(class, method): its RemoteFunction (a daskray.Actor's marked method), or None}
_class_remote: dict = {}


def _terminate() -> None:
    """``__ray_terminate__``: end the actor as ``exit_actor()`` does; the calls
    submitted before this one ran first (calls run in submission order)."""
    exit_actor(backend.current())


def exit_actor(session: Any) -> None:
    """``daskray.exit_actor()`` in a method of an actor of ``session``'s backend: local
    mode and the dask.distributed backend end it their own way; an actor process of
    daskray's runtime runs the actor's shutdown hooks, then asks the head to end it."""
    ends_it = getattr(session, "exit_actor", None)
    if ends_it is not None:
        ends_it()
    conn = getattr(session, "conn", None)
    actor = getattr(conn, "actor", None)
    if actor is None:
        raise TypeError("exit_actor() ends the actor it is called in: call it from a "
                        "method of an actor")
    shut_down()
    conn.send(P.KillActorRequest(actor))
    # the head stops this process now; nothing more of the method may run meanwhile
    threading.Event().wait(60)
    os._exit(1)


def shut_down() -> None:
    """The actor ends gracefully (``exit_actor()``, ``__ray_terminate__``): run its
    ``__ray_shutdown__``, once, then the atexit handlers, as Ray does."""
    global _shutdown_ran
    if not _shutdown_ran and instance is not None:
        _shutdown_ran = True
        hook = getattr(instance, "__ray_shutdown__", None)
        if callable(hook):
            try:
                hook()
            except Exception:  # noqa: BLE001 - the actor ends anyway
                traceback.print_exc()
    run_atexit(_registered)


#: the atexit handlers the actor of this process registered (see capture_atexit)
_registered: list = []
_register_for_process = atexit.register
_atexit_owner: Any = None


def capture_atexit(owner: Any) -> None:
    """From now on, ``atexit.register`` in this process also files the handler in
    ``owner()`` (a list; None: not an actor's), so that the actor's own handlers run
    when it ends gracefully, while the process (a dask worker, say) lives on."""
    global _atexit_owner
    _atexit_owner = owner
    atexit.register = _register


def _register(func: Any, *args: Any, **kwargs: Any) -> Any:
    handlers = _atexit_owner() if _atexit_owner is not None else None
    # daskray's own (daskray.api's, imported late in a worker) are the process's
    if handlers is not None and not getattr(func, "__module__", "").startswith("daskray"):
        handlers.append((func, args, kwargs))
    return _register_for_process(func, *args, **kwargs)


def run_atexit(handlers: list) -> None:
    """Run the handlers an actor registered, last first, each once: they are
    dropped from the process's own."""
    while handlers:
        func, args, kwargs = handlers.pop()
        atexit.unregister(func)
        try:
            func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - as atexit does: report, go on
            traceback.print_exc()


def is_async_class(cls: type) -> bool:
    """Whether ``cls`` has an ``async def`` method: Ray runs such an actor on an
    event loop."""
    return any(inspect.iscoroutinefunction(getattr(cls, n, None)) for n in dir(cls))


def _finish(result: Any) -> Any:
    """A method's value: an ``async def`` method of a sync actor runs on the loop."""
    return _run(result) if inspect.iscoroutine(result) else result


async def _awaited(result: Any) -> Any:
    return await result if inspect.iscoroutine(result) else result


async def _call_on_loop(func: Any, args: tuple, kwargs: dict) -> Any:
    return func(*args, **kwargs)


def _group_semaphore(group: str, limit: int | None, kind: type) -> Any:
    """The semaphore of concurrency ``group`` (one per group and kind), made once."""
    with _groups_lock:
        found = _groups.get((group, kind))
        if found is None:
            found = _groups[(group, kind)] = kind(limit or 1)
        return found


_loop_lock = threading.Lock()


def _run(coro: Any) -> Any:
    """Run a coroutine on the actor's event loop (a thread of its own), so the
    coroutines of concurrent calls interleave on one loop; wait for its result."""
    import asyncio

    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="daskray-actor-loop",
                             daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()
