"""Ray-style calls in ``local_mode``: everything runs at once, in this process.

``f.remote()`` calls ``f`` before returning its ObjectRef, so breakpoints and
tracebacks are ordinary; ``get`` returns the stored value or re-raises the
stored exception.  Arguments are not pickled: the function sees the very objects
it was given (as a remote function in Ray's removed local mode did).

Actors are plain instances here: ``Cls.remote()`` runs the constructor and
``handle.method.remote()`` the method, at once and in order, so their state
behaves as on a cluster; a name finds the handle, ``kill`` ends the actor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from ..backend import ActorSpec
from ..errors import ActorDiedError, ActorError, ActorNameTakenError, GetTimeoutError
from ..refs import ObjectRef, RefKey

_LOCAL_OWNER = b"local"


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ExitActor(BaseException):
    """Raised by ``exit_actor()`` in a local-mode actor's method: it ends there."""


class _LocalActor:
    __slots__ = ("instance", "init_failure", "dead", "name", "loop")

    def __init__(self, name: tuple[str, str] | None) -> None:
        self.instance: Any = None
        self.init_failure: str | None = None
        self.dead: str | None = None
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, coro: Any) -> concurrent.futures.Future:
        """Run an ``async def`` method's coroutine on this actor's own event loop
        (a thread of its own, as in an actor process): its calls interleave, and
        loop-bound state (events, tasks) lives from one call to the next."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="daskray-local-actor",
                             daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class LocalSession:
    """The :class:`~daskray.runtime.session.Session` API without a cluster."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.values: dict[RefKey, Any] = {}
        self.actors: dict[str, _LocalActor] = {}
        #: the actors whose methods are running now, innermost last
        self._running_actor: list[str] = []
        #: the creation ref of each actor that ends with its last handle -> its id
        self._creations: dict[RefKey, str] = {}
        #: {(namespace, name): handle}
        self.actor_names: dict[tuple[str, str], Any] = {}
        #: this driver's namespace (``init(namespace=...)``, else an anonymous one)
        self.namespace = ""

    def set_namespace(self, namespace: str) -> None:
        self.namespace = namespace

    def _store(self, value: Any) -> ObjectRef:
        key = (_LOCAL_OWNER, next(self._numbers), 0)
        ref = ObjectRef(key, owned=True)
        self.values[key] = value
        return ref

    def _resolve(self, value: Any) -> Any:
        if type(value) is ObjectRef:
            return self.get([value])[0]
        return value

    def _call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``func``'s result, or the exception it raised as a stored failure."""
        try:
            return func(*map(self._resolve, args),
                        **{k: self._resolve(v) for k, v in kwargs.items()})
        except Exception as exc:  # stored, raised at get() like on a cluster
            return _Failed(exc)

    def _refs(self, outcome: Any, n: int, name: str) -> ObjectRef | list[ObjectRef]:
        """ObjectRefs to a call's outcome: one, or ``n`` for ``num_returns=n``."""
        if n == 1:
            return self._store(outcome)
        if isinstance(outcome, _Failed):
            return [self._store(outcome) for _ in range(n)]
        values = list(outcome)
        if len(values) != n:
            failure = _Failed(ValueError(
                f"task {name} was declared with num_returns={n} but returned "
                f"{len(values)} values"))
            return [self._store(failure) for _ in range(n)]
        return [self._store(v) for v in values]

    def submit_call(self, func: Callable, table: Any, args: tuple, kwargs: dict,
                    options: dict) -> ObjectRef | list[ObjectRef]:
        return self._refs(self._call(func, args, kwargs), options.get("num_returns", 1),
                          getattr(func, "__name__", str(func)))

    def create_actor(self, actor_class: ActorSpec, args: tuple, kwargs: dict) -> Any:
        cls = actor_class._cls
        name = actor_class._options.get("name")
        namespace = actor_class._options.get("namespace")
        key = (self.namespace if namespace is None else namespace, name)
        if name is not None and key in self.actor_names:
            if actor_class._options.get("get_if_exists"):
                return self.actor_names[key]
            raise ActorNameTakenError(
                f"an actor named {name!r} exists already in namespace {key[0]!r}; use "
                "daskray.get_actor(name), or get_if_exists=True")
        actor_id = actor_class.new_actor_id(_LOCAL_OWNER)
        actor = self.actors[actor_id] = _LocalActor(key if name is not None else None)
        outcome = self._call(cls, args, kwargs)
        if isinstance(outcome, _Failed):
            exc = outcome.error
            actor.init_failure = "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__))
        else:
            actor.instance = outcome
        creation = self._store(outcome if isinstance(outcome, _Failed) else None)
        handle = actor_class.handle_for(actor_id, creation)
        if name is None and actor_class._options.get("lifetime") != "detached":
            self._creations[creation._key] = actor_id
        if name is not None:
            self.actor_names[key] = handle
        return handle

    def call_actor(self, handle: Any, method: str, args: tuple, kwargs: dict,
                   options: dict) -> ObjectRef | list[ObjectRef]:
        actor = self.actors.get(handle._actor_id)
        n = options.get("num_returns", 1)
        label = f"{handle._class_name}.{method}"
        if actor is None or actor.dead is not None:
            why = actor.dead if actor is not None else "it does not exist in this process"
            return self._refs(_Failed(ActorDiedError(
                f"actor {handle._class_name} is dead ({why}); {method}() did not run")), n, label)
        if actor.instance is None:
            return self._refs(_Failed(ActorError(
                f"actor {handle._class_name} cannot run {method}(): its constructor raised.\n"
                f"The constructor's traceback:\n{actor.init_failure}")), n, label)
        func = handle._bound(actor.instance, method)  # Ray's __ray_ready__ and such too
        self._running_actor.append(handle._actor_id)
        try:
            outcome = self._call(func, args, kwargs)
        except _ExitActor:
            self.kill_actor_id(handle._actor_id, "it called exit_actor()")
            outcome = _Failed(ActorDiedError(
                f"actor {handle._class_name} called exit_actor() in {method}()"))
        finally:
            self._running_actor.pop()
        if inspect.iscoroutine(outcome):
            future = actor.submit(outcome)
            if n == 1:  # get() waits for it; calls after it need not
                return self._store(future)
            outcome = self._call(future.result, (), {})
        return self._refs(outcome, n, label)

    def exit_actor(self) -> None:
        """``exit_actor()`` in a method of a local-mode actor."""
        if not self._running_actor:
            raise TypeError("exit_actor() ends the actor it is called in: call it from a "
                            "method of an actor")
        raise _ExitActor()

    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        # an actor of local mode is an object of this process: none restarts
        self.kill_actor_id(handle._actor_id, "killed with daskray.kill()")

    def kill_actor_id(self, actor_id: str, why: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None and actor.dead is None:
            actor.dead = why
            actor.instance = None
            if actor.loop is not None:
                actor.loop.call_soon_threadsafe(actor.loop.stop)
            if actor.name is not None:
                self.actor_names.pop(actor.name, None)

    def get_actor(self, name: str, timeout: float | None = None, *,
                  namespace: str | None = None) -> Any:
        return self.actor_names.get((self.namespace if namespace is None else namespace, name))

    def named_actors(self, all_namespaces: bool = False) -> list:
        """See ``Session.named_actors``."""
        if all_namespaces:
            return [{"name": name, "namespace": namespace}
                    for namespace, name in sorted(self.actor_names)]
        return sorted(name for namespace, name in self.actor_names
                      if namespace == self.namespace)

    def resources(self, timeout: float | None = None) -> tuple[dict, dict]:
        """This process runs everything, one call at a time."""
        return {"CPU": 1.0}, {"CPU": 1.0}

    def put(self, value: Any) -> ObjectRef:
        return self._store(value)

    def get(self, refs: Sequence[ObjectRef], timeout: float | None = None) -> list:
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for ref in refs:
            value = self.values[ref._key]
            if isinstance(value, concurrent.futures.Future):  # an async actor call
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    value = value.result(left)
                except concurrent.futures.TimeoutError:
                    raise GetTimeoutError(f"get timed out after {timeout} s") from None
                except Exception as exc:  # noqa: BLE001 - the method's own error
                    value = _Failed(exc)
                self.values[ref._key] = value
            if isinstance(value, _Failed):
                raise value.error
            out.append(value)
        return out

    def wait(self, refs: Sequence[ObjectRef], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list, list]:
        if not 0 <= num_returns <= len(refs):
            raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}")
        def running() -> list:  # async actor calls not finished yet
            return [v for v in (self.values.get(r._key) for r in refs)
                    if isinstance(v, concurrent.futures.Future) and not v.done()]

        deadline = None if timeout is None else time.monotonic() + timeout
        while len(refs) - len(running()) < num_returns:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            concurrent.futures.wait(running(), left,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        still = {id(f) for f in running()}
        ready = [r for r in refs if id(self.values.get(r._key)) not in still][:num_returns]
        chosen = {id(r) for r in ready}
        return ready, [r for r in refs if id(r) not in chosen]

    def cancel(self, refs: Sequence[ObjectRef], force: bool = False,
               recursive: bool = True) -> None:
        """Everything already ran; nothing to cancel."""

    def forget(self, key: RefKey) -> None:
        self.values.pop(key, None)
        actor_id = self._creations.pop(key, None)
        if actor_id is not None:  # its last handle is gone: so is the actor, as on a cluster
            self.kill_actor_id(actor_id, "all its handles were dropped")
            self.actors.pop(actor_id, None)
