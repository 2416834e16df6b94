"""Actors: a class instance in a process of its own, whose method calls are tasks.

::

    @daskray.remote                      class MyActor(daskray.Actor):
    class Counter: ...                       @daskray.remote
    c = Counter.remote(5)                    def add(self, x, y): ...
    c.incr.remote()  -> ObjectRef        a = MyActor.create(value=5)

``Counter.remote(...)`` returns an :class:`ActorHandle` at once; the head starts
the actor's process and runs the constructor there.  A method call is a remote
graph pinned to the actor: it runs after its ObjectRef arguments are ready, in
submission order, and other tasks may depend on its result.  A handle is
picklable -- tasks and other actors that receive it call the same instance -- and
holds an ObjectRef to the constructor's result, so the actor ends when its last
handle is gone (unless it is named or detached).
"""

from __future__ import annotations

import inspect
import itertools
import numbers
from typing import Any

from .. import backend
from ..remote_function import (TASK_OPTIONS, RemoteFunction, call_signature, check_call,
                               check_options, check_str, _FunctionTable)
from .host import READY, TERMINATE, ActorCall, ActorInit, bound_method, is_async_class

ACTOR_OPTIONS = {
    "num_cpus": TASK_OPTIONS["num_cpus"],
    "num_gpus": TASK_OPTIONS["num_gpus"],
    "resources": TASK_OPTIONS["resources"],
    # None: not set (namespace: the creator's driver's), as in Ray
    "name": lambda v: check_str("an actor's name", v, optional=True) is None,
    "namespace": lambda v: check_str("a namespace", v, optional=True) is None,
    "get_if_exists": lambda v: isinstance(v, bool),
    "lifetime": lambda v: v in (None, "detached", "non_detached"),
    "max_restarts": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
    "max_task_retries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
    "max_concurrency": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "concurrency_groups": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and k and isinstance(n, int) and not isinstance(n, bool) and n >= 1
        for k, n in v.items()),
}
METHOD_OPTIONS = {"num_returns": TASK_OPTIONS["num_returns"], "name": TASK_OPTIONS["name"],
                  "concurrency_group": lambda v: isinstance(v, str) and v != ""}
_FOREVER = 1_000_000
#: the pool size of a threaded actor with concurrency groups: each group's limit is
#: kept by the calls themselves, so a group's waiting calls must not use up the pool
_GROUPED_POOL = 1000
#: the methods every actor has (Ray's): no arguments
_BUILTIN_METHODS = (READY, TERMINATE)
_numbers = itertools.count(1)


def _methods(cls: type) -> list[str]:
    """The names a handle of an actor of ``cls`` calls: its methods, and Ray's
    ``__ray_ready__`` and ``__ray_terminate__``."""
    names = list(_BUILTIN_METHODS)
    for name, attr in inspect.getmembers(cls):
        if name.startswith("__") and name not in ("__call__",):
            continue
        if callable(attr) or isinstance(inspect.getattr_static(cls, name), RemoteFunction):
            names.append(name)
    return names


def method(**options: Any) -> Any:
    """Ray's ``@ray.method(num_returns=..., concurrency_group=...)``: default options
    of an actor method, as ``handle.method.options(...)`` would give them at each call."""
    checked = check_options(options, METHOD_OPTIONS, "an actor method")

    def mark(func: Any) -> Any:
        func.__daskray_method_options__ = checked
        return func
    return mark


def _method_options(cls: type) -> dict:
    """{method name: options} of the methods marked with :func:`method`."""
    found = {}
    for name in _methods(cls):
        options = getattr(inspect.getattr_static(cls, name, None), "__daskray_method_options__",
                          None)
        if options:
            found[name] = dict(options)
    return found


def _method_signature(cls: type, name: str) -> Any:
    """What a call of method ``name`` of ``cls`` must match (see ``check_call``)."""
    if name in _BUILTIN_METHODS:
        return call_signature(lambda: None)
    static = inspect.getattr_static(cls, name, None)
    if isinstance(static, staticmethod):
        return call_signature(static.__func__)
    if isinstance(static, classmethod):
        return call_signature(static.__func__, drop_first=True)
    if isinstance(static, RemoteFunction):
        return call_signature(static.__wrapped__, drop_first=True)
    if inspect.isfunction(static):
        return call_signature(static, drop_first=True)
    return None  # some other callable: not checked


def _signatures(cls: type) -> dict:
    """{method name: its call signature} for the handles of actors of ``cls``."""
    return {name: _method_signature(cls, name) for name in _methods(cls)}


