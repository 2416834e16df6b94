"""A cluster on this machine: one head process, which starts the workers.

:class:`LocalCluster` is started by a driver, which owns it; an
:class:`AttachedCluster` is a driver's connection to a cluster another process
owns (``daskray start --head``, see :mod:`daskray.runtime.standalone`).

Everything of a session lives in one private directory (mode 0700, under the
system temp directory): the ipc sockets and the file naming the driver that
owns it, and daskray's marker (see :func:`shared_memory.write_marker`).
``close()`` removes it; a session whose driver, head and workers were all
SIGKILLed leaves it behind, and the next :class:`LocalCluster` on the host sweeps
it: only a private directory of this user holding the marker, whose driver is gone.

Starting is interrupt-safe: whatever exception arrives while a cluster starts
(Ctrl-C included), what was started so far is stopped and removed before it
propagates.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from functools import partial
from typing import Iterator

from ..errors import ClusterError
from . import protocol as P
from . import host_transfer, settings, shared_memory, store_memory
from .client import SHUT_DOWN, Client
from .host_transfer import SharedObjectServer
from .store_memory import HostStore
from .supervision import replacement_backoff_max
from .process import alive, describe_exit, inherited_dask_config, lock_held, spawn
from .transport import ipc_address

SESSION_PREFIX = "daskray-"
OWNER_FILE = "driver.pid"
#: held locked by the owner of a standalone cluster (``daskray start --head``) for its whole life
LOCK_FILE = "owner.lock"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0
#: a session directory's name: mkdtemp's 8 random characters after the prefix
_SESSION_NAME = re.compile(r"daskray-[a-z0-9_]{8}\Z")


def make_session_dir() -> str:
    """A new private session directory (mode 0700, under the system temp directory)
    holding daskray's marker: the proof :func:`sweep_stale_sessions` asks for."""
    path = tempfile.mkdtemp(prefix=SESSION_PREFIX)
    try:
        shared_memory.write_marker(path, os.getpid())
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def sweep_stale_sessions() -> list[str]:
    """Remove the session directories and shared-memory directories daskray made
    for this user whose processes are all gone; the session directories' paths.

    Nothing else is ever touched: not a file, a symlink, another user's entry, nor
    a directory without daskray's marker, whatever its name or age."""
    shared_memory.sweep_dead_sessions(alive)
    removed = []
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(tmp, name)
        if _SESSION_NAME.match(name) and _stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _stale(path: str) -> bool:
    """Whether ``path`` is a session directory daskray made for this user whose
    driver is gone (its maker, if no driver wrote its pid yet) and which no
    ``daskray start`` owner holds."""
    maker = shared_memory.marked_session(path)
    if maker is None:
        return False
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pid = maker  # the driver has not written its pid yet
    if pid > 0 and alive(pid):
        return False
    return not owner_alive(path)


def owner_alive(session_dir: str) -> bool:
    """Whether the owner of the cluster in ``session_dir`` runs: it holds a lock on
    its lock file for its whole life (a pid could have been reused; a lock cannot)."""
    return lock_held(os.path.join(session_dir, LOCK_FILE))


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back while the block runs, then deliver it: for steps
    that start something and record it, and for clean-up, which an interrupt
    must not cut short.  Only the main thread receives Python's signals; in any
    other thread (or with a handler Python does not own) the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[-1])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def worker_ttl() -> float | None:
    """Seconds a worker may stay silent before the head kills it as hung: dask's
    own ``distributed.scheduler.worker-ttl`` (default 5 minutes), as with
    dask.distributed; None (or "none") never."""
    return settings.duration("distributed.scheduler.worker-ttl", "5 minutes", 1.5, "60s",
                             why="three of the head's pings", never=True)


