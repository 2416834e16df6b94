"""The backend seam: the session Ray-style calls go through in this process.

Remote functions, actors, ``ObjectRef.get`` and the dask adapter do not know
which backend runs them; they ask :func:`current` and use the :class:`Backend`
protocol.  Three sessions implement it today:

* the driver's session over its local cluster (``runtime/session.py``),
  installed by ``daskray.init()`` and removed by ``daskray.shutdown()``;
* the local-mode session (``runtime/local_session.py``), installed the same way;
* a worker's in-task session (``runtime/session.py`` over ``runtime/in_task.py``),
  installed by the worker at start-up; in a worker it wins over any other.

This module sits at the bottom of the package (it imports only ``errors``), so
everything above may use it; a new backend (say a dask.distributed cluster)
plugs in here by implementing :class:`Backend` and installing itself.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from .errors import ClusterError

#: an ObjectRef and its key (``daskray.refs``, which imports this module, so not named here)
Ref = Any
RefKey = tuple


class ActorSpec(Protocol):
    """What a backend uses of the actor class it is asked to create an instance of
    (``daskray.actors.ActorClass``)."""

    _cls: type
    _init: Callable
    _init_table: Any
    _options: dict

    def new_actor_id(self, owner: bytes) -> str: ...
    def handle_for(self, actor_id: str, creation: Ref) -> Any: ...
    def graph_options(self, actor_id: str, handle_bytes: bytes) -> dict: ...
    def resources(self) -> dict | None: ...


class Backend(Protocol):
    """Ray's core calls, as one session offers them."""

    def submit_call(self, func: Callable, table: Any, args: tuple, kwargs: dict,
                    options: dict) -> Ref | list[Ref]: ...
    def create_actor(self, actor_class: ActorSpec, args: tuple, kwargs: dict) -> Any: ...
    def call_actor(self, handle: Any, method: str, args: tuple, kwargs: dict,
                   options: dict) -> Ref | list[Ref]: ...
    def kill_actor(self, handle: Any, no_restart: bool = True) -> None: ...
    def get_actor(self, name: str, *, namespace: str | None = None) -> Any: ...
    def named_actors(self, all_namespaces: bool = False) -> list: ...
    def set_namespace(self, namespace: str) -> None: ...
    def put(self, value: Any) -> Ref: ...
    def get(self, refs: Sequence[Ref], timeout: float | None = None) -> list: ...
    def wait(self, refs: Sequence[Ref], num_returns: int = 1,
             timeout: float | None = None) -> tuple[list, list]: ...
    def cancel(self, refs: Sequence[Ref]) -> None: ...
    def forget(self, key: RefKey) -> None: ...
    def resources(self) -> tuple[dict, dict]: ...


_driver: Backend | None = None
_in_task: Backend | None = None
#: starts the driver's session when a call needs one and none runs (Ray's auto-init;
#: set by ``daskray.api``), or None
_auto_start: Callable[[], None] | None = None


def set_auto_start(start: Callable[[], None] | None) -> None:
    """Have :func:`current` call ``start()`` when no session is installed: it
    installs one (``daskray.init``), so a program's first call needs no ``init``."""
    global _auto_start
    _auto_start = start


def install(session: Backend, *, in_task: bool = False) -> None:
    """Make ``session`` the one calls go through: the driver's (``init``), or with
    ``in_task=True`` the one of the worker process this runs in."""
    global _driver, _in_task
    if in_task:
        _in_task = session
    else:
        _driver = session


def uninstall() -> None:
    """Remove the driver's session (``shutdown``): calls fail until the next ``init``."""
    global _driver
    _driver = None


def installed() -> Backend | None:
    """The session calls would go through here, or None when there is none."""
    return _in_task if _in_task is not None else _driver


def current(*, auto_start: bool = True) -> Backend:
    """The session calls go through here: the worker's inside a task, else the driver's.
    With none, one is started first (see :func:`set_auto_start`) unless
    ``auto_start=False``: calls that only make sense on a running cluster say so."""
    session = installed()
    if session is None and auto_start and _auto_start is not None:
        _auto_start()
        session = installed()
    if session is None:
        raise ClusterError("daskray is not running: call daskray.init() first")
    return session
