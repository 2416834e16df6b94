"""Joining a dask.distributed cluster: the client, and a check that its workers can
run daskray's tasks (they unpickle ObjectRefs and call daskray's own code)."""

from __future__ import annotations

import gc
from typing import Any

import dask.config
import dask.utils

from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from .. import __version__
from ..errors import ClusterError
from ..refs import tracker
from . import actor_host, output, worker_side
from .session import DistributedSession

PLUGIN_NAME = "daskray"


def connect(address: str, security: Any = None) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``; it does not become
    dask's default scheduler (daskray does, through ``daskray.get``).  It waits for the
    scheduler as long as dask's ``distributed.comm.timeouts.connect`` says (30 s)."""
    timeout = dask.utils.parse_timedelta(
        dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
    try:
        return Client(address, security=security, timeout=timeout, set_as_default=False)
    except TypeError as exc:
        if "ssl_context" not in str(exc):
            raise
        problem = (f"{address!r} is a TLS address and no TLS settings were given: pass "
                   "security=distributed.security.Security(tls_ca_file=..., "
                   "tls_client_cert=..., tls_client_key=...) to daskray.init, or set dask's "
                   "config distributed.comm.tls.*")
    except OSError as exc:
        problem = (f"could not reach the dask scheduler at {address!r} within {timeout:.0f} s "
                   f"({exc}); is `dask scheduler` running there, and reachable from this host?")
    # The half-started client closes itself when collected, and with it the event loop
    # thread distributed shares between clients: collect it now, not in the middle of
    # the next client's start.  Raised here, not in the handler, so that the error's
    # context does not keep it alive.
    gc.collect()
    raise ClusterError(problem)


def check_workers(client: Any, version: str) -> None:
    """Install daskray's worker plugin on every worker (and on those that join later):
    a worker without daskray, or with another version, is named in the error."""
    try:
        replies = client.register_plugin(DaskrayWorkerPlugin(version), name=PLUGIN_NAME)
    except Exception as exc:
        raise ClusterError(
            f"the dask workers could not set daskray up ({type(exc).__name__}: {exc}); "
            f"install daskray {version} in the workers' Python environment (tasks "
            "unpickle ObjectRefs and actor handles there)") from None
    bad = {addr: reply for addr, reply in (replies or {}).items()
           if isinstance(reply, dict) and reply.get("status") == "error"}
    if bad:
        addr, reply = next(iter(bad.items()))
        raise ClusterError(
            f"{len(bad)} dask worker(s) could not set daskray up, e.g. {addr}: "
            f"{reply.get('exception_text') or reply.get('exception')}; install daskray "
            f"{version} in the workers' Python environment")


class DaskrayWorkerPlugin(WorkerPlugin):
    """Installed on every dask worker by ``daskray.init`` (and on those that join
    later): checks the worker runs the driver's daskray version, starts counting
    the ObjectRefs its process unpickles (task arguments, fetched values) so that it
    can want them too, and ends an actor's host when dask releases it."""

    idempotent = True

    def __init__(self, version: str) -> None:
        self.version = version

    def setup(self, worker: Any = None) -> None:
        if __version__ != self.version:
            raise RuntimeError(
                f"this dask worker runs daskray {__version__}, the driver {self.version}: "
                "install the same daskray version on the driver and every worker")
        worker_side.session_class = DistributedSession
        tracker.reporting = True

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """An actor's host whose task dask released here ends at once."""
        if finish in ("released", "forgotten"):
            actor_host.released(key)


def join(address: str | None, client: Any, security: Any,
         log_to_driver: bool = True) -> DistributedSession:
    """The driver's session on the dask cluster at ``address`` (a client of its own)
    or behind ``client`` (the caller's, left open at the end).  With
    ``log_to_driver``, what remote calls print is written here (see ``.output``)."""
    owns_client = client is None
    if owns_client:
        client = connect(address, security)
    try:
        check_workers(client, __version__)
    except BaseException:
        if owns_client:
            client.close()
        raise
    session = DistributedSession(client, owns_client=owns_client)
    if log_to_driver:
        client.subscribe_topic(output.TOPIC, output.write_event)
        session.output_subscribed = True
    return session