class ActorClass:
    """What ``@daskray.remote`` makes of a class: create instances with ``.remote()``."""

    def __init__(self, cls: type, options: dict) -> None:
        self._cls = cls
        self._options = check_options(dict(options), ACTOR_OPTIONS, "an actor class")
        if self._options.get("get_if_exists") and self._options.get("name") is None:
            raise ValueError("get_if_exists=True needs the actor's name: give name=... too")
        self._init = ActorInit(cls)
        self._init_table: _FunctionTable | None = None
        self._signature: Any = False  # the constructor's; False: not read yet
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor class {self.__name__} cannot be instantiated directly; use "
            f"{self.__name__}.remote(...) to create the actor in its own process")

    def __mro_entries__(self, bases: tuple) -> tuple:
        """``class B(A)`` with ``A`` an actor class: refused clearly, as Ray does."""
        raise TypeError(
            f"inheriting from actor class {self.__name__} is not supported (as in Ray): "
            f"subclass the plain class and decorate the subclass with @daskray.remote")

    def __getattr__(self, name: str) -> Any:
        """The class's own attributes (constants, static and class methods), as
        ``Cls.NAME`` gives them: Ray's actor classes let them through."""
        if name.startswith("__") or "_cls" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_cls"], name)

    def options(self, **options: Any) -> "ActorClass":
        checked = check_options(options, ACTOR_OPTIONS, "an actor class")
        clone = ActorClass(self._cls, {**self._options, **checked})
        clone._init, clone._init_table = self._init, self._init_table
        clone._signature = self._signature
        return clone

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        """Create the actor; its handle comes back at once."""
        if self._signature is False:
            self._signature = call_signature(self._cls)
        check_call(self._signature, self.__name__, args, kwargs)
        session = backend.current()
        opts = self._options
        name = opts.get("name")
        if name is not None and opts.get("get_if_exists"):
            existing = session.get_actor(name, namespace=opts.get("namespace"))
            if existing is not None:
                return existing
        if self._init_table is None:
            self._init_table = _FunctionTable(self._init)
        return session.create_actor(self, args, kwargs)

    # what a backend asks of the class it creates an actor of (backend.ActorSpec)

    def new_actor_id(self, owner: bytes) -> str:
        """A new actor id, unique within the process ``owner`` (its client id)."""
        return new_actor_id(owner)

    def handle_for(self, actor_id: str, creation: Any) -> "ActorHandle":
        """The handle of the actor ``actor_id`` whose constructor's result is ``creation``."""
        return ActorHandle(actor_id, self._cls.__name__, _methods(self._cls), creation,
                           _method_options(self._cls), _signatures(self._cls),
                           concurrency_of(self))

    def graph_options(self, actor_id: str, handle_bytes: bytes) -> dict:
        """The ``create_actor`` part of the graph that starts the actor."""
        return actor_options_for_graph(self, actor_id, handle_bytes)

    def resources(self) -> dict | None:
        """The resources the actor's process holds for its whole life."""
        return resources_of(self._options)