class LocalCluster:
    """Head and workers on this machine, bound to a private ipc directory."""

    def __init__(self, num_workers: int, validate: bool = False,
                 resources: list | None = None, store_limit: int | None = None,
                 store_namespaces: int = 1, session_dir: str | None = None,
                 log_to_driver: bool = True, dashboard_port: int | None = None) -> None:
        ttl = worker_ttl()  # a bad setting fails before anything exists
        replacement_backoff_max()  # read again by the head
        sweep_stale_sessions()
        self.num_workers = num_workers
        self.log_to_driver = log_to_driver
        # what is started is recorded here at once: close() stops what exists
        self.session_dir: str | None = None
        self.shm_prefix: str | None = None
        self.store: HostStore | None = None
        self.head: subprocess.Popen | None = None
        self.client: Client | None = None
        self.object_server: SharedObjectServer | None = None
        try:
            with sigint_deferred():  # nothing started may go unrecorded
                self._start(session_dir, {
                    "num_workers": num_workers, "validate": validate, "resources": resources,
                    "store_namespaces": store_namespaces, "worker_ttl": ttl,
                    "dashboard_port": dashboard_port,
                }, store_limit)
            self.client.wait_ready(START_TIMEOUT_SECONDS)  # Ctrl-C may stop the start here
        except BaseException as exc:  # nothing of the session may stay
            code = self.head.poll() if self.head is not None else None
            with sigint_deferred():
                self.close()
            if isinstance(exc, ClusterError) and code is not None:
                raise ClusterError(
                    f"the daskray head process {describe_exit(code)} during start-up; "
                    "its error output is above"
                ) from exc
            raise

    def _start(self, session_dir: str | None, head_config: dict,
               store_limit: int | None) -> None:
        """Make the session's directories and store, start the head, connect to it."""
        store_namespaces = head_config["store_namespaces"]
        #: made by the caller when given (``daskray start`` keeps its log there)
        self.session_dir = session_dir or make_session_dir()
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
        self.head = spawn("daskray.runtime.start_head", {
            **head_config,
            "token": self.token.hex(),
            "session_dir": self.session_dir,
            "head_address": self.head_address,
            "shm_prefix": self.shm_prefix,
            "store_limit": self.store.limit,
        }, env=inherited_dask_config())  # the workers inherit the head's environment
        self.client = Client(self.head_address, self.token, head_pid=self.head.pid,
                             log_to_driver=self.log_to_driver)
        self.client.shm_prefix = own_prefix if shared_memory.available() else None
        if store_namespaces > 1:
            self.object_server = SharedObjectServer(
                self.client.ctx, ipc_address(self.session_dir, "driver-objects.sock"), self.token)
            self.object_server.start()
        shared_memory.configure(
            self.store, server=self.object_server and self.object_server.address,
            fetch_foreign=partial(host_transfer.fetch, self.client.ctx, self.token))

    def close(self) -> None:
        """Stop head and workers and remove the session directory: everything, or
        whatever a start cut short had made.  Safe to call twice."""
        if self.head is not None:
            self._stop_head()
        if self.object_server is not None:
            self.object_server.stop()
        if self.client is not None:
            self.client.close()
        if self.shm_prefix is not None:
            shared_memory.remove_session(self.shm_prefix)
        if self.store is not None:
            if shared_memory.store() is self.store:
                shared_memory.configure(None)
            self.store.close()
        if self.session_dir is not None:
            shutil.rmtree(self.session_dir, ignore_errors=True)

    def _stop_head(self) -> None:
        """Ask the head to stop its workers and exit; kill it if it cannot."""
        if self.head.poll() is not None:
            return
        if self.client is not None:
            self.client.fail_waiters(SHUT_DOWN)  # before the head's death tells them otherwise
            try:
                self.client.send(P.StopCluster())
            except ClusterError:
                pass
            try:
                self.head.wait(STOP_TIMEOUT_SECONDS)
                return
            except subprocess.TimeoutExpired:
                pass
        self.head.kill()  # its workers watch it and exit on their own
        self.head.wait()


class AttachedCluster:
    """This driver's connection to a cluster another process started and owns
    (``daskray start --head``): the same client and object store as a
    LocalCluster's, but ``close()`` only disconnects.  The head then drops this
    driver's ObjectRefs, as it does when the driver dies."""

    def __init__(self, info: dict, log_to_driver: bool = True) -> None:
        self.info = info
        self.log_to_driver = log_to_driver
        self.session_dir: str = info["session_dir"]
        self.token = bytes.fromhex(info["token"])
        self.head_address: str = info["address"]
        self.head_pid: int = info["head_pid"]
        self.shm_prefix: str = info["shm_prefix"]
        self.num_workers: int = info["num_workers"]
        self.store: HostStore | None = None
        self.client: Client | None = None
        try:
            with sigint_deferred():  # nothing started may go unrecorded
                self._connect(info["store_limit"])
            self.client.wait_ready(START_TIMEOUT_SECONDS)
        except BaseException:
            with sigint_deferred():
                self.close()
            raise

    def _connect(self, store_limit: int) -> None:
        self.store = HostStore(self.shm_prefix, self.session_dir, store_limit)
        self.client = Client(self.head_address, self.token, head_pid=self.head_pid,
                             log_to_driver=self.log_to_driver)
        self.client.linger_ms = 1000  # the goodbye must reach the head
        self.client.shm_prefix = self.shm_prefix if shared_memory.available() else None
        shared_memory.configure(
            self.store, fetch_foreign=partial(host_transfer.fetch, self.client.ctx, self.token))

    def close(self) -> None:
        """Disconnect; the cluster goes on.  Safe to call twice."""
        if self.client is not None:
            if not self.client.closed and self.client.failure is None:
                try:
                    self.client.send(P.ClientGoodbye())
                except ClusterError:
                    pass
            self.client.close()
        if self.store is not None:
            if shared_memory.store() is self.store:
                shared_memory.configure(None)
            self.store.close()
