"""The public entry points: ``init``, ``shutdown``, ``get``, ``put``, ``wait``, ``remote``...

One runtime per driver process, held here.  ``init`` starts a local cluster (or,
with ``local_mode=True``, nothing: graphs then run serially in this process) and
makes daskray dask's default scheduler; ``shutdown`` undoes both.  ``shutdown``
also runs at interpreter exit and is safe to call twice.  Without ``init``, the
first call that needs a cluster starts one (:func:`_auto_init`, Ray's auto-init).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import threading
import time
import uuid
from typing import Any

import dask
import dask.base
import dask.local
import dask.utils

from . import backend, dask_scheduler
from .errors import ClusterError
from .actors import ACTOR_OPTIONS, ActorClass, ActorHandle
from .actors import host as actor_host
from .dask_graph import convert, external_keys
from .refs import ObjectRef, ref_key_of, tracker
from .remote_function import TASK_OPTIONS, RemoteFunction, check_options, check_str
from .runtime.cluster import AttachedCluster, LocalCluster, sigint_deferred
from .runtime.standalone import find_cluster
from .runtime.local_session import LocalSession
from .runtime import context
from .runtime.task_events import chrome_trace
from .dashboard.process import wait_for_url
from .runtime.session import Session

#: the address schemes of dask's comm layer: an address with one names a dask scheduler
DASK_SCHEMES = ("tcp://", "tls://", "ws://", "wss://", "inproc://", "ucx://")

_UNSET = object()
_lock = threading.RLock()
_runtime: "_Runtime | None" = None
#: whether daskray ever ran in this process: auto-init starts only the first runtime
_ever_started = False


class _Runtime:
    """What ``init`` started, and the dask settings it replaced."""

    def __init__(self, cluster: LocalCluster | AttachedCluster | None,
                 set_dask_scheduler: bool, session: Any = None,
                 namespace: str | None = None) -> None:
        self.cluster = cluster
        #: the dask.distributed backend's session (``distributed_backend.session``), when
        #: daskray runs on such a cluster
        self.distributed = session
        self.local_mode = cluster is None and session is None
        self.session: Any
        if session is not None:
            self.session = session
            tracker.wake = session.wake
        elif cluster is None:
            self.session = LocalSession()
            tracker.wake = None
        else:
            self.session = Session(cluster.client)
            tracker.wake = cluster.client.wake_for_refs
        #: tasks since this moment make daskray.timeline()
        self.started_at = time.time()
        #: where this driver's named actors are: Ray's anonymous namespace if not given
        self.namespace = namespace or f"anonymous-{uuid.uuid4()}"
        self.session.set_namespace(self.namespace)
        tracker.on_drop = self.session.forget
        tracker.reporting = not self.local_mode
        kind = "distributed" if session is not None else \
            "local_mode" if self.local_mode else "local"
        self.context = ClusterContext(kind, *self._address())
        self.saved_config: dict[str, Any] = {}
        if set_dask_scheduler:
            self._set_config("scheduler", get)
            if dask.config.get("dataframe.shuffle.method", None) is None:
                # p2p needs distributed's workers, "disk" a shared disk: tasks work anywhere
                self._set_config("dataframe.shuffle.method", "tasks")

    def _address(self) -> tuple[str | None, str | None]:
        """(the cluster's address, its dashboard's URL)."""
        if self.distributed is not None:
            return self.distributed.client.scheduler.address, self.distributed.dashboard_url()
        if self.cluster is not None:
            return (getattr(self.cluster, "head_address", None)
                    or getattr(self.cluster, "session_dir", None)), \
                getattr(self.cluster, "dashboard_url", None)
        return None, None

    def _set_config(self, key: str, value: Any) -> None:
        self.saved_config[key] = dask.config.get(key, _UNSET)
        dask.config.set({key: value})

    def restore_config(self) -> None:
        for key, old in self.saved_config.items():
            if old is _UNSET:
                head, _, leaf = key.rpartition(".")
                parent = dask.config.config
                for part in head.split(".") if head else ():
                    parent = parent.get(part, {})
                parent.pop(leaf, None)
            else:
                dask.config.set({key: old})


#: Ray's init options about things daskray does not have; accepted, no effect
_IGNORED_RAY_OPTIONS = {
    "dashboard_host",
    "logging_level", "logging_format", "configure_logging", "runtime_env",
    "_temp_dir", "_system_config", "num_gpus",
}


def init(
    num_workers: int | None = None,
    *,
    local_mode: bool = False,
    set_dask_scheduler: bool = True,
    ignore_reinit_error: bool = False,
    resources: dict | list | None = None,
    num_cpus: int | None = None,
    address: str | None = None,
    client: Any = None,
    security: Any = None,
    object_store_memory: int | float | str | None = None,
    namespace: str | None = None,
    log_to_driver: bool = True,
    include_dashboard: bool | None = None,
    dashboard_port: int = 8265,
    _validate: bool = False,
    _store_namespaces: int = 1,
    **ray_options: Any,
) -> "ClusterContext":
    """Start daskray on this machine: a head process and ``num_workers`` workers.

    ``num_workers`` defaults to the number of cores.  With ``local_mode=True`` no
    process is started: graphs run serially in this process, with ordinary
    tracebacks and breakpoints -- for debugging.  Unless
    ``set_dask_scheduler=False``, daskray becomes dask's default scheduler until
    :func:`shutdown`.  Calling ``init`` twice raises :class:`ClusterError` unless
    ``ignore_reinit_error=True``.

    ``resources`` declares custom resources for tasks to ask for with
    ``.options(resources=...)``: a dict gives every worker the same, a list of
    dicts gives worker *i* the *i*-th.

    ``object_store_memory`` caps the bytes large objects take in shared memory on
    this machine (bytes -- a float is rounded, as Ray takes one --, or a string such
    as ``"4 GiB"``; else dask's config
    ``daskray.object-store-memory``; else 30% of the machine's memory).  Past it,
    the least recently used objects no live value refers to spill to disk and are
    read back from there transparently; :func:`object_store_stats` tells the use.

    ``num_workers=0`` (Ray's ``num_cpus=0``) starts no worker: ``put`` and ``get``
    work, remote calls wait for a worker that never comes.

    ``namespace`` is where this driver's named actors are, and where
    :func:`get_actor` looks (its tasks' and actors' too), as Ray's: without it the
    driver has an anonymous namespace of its own.  ``options(namespace=...)`` and
    ``get_actor(name, namespace=...)`` name another.

    What tasks and actors print reaches this process's ``sys.stdout`` (stderr and
    ``logging``: ``sys.stderr``) as whole lines prefixed ``(name pid=N)``, as
    Ray's; ``log_to_driver=False`` turns that off.

    ``include_dashboard=True`` serves a live dashboard of the cluster (workers,
    task stream, progress, object store, actors; Prometheus metrics at
    ``/metrics``) on ``127.0.0.1:dashboard_port`` (a random free port if that one
    is taken); ``init`` prints its URL and the context's ``dashboard_url`` holds it.
    Off by default (as Ray's ``None``).  On a dask.distributed cluster the
    ``dashboard_url`` is dask's own dashboard and no other is started; a driver
    joining a cluster started by ``daskray start`` starts none either (None).

    For code written for Ray: ``num_cpus`` means ``num_workers``, and Ray's
    other options about its dashboard and logging are accepted and have no effect here.

    ``address`` joins a cluster already running: a dask.distributed scheduler's
    address (``"tcp://HOST:8786"``, ``tls://`` with ``security=`` or dask's TLS
    config, ``ws://``), so the same program runs on many machines; or a daskray
    cluster on this machine started with ``daskray start --head`` (the address it
    printed, or ``"auto"`` for the newest one).  Without an argument the address
    comes from the ``DASKRAY_ADDRESS`` environment variable, if set.
    ``client=distributed.Client(...)`` joins that client's cluster.  A joined
    cluster's size and resources are its own; :func:`shutdown` then closes only what
    ``init`` opened, and the cluster drops this driver's objects.

    Returns a :class:`ClusterContext` (Ray's ``RayContext``): ``dashboard_url`` and
    ``address_info``; ``with daskray.init(): ...`` shuts down at the block's end.
    """
    unknown = set(ray_options) - _IGNORED_RAY_OPTIONS
    if unknown:
        raise TypeError(f"daskray.init() got unexpected keyword arguments {sorted(unknown)}")
    if client is not None and address is not None:
        raise ValueError("give address= or client=, not both")
    if address is None and client is None:
        address = os.environ.get("DASKRAY_ADDRESS") or None
    joining = client is not None or address not in (None, "local")
    if joining:
        given = [name for name, value in (
            ("num_workers", num_workers), ("num_cpus", num_cpus), ("resources", resources),
            ("object_store_memory", object_store_memory)) if value is not None]
        if given or local_mode:
            where = f"address={address!r}" if client is None else "client=..."
            raise ValueError(
                f"{', '.join(given) or 'local_mode'}: these are set when a cluster starts; "
                f"a driver joining one ({where}) cannot change them")
    on_dask = client is not None or (isinstance(address, str) and address.startswith(DASK_SCHEMES))
    if security is not None and not (client is None and on_dask):
        raise ValueError("security= applies to a dask scheduler's address (tls://...)")
    check_str("a namespace", namespace, optional=True)
    if num_cpus is not None:
        if num_workers is not None and num_workers != num_cpus:
            raise ValueError("give num_workers or num_cpus, not both")
        num_workers = num_cpus
    global _runtime, _ever_started
    with _lock:
        if _runtime is not None:
            if ignore_reinit_error:
                return _runtime.context
            raise ClusterError(
                "daskray.init() was called twice; call daskray.shutdown() first, or "
                "pass ignore_reinit_error=True to keep the running cluster"
            )
        _ever_started = True
        if on_dask:
            return _join_distributed(address, client, security, set_dask_scheduler, namespace,
                                     log_to_driver)
        if num_workers is not None and (
                not isinstance(num_workers, int) or isinstance(num_workers, bool)
                or num_workers < 0):
            raise ValueError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
        cluster = None
        # 0 workers (Ray's num_cpus=0): put and get work, tasks wait for a worker
        n = num_workers if num_workers is not None else os.cpu_count() or 1
        if isinstance(resources, dict):
            resources = [resources] * n
        if resources is not None and (
                len(resources) != n or not all(isinstance(r, dict) for r in resources)):
            raise ValueError("resources must be a dict, or a list of one dict per worker")
        store_limit = _store_limit(object_store_memory)
        port = _dashboard_port(include_dashboard, dashboard_port, local_mode)
        if address not in (None, "local"):
            cluster = AttachedCluster(find_cluster(address), log_to_driver=log_to_driver)
        elif not local_mode:
            cluster = LocalCluster(n, validate=_validate, resources=resources,
                                   store_limit=store_limit, store_namespaces=_store_namespaces,
                                   log_to_driver=log_to_driver, dashboard_port=port)
        try:
            if port is not None and isinstance(cluster, LocalCluster):
                _start_dashboard(cluster)
            _runtime = _Runtime(cluster, set_dask_scheduler, namespace=namespace)
            backend.install(_runtime.session)
        except BaseException:  # Ctrl-C, say: the cluster just started must not stay
            if cluster is not None:
                with sigint_deferred():
                    cluster.close()
            raise
        return _runtime.context


def _dashboard_port(include: bool | None, port: Any, local_mode: bool) -> int | None:
    """The port the dashboard should listen on, or None for no dashboard."""
    if not include:
        return None
    if local_mode:
        raise ValueError("local_mode starts no cluster, so there is no dashboard to show; "
                         "drop include_dashboard=True or local_mode=True")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"dashboard_port must be a port number (0-65535), got {port!r}")
    missing = [m for m in ("bokeh", "prometheus_client", "psutil")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ClusterError(f"the dashboard needs {', '.join(missing)}: "
                           "pip install 'daskray[dashboard]'")
    return port


def _start_dashboard(cluster: LocalCluster) -> None:
    """Wait for the dashboard the head started to listen; print its URL."""
    cluster.dashboard_url = wait_for_url(cluster.session_dir,
                                         alive=lambda: cluster.head.poll() is None)
    print(f"daskray: the dashboard is at {cluster.dashboard_url}", flush=True)


def _join_distributed(address: str | None, client: Any, security: Any,
                      set_dask_scheduler: bool, namespace: str | None,
                      log_to_driver: bool = True) -> "ClusterContext":
    """``init`` on a dask.distributed cluster (called with ``_lock`` held)."""
    global _runtime
    # loaded on first use: a program on daskray's own runtime never imports distributed
    from .distributed_backend.joining import join

    session = join(address, client, security, log_to_driver)
    try:
        session.record_task_stream()  # for daskray.timeline()
        _runtime = _Runtime(None, set_dask_scheduler, session, namespace)
        backend.install(session)
    except BaseException:
        _runtime = None
        session.close()
        raise
    return _runtime.context


class ClusterContext:
    """What :func:`init` returns, as Ray's ``RayContext``: ``dashboard_url`` (dask's
    dashboard on a dask.distributed cluster; None where there is none) and
    ``address_info``; ``ctx["dashboard_url"]`` works too.  Used as a context manager,
    the block's end calls :func:`shutdown`."""

    def __init__(self, backend: str, address: str | None, dashboard_url: str | None) -> None:
        #: what runs the calls: "local" (daskray's runtime on this machine),
        #: "local_mode" (this process alone) or "distributed" (a dask.distributed cluster)
        self.backend = backend
        self.dashboard_url = dashboard_url
        self.address_info = {"address": address, "dashboard_url": dashboard_url}

    def __getitem__(self, name: str) -> Any:
        if name == "dashboard_url":
            return self.dashboard_url
        return self.address_info[name]

    def __enter__(self) -> "ClusterContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        shutdown()

    def __repr__(self) -> str:
        return f"ClusterContext({self.address_info})"


def _store_limit(value: int | float | str | None) -> int | None:
    """The object store's limit in bytes from init's argument or dask's config;
    None for the default."""
    if value is None:
        value = dask.config.get("daskray.object-store-memory", None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dask.utils.parse_bytes(value)
        except ValueError as exc:
            raise ValueError(f"object_store_memory: {exc}; give bytes, or e.g. '4 GiB'") from None
    if isinstance(value, float) and math.isfinite(value) and value >= 1:
        value = round(value)  # Ray takes a float number of bytes too
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"object_store_memory must be a positive number of bytes, got {value!r}")
    return value


def object_store_stats() -> dict:
    """The shared-memory object store of this machine's cluster session:
    ``limit``, ``used`` and ``objects`` in memory, ``spilled`` and
    ``spilled_objects`` on disk (bytes and counts), and ``spill_dir``."""
    runtime = _current()
    if runtime.distributed is not None:
        raise ClusterError("a dask.distributed cluster has no daskray object store: objects "
                           "live in the dask workers' memory (see dask's dashboard)")
    if runtime.cluster is None:
        raise ClusterError("local_mode has no object store: values stay in this process")
    return runtime.cluster.store.stats()


def timeline(filename: str | None = None) -> list[dict] | None:
    """The tasks run since :func:`init` as a Chrome trace, as ``ray.timeline()``:
    one complete ("X") event per task, named by its task prefix, one row per
    worker, times in microseconds since ``init``.  Written to ``filename`` as
    ``{"traceEvents": [...]}`` (open it in Perfetto or chrome://tracing) and None
    returned; without a filename the list of events is returned.

    The head keeps the newest 100,000 task runs; on a dask.distributed cluster
    the scheduler's task stream is read (it keeps the newest 100,000 too)."""
    runtime = _current()
    if runtime.local_mode:
        raise ClusterError("local_mode keeps no timeline: tasks run in this process, one at "
                           "a time; use daskray.init() without local_mode for one")
    session = runtime.distributed if runtime.distributed is not None else runtime.session
    events = [e for e in session.task_events() if e[3] >= runtime.started_at]
    trace = chrome_trace(events, origin=runtime.started_at)
    if filename is None:
        return trace
    with open(filename, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)
    return None


def is_initialized() -> bool:
    """Whether daskray runs in this driver: :func:`init` was called, or a first call
    started it (auto-init), and :func:`shutdown` was not called since."""
    return _runtime is not None


def shutdown() -> None:
    """Stop the cluster, remove its files and restore dask's scheduler. Safe to call twice."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
        if runtime is None:
            return
        backend.uninstall()
        runtime.restore_config()
        tracker.on_drop = None
        tracker.reporting = False
        tracker.wake = None
        tracker.take_changes()
        if runtime.cluster is not None:
            with sigint_deferred():  # a Ctrl-C now would leave the cluster running
                runtime.cluster.close()
        if runtime.distributed is not None:
            runtime.distributed.close()


atexit.register(shutdown)


def _current() -> _Runtime:
    runtime = _runtime
    if runtime is None:
        raise ClusterError("daskray is not running: call daskray.init() first")
    return runtime


def _session(auto_start: bool = True) -> Session | LocalSession:
    """The session remote calls go through: the driver's, or the worker's inside a task
    (see :mod:`daskray.backend`).  With none, :func:`_auto_init` starts one unless
    ``auto_start=False`` (calls that only make sense on a running cluster)."""
    return backend.current(auto_start=auto_start)


def _auto_init() -> None:
    """Ray's auto-init: the first call that needs a cluster (``put``, ``get``,
    ``wait``, ``.remote()``, ``get_actor``) starts one as ``init()`` would, joining
    ``DASKRAY_ADDRESS`` if set.  Unlike an explicit ``init()``, daskray does not
    become dask's default scheduler: a program that never called ``init`` keeps
    dask's own.  Shut down at exit like any other.

    Only a process where daskray never ran starts one: after :func:`shutdown`, calls
    raise ``ClusterError`` until the next ``init()`` -- a ref of the old cluster, or
    a thread still calling at interpreter exit, must not start a new cluster."""
    with _lock:
        if _runtime is not None or _ever_started or "DASKRAY_CONFIG" in os.environ:
            return  # running, shut down, or one of daskray's own processes
        init(set_dask_scheduler=False)


backend.set_auto_start(_auto_init)


def get(obj: Any, keys: Any = None, *, timeout: float | None = None, **kwargs: Any) -> Any:
    """The values of ObjectRefs, or the results of a dask graph.

    ``get(ref)`` / ``get([ref, ...])`` returns the object's value / a list of them
    (Ray's ``get``), waiting at most ``timeout`` seconds (``GetTimeoutError``).

    ``get(dsk, keys, **kwargs)`` is dask's scheduler entry point: use it as
    ``dask.compute(x, scheduler=daskray.get)``, ``scheduler="daskray"``, or just
    ``x.compute()`` after :func:`init`.  ``keys`` may be one key, a list or nested
    lists of keys; lists come back as tuples.  Unknown keyword arguments are
    accepted and ignored.

    Which one is meant is decided by the type of the first argument alone.
    """
    if isinstance(obj, ObjectRef):
        return _session().get([obj], timeout)[0]
    if isinstance(obj, (list, tuple)):
        bad = next((x for x in obj if not isinstance(x, ObjectRef)), None)
        if bad is not None:
            raise TypeError(
                f"daskray.get() of a list expects ObjectRefs, found {type(bad).__name__}; "
                "to compute a dask graph pass the graph and its keys")
        return _session().get(list(obj), timeout)
    if keys is None:
        raise TypeError(
            "daskray.get() takes an ObjectRef, a list of ObjectRefs, or a dask graph "
            f"and its keys; got {type(obj).__name__} and no keys")
    return _get_dask(obj, keys, **kwargs)


def _persist(collections: list, optimize_graph: bool = True, **kwargs: Any) -> list:
    """``dask.persist(..., scheduler=daskray.get)``: results stay in the cluster."""
    on_dask = _dask_session()
    if on_dask is not None:
        return on_dask.persist(collections, optimize_graph, **kwargs)
    runtime = _current()
    if runtime.local_mode:
        return [dask.persist(c, scheduler="sync", optimize_graph=optimize_graph)[0]
                for c in collections]
    return dask_scheduler.persist(runtime.cluster.client, collections, optimize_graph, **kwargs)


get.persist = _persist  # dask hands persist to a scheduler get that has this


def _dask_session() -> Any:
    """The dask.distributed backend's session of this process (the driver's, or a
    task's on a dask worker, which has no runtime of its own), or None."""
    session = backend.installed()
    return session if getattr(session, "on_dask", False) else None


def _get_dask(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    on_dask = _dask_session()
    if on_dask is not None:
        return on_dask.compute(dsk, keys, **kwargs)
    runtime = _current()
    if runtime.local_mode:
        kwargs.pop("num_workers", None)
        graph = convert(dsk, kwargs.get("cache"))
        refs = {k: ObjectRef(ref_key_of(k)) for k in external_keys(graph, keys)}
        if refs:  # ObjectRefs in the graph: their values, from this process
            kwargs["cache"] = {**(kwargs.get("cache") or {}),
                               **dict(zip(refs, runtime.session.get(list(refs.values()))))}
        return dask.local.get_sync(graph, keys, **kwargs)
    return dask_scheduler.get(runtime.cluster.client, dsk, keys, **kwargs)


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the cluster once; tasks given the ref read it there."""
    return _session().put(value)


def wait(refs: list, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list, list]:
    """Split ``refs`` into (ready, not ready) once ``num_returns`` are ready or
    ``timeout`` seconds passed; both lists keep the input order."""
    refs = list(refs)
    if not refs:  # Ray's answer for nothing to wait for, whatever num_returns says
        return [], []
    if not all(isinstance(r, ObjectRef) for r in refs):
        raise TypeError("daskray.wait() expects a list of ObjectRefs")
    if len(set(refs)) != len(refs):
        raise ValueError("daskray.wait() expects distinct ObjectRefs")
    return _session().wait(refs, num_returns, timeout)


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task behind ``ref``, as Ray's ``cancel``: dropped if queued; if
    running, a ``KeyboardInterrupt`` is raised in it (``force=True``: the worker
    process running it is killed, and another one started).  ``get`` of it, and of
    what depends on it, then raises ``TaskCancelledError``.  With ``recursive``
    (the default) the tasks it started are cancelled too, and theirs.  A finished
    task is left alone; ``force=True`` on an actor's call raises ``ValueError``."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"daskray.cancel() expects an ObjectRef, got {type(ref).__name__}")
    _session().cancel([ref], force=force, recursive=recursive)


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a remote function: ``@daskray.remote`` or ``@daskray.remote(num_cpus=1, ...)``.

    Options: ``num_cpus``, ``num_gpus``, ``resources``, ``num_returns``,
    ``max_retries`` (re-runs after a worker died; default 3), ``retry_exceptions``
    (also re-run after the task raised), ``name``.  Invalid ones raise here.
    """
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args or not options:  # @remote() too: Ray refuses empty parentheses
        raise TypeError("use @daskray.remote (no parentheses) or "
                        "@daskray.remote(option=value, ...)")
    check_options(options, {**TASK_OPTIONS, **ACTOR_OPTIONS}, "@daskray.remote")
    return lambda obj: _make_remote(obj, options)


def _make_remote(obj: Any, options: dict) -> Any:
    if isinstance(obj, type):
        return ActorClass(obj, options)
    return RemoteFunction(obj, options)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """End the actor now; calls in flight and later calls raise ``ActorDiedError``.
    With ``no_restart=False`` it ends as if its process crashed: it restarts (its
    constructor runs again) if ``max_restarts`` has restarts left, as Ray's."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"daskray.kill() expects an actor handle, got {type(actor).__name__}")
    _session(auto_start=False).kill_actor(actor, no_restart=no_restart)


def exit_actor() -> None:
    """Ray's ``exit_actor()``: called in an actor's method, end that actor now, for
    good (no restart), after its ``__ray_shutdown__`` and atexit handlers.  The call
    itself and the calls queued after it raise ``ActorDiedError``; later calls too."""
    actor_host.exit_actor(_session(auto_start=False))


class RuntimeContext:
    """Where the calling code runs, as Ray's ``get_runtime_context()`` tells it."""

    def __init__(self) -> None:
        session = _session(auto_start=False)
        self._node_id = "local"
        #: the driver's (in a task or an actor: not known there, None)
        self._namespace = _runtime.namespace if _runtime is not None else None
        ids = getattr(session, "runtime_ids", None)  # a backend that tells its own
        if ids is not None:
            self.__dict__.update({f"_{name}": value for name, value in ids().items()})
            self._local_mode = False
            return
        conn = getattr(session, "conn", None)
        self._in_worker = context.worker_session is not None
        self._worker_id = getattr(conn, "id", None) if self._in_worker else None
        self._actor_id = getattr(conn, "actor", None) if self._in_worker else None
        self._task_id = getattr(conn, "current", None) if self._in_worker else None
        self._job_id = conn.client_id.hex() if conn is not None and not self._in_worker \
            else None
        self._local_mode = isinstance(session, LocalSession)

    def get_job_id(self) -> str | None:
        """The driver's id (in the driver; None inside the cluster's processes)."""
        return self._job_id

    def get_node_id(self) -> str:
        """The machine running this code: ``"local"`` on daskray's own runtime (one
        machine), the dask worker's address on a dask.distributed cluster (the driver's
        is ``"driver"``)."""
        return self._node_id

    def get_worker_id(self) -> str | None:
        """The worker process running this code, or None in the driver."""
        return self._worker_id

    def get_actor_id(self) -> str | None:
        """The actor whose method runs this code, or None."""
        return self._actor_id

    def get_task_id(self) -> str | None:
        """The task running this code (a remote call or an actor call), or None."""
        return None if self._task_id is None else str(self._task_id)

    @property
    def namespace(self) -> str | None:
        """The driver's namespace (``init(namespace=...)``, or its anonymous one),
        where its named actors are; None inside a task or an actor."""
        return self._namespace

    def get(self) -> dict:
        """Ray's dict of the context: ``job_id``, ``node_id``, ``namespace``, and in
        a task or an actor ``task_id`` / ``actor_id``."""
        info = {"job_id": self.get_job_id(), "node_id": self.get_node_id(),
                "namespace": self.namespace}
        if self.get_task_id() is not None:
            info["task_id"] = self.get_task_id()
        if self.get_actor_id() is not None:
            info["actor_id"] = self.get_actor_id()
        return info

    def is_local_mode(self) -> bool:
        """Whether daskray runs in ``local_mode`` (``init(local_mode=True)``): every
        call then runs in this process, one at a time, and no other process exists."""
        return self._local_mode

    def __repr__(self) -> str:
        return (f"RuntimeContext(worker={self._worker_id}, actor={self._actor_id}, "
                f"task={self._task_id}, job={self._job_id})")


def get_runtime_context() -> RuntimeContext:
    """Ray's ``get_runtime_context()``: ids of the job, worker, actor and task
    running the calling code."""
    return RuntimeContext()


def cluster_resources() -> dict:
    """What the cluster's task workers offer, as Ray's ``cluster_resources()``:
    ``{"CPU": workers, <custom resource>: amount, "object_store_memory": bytes}``
    (floats).  In ``local_mode``, one CPU: calls run one at a time."""
    return _session(auto_start=False).resources()[0]


def available_resources() -> dict:
    """What is free now, as Ray's ``available_resources()``: the resources of the
    workers running no task (each runs one at a time), and the store's free bytes."""
    return _session(auto_start=False).resources()[1]


def nodes() -> list[dict]:
    """The machines of the cluster, as Ray's ``nodes()``: daskray runs on one."""
    import platform

    # a cluster of many machines tells its own
    machines = getattr(_session(auto_start=False), "nodes", None)
    if machines is not None:
        return machines()
    return [{"NodeID": "local", "Alive": True, "NodeManagerAddress": "127.0.0.1",
             "NodeManagerHostname": platform.node(), "Resources": cluster_resources()}]


def get_actor(name: str, namespace: str | None = None, *, _missing_ok: bool = False) -> Any:
    """The handle of the actor created with ``name=...`` in ``namespace`` (None:
    this driver's, see :func:`init`); ``ValueError`` if none."""
    check_str("an actor's name", name)
    check_str("a namespace", namespace, optional=True)
    handle = _session().get_actor(name, namespace=namespace)
    if handle is None and not _missing_ok:
        where = "this driver's namespace" if namespace is None else f"namespace {namespace!r}"
        raise ValueError(f"no actor named {name!r} is alive in {where}")
    return handle


def list_named_actors(all_namespaces: bool = False) -> list:
    """Ray's ``util.list_named_actors``: the names of the live named actors in this
    driver's namespace, or with ``all_namespaces=True`` a ``{"name": ...,
    "namespace": ...}`` dict for every one in the cluster."""
    return _session(auto_start=False).named_actors(bool(all_namespaces))


dask.base.named_schedulers["daskray"] = get
