"""A cluster on this machine: one head process, which starts the workers.

:class:`LocalCluster` is started by a driver, which owns it; an
:class:`AttachedCluster` is a driver's connection to a cluster another process
owns (``daskray start --head``, see :mod:`daskray.runtime.standalone`).

Everything of a session lives in one private directory (mode 0700, under the
system temp directory): the ipc sockets and the file naming the driver that
owns it.  ``close()`` removes it; a session whose driver, head and workers were
all SIGKILLed leaves it behind, and the next :class:`LocalCluster` on the host
sweeps it (only sessions whose driver is gone).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
import time
from functools import partial

from ..errors import ClusterError
from . import protocol as P
from . import host_transfer, shared_memory, store_memory
from .client import Client
from .host_transfer import SharedObjectServer
from .store_memory import HostStore
from .head import replacement_backoff_max
from .process import alive, describe_exit, inherited_dask_config, spawn
from .transport import ipc_address

SESSION_PREFIX = "daskray-"
OWNER_FILE = "driver.pid"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0


def sweep_stale_sessions() -> list[str]:
    """Remove session directories and shared-memory files whose driver process is
    gone; the directories' paths."""
    shared_memory.sweep_dead_sessions(alive)
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SESSION_PREFIX + "*")):
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            # no owner file: a session still starting, or not ours -- only very old ones go
            try:
                if time.time() - os.path.getmtime(path) < 3600:
                    continue
            except OSError:
                continue
            pid = -1
        if pid > 0 and alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def worker_ttl() -> float | None:
    """Seconds a worker may stay silent before the head kills it as hung: dask's
    own ``distributed.scheduler.worker-ttl`` (default 5 minutes), as with
    dask.distributed; None (or "none") never."""
    import dask.config
    import dask.utils

    value = dask.config.get("distributed.scheduler.worker-ttl", "5 minutes")
    if value is None or str(value).lower() in ("none", "false"):
        return None
    try:
        seconds = dask.utils.parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError):
        raise ValueError(
            f"distributed.scheduler.worker-ttl must be a duration such as '60s', got {value!r}"
        ) from None
    if seconds is None or seconds < 1.5:
        raise ValueError(
            f"distributed.scheduler.worker-ttl must be at least 1.5 s (three of the head's "
            f"pings), got {value!r}")
    return float(seconds)


class LocalCluster:
    """Head and workers on this machine, bound to a private ipc directory."""

    def __init__(self, num_workers: int, validate: bool = False,
                 resources: list | None = None, store_limit: int | None = None,
                 store_namespaces: int = 1, session_dir: str | None = None) -> None:
        ttl = worker_ttl()  # a bad setting fails before anything exists
        replacement_backoff_max()  # read again by the head
        sweep_stale_sessions()
        self.num_workers = num_workers
        #: made by the caller when given (``daskray start`` keeps its log there)
        self.session_dir = session_dir or tempfile.mkdtemp(prefix=SESSION_PREFIX)
        with open(os.path.join(self.session_dir, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        self.token = secrets.token_bytes(32)
        self.shm_prefix = shared_memory.create_session_dir(os.getpid()) \
            if shared_memory.available() else os.path.join(self.session_dir, "shm", "")
        # several store namespaces stand in for several hosts (see host_transfer)
        own_prefix = self.shm_prefix if store_namespaces == 1 else \
            store_memory.namespace_prefix(self.shm_prefix, 0)
        self.store = HostStore(own_prefix, self.session_dir,
                               store_limit or store_memory.default_limit())
        self.head_address = ipc_address(self.session_dir, "head.sock")
        try:
            self.head = spawn("daskray.runtime.start_head", {
                "token": self.token.hex(),
                "session_dir": self.session_dir,
                "head_address": self.head_address,
                "shm_prefix": self.shm_prefix,
                "store_limit": self.store.limit,
                "store_namespaces": store_namespaces,
                "num_workers": num_workers,
                "validate": validate,
                "resources": resources,
                "worker_ttl": ttl,
            }, env=inherited_dask_config())  # the workers inherit the head's environment
        except BaseException:  # nothing of the session may stay
            shared_memory.remove_session(self.shm_prefix)
            self.store.close()
            shutil.rmtree(self.session_dir, ignore_errors=True)
            raise
        self.client = Client(self.head_address, self.token, head_pid=self.head.pid)
        self.client.shm_prefix = own_prefix if shared_memory.available() else None
        self.object_server = None
        if store_namespaces > 1:
            self.object_server = SharedObjectServer(
                self.client.ctx, ipc_address(self.session_dir, "driver-objects.sock"), self.token)
            self.object_server.start()
        shared_memory.configure(
            self.store, server=self.object_server and self.object_server.address,
            fetch_foreign=partial(host_transfer.fetch, self.client.ctx, self.token))
        try:
            self.client.wait_ready(START_TIMEOUT_SECONDS)
        except ClusterError as exc:
            code = self.head.poll()
            self.close()
            if code is not None:
                raise ClusterError(
                    f"the daskray head process {describe_exit(code)} during start-up; "
                    "its error output is above"
                ) from exc
            raise

    def close(self) -> None:
        """Stop head and workers and remove the session directory. Safe to call twice."""
        if self.head.poll() is None:
            try:
                self.client.send(P.StopCluster())
            except ClusterError:
                pass
            try:
                self.head.wait(STOP_TIMEOUT_SECONDS)
            except Exception:
                self.head.kill()
                self.head.wait()
        if self.object_server is not None:
            self.object_server.stop()
        self.client.close()
        shared_memory.remove_session(self.shm_prefix)
        if shared_memory.store() is self.store:
            shared_memory.configure(None)
        self.store.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)


class AttachedCluster:
    """This driver's connection to a cluster another process started and owns
    (``daskray start --head``): the same client and object store as a
    LocalCluster's, but ``close()`` only disconnects.  The head then drops this
    driver's ObjectRefs, as it does when the driver dies."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.session_dir: str = info["session_dir"]
        self.token = bytes.fromhex(info["token"])
        self.head_address: str = info["address"]
        self.head_pid: int = info["head_pid"]
        self.shm_prefix: str = info["shm_prefix"]
        self.num_workers: int = info["num_workers"]
        self.store = HostStore(self.shm_prefix, self.session_dir, info["store_limit"])
        self.client = Client(self.head_address, self.token, head_pid=self.head_pid)
        self.client.linger_ms = 1000  # the goodbye must reach the head
        self.client.shm_prefix = self.shm_prefix if shared_memory.available() else None
        shared_memory.configure(
            self.store, fetch_foreign=partial(host_transfer.fetch, self.client.ctx, self.token))
        try:
            self.client.wait_ready(START_TIMEOUT_SECONDS)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Disconnect; the cluster goes on.  Safe to call twice."""
        if not self.client.closed and self.client.failure is None:
            try:
                self.client.send(P.ClientGoodbye())
            except ClusterError:
                pass
        self.client.close()
        if shared_memory.store() is self.store:
            shared_memory.configure(None)
        self.store.close()