class ActorMethod:
    """``handle.method``: call it with ``.remote(...)`` (an ObjectRef), or call it
    plainly -- as a dask task does -- to run it on the actor and wait for the value."""

    def __init__(self, handle: "ActorHandle", name: str, options: dict | None = None) -> None:
        self._handle = handle
        self._name = name
        self._options = options or {}

    def options(self, **options: Any) -> "ActorMethod":
        checked = check_options(options, METHOD_OPTIONS, "an actor method")
        return ActorMethod(self._handle, self._name, {**self._options, **checked})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        handle = self._handle
        check_call(handle._signatures.get(self._name), f"{handle._class_name}.{self._name}",
                   args, kwargs)
        group = self._options.get("concurrency_group")  # the call's, or the method's
        if group is not None and group not in handle._concurrency:
            raise ValueError(
                f"{handle._class_name}.{self._name}: no concurrency group {group!r}; the "
                f"actor's class declares {sorted(handle._concurrency) or 'none'} "
                "(@daskray.remote(concurrency_groups={...}))")
        return backend.current().call_actor(handle, self._name, args, kwargs, self._options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.remote(*args, **kwargs)
        if isinstance(result, list):  # num_returns > 1
            return backend.current().get(result)
        return backend.current().get([result])[0]

    def __reduce__(self) -> tuple:
        return ActorMethod, (self._handle, self._name, self._options)

    def __repr__(self) -> str:
        return f"<actor method {self._handle._class_name}.{self._name}>"


class ActorHandle:
    """A reference to one actor; picklable, so tasks and actors can call it too."""

    def __init__(self, actor_id: str, class_name: str, methods: list[str], creation: Any,
                 method_options: dict | None = None, signatures: dict | None = None,
                 concurrency: dict | None = None) -> None:
        self._actor_id = actor_id
        self._class_name = class_name
        self._method_names = list(methods)
        #: defaults of methods marked ``@daskray.method(...)``: {name: options}
        self._method_options = method_options or {}
        #: ObjectRef to the constructor's result: keeps the actor alive
        self._creation = creation
        #: {method: what its calls must match, or None}: see ``check_call``
        self._signatures = signatures or {}
        #: {concurrency group: its limit}, the default group under "" (only when the
        #: class declares groups)
        self._concurrency = concurrency or {}
        self._calls: dict[tuple, tuple[ActorCall, _FunctionTable]] = {}

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_") and name not in self._method_names:
            raise AttributeError(name)
        if name not in self._method_names:
            raise AttributeError(f"actor {self._class_name} has no method {name!r}")
        return ActorMethod(self, name, self._method_options.get(name))

    def _call(self, method: str, group: str | None = None) -> tuple[ActorCall, _FunctionTable]:
        """The task body of ``method`` calls in concurrency ``group`` (None: the
        method's own) and its pickled table, made once."""
        made = self._calls.get((method, group))
        if made is None:
            call = ActorCall(self._class_name, method, *self._group_of(method, group))
            made = self._calls[(method, group)] = (call, _FunctionTable(call))
        return made

    @staticmethod
    def _bound(instance: Any, method: str) -> Any:
        """What a call of ``method`` runs on ``instance``, for a backend that holds the
        instance in the caller's process (local mode)."""
        return bound_method(instance, method)

    def _group_of(self, method: str, group: str | None) -> tuple[str | None, int | None]:
        """(concurrency group, its limit) of a call of ``method``: (None, None) for an
        actor whose class declares no groups."""
        if not self._concurrency:
            return None, None
        if group is None:
            group = self._method_options.get(method, {}).get("concurrency_group", "")
        return group, self._concurrency[group]

    def __reduce__(self) -> tuple:
        return ActorHandle, (self._actor_id, self._class_name, self._method_names, self._creation,
                             self._method_options, self._signatures, self._concurrency)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __repr__(self) -> str:
        return f"ActorHandle({self._class_name}, {self._actor_id})"


class Actor:
    """Base class for the seed's spelling: methods marked ``@daskray.remote``,
    instances made with ``MyActor.create(...)`` (each in its own process)."""

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> ActorHandle:
        return ActorClass(cls, {}).remote(*args, **kwargs)

    @classmethod
    def options(cls, **options: Any) -> ActorClass:
        return ActorClass(cls, options)


def actor_options_for_graph(actor_class: ActorClass, actor_id: str, handle_bytes: bytes) -> dict:
    opts = actor_class._options
    restarts = opts.get("max_restarts", 0)
    retries = opts.get("max_task_retries", 0)
    return {
        "id": actor_id,
        "max_restarts": _FOREVER if restarts == -1 else restarts,
        "max_task_retries": _FOREVER if retries == -1 else retries,
        "detached": opts.get("lifetime") == "detached" or opts.get("name") is not None,
        "name": opts.get("name"),
        #: None: the namespace of the creator's driver
        "namespace": opts.get("namespace"),
        "lifetime": opts.get("lifetime"),
        "handle": handle_bytes,
        "max_concurrency": _GROUPED_POOL if opts.get("concurrency_groups")
        else opts.get("max_concurrency", _default_concurrency(actor_class._cls)),
        # async methods run on an event loop thread: its calls (awaits included)
        # go through the main thread, which then only does the I/O
        "threaded": is_async_class(actor_class._cls) or opts.get("max_concurrency", 1) > 1
        or bool(opts.get("concurrency_groups")),
    }


def concurrency_of(actor_class: ActorClass) -> dict:
    """{group: limit} of an actor with Ray's ``concurrency_groups``, the default group
    (its ``max_concurrency``) under ""; {} without groups."""
    groups = actor_class._options.get("concurrency_groups")
    if not groups:
        return {}
    default = actor_class._options.get("max_concurrency",
                                       _default_concurrency(actor_class._cls))
    return {"": default, **groups}


def _default_concurrency(cls: type) -> int:
    """Ray's defaults: 1 call at a time, 1000 for a class with ``async def`` methods."""
    return 1000 if is_async_class(cls) else 1


def resources_of(options: dict) -> dict | None:
    resources = dict(options.get("resources") or {})
    if options.get("num_gpus"):
        resources["GPU"] = options["num_gpus"]
    cpus = options.get("num_cpus")
    if isinstance(cpus, numbers.Real) and cpus > 1:
        resources["CPU"] = cpus
    return resources or None


def new_actor_id(client_id: bytes) -> str:
    return f"{client_id.hex()}-{next(_numbers)}"
