"""A cluster that outlives the command that started it: ``daskray start --head``.

A detached process of its own (no terminal, its own session) owns a
:class:`~daskray.runtime.cluster.LocalCluster`, exactly as a driver does, so the
head, the workers, the clean-up on exit and the sweep of a SIGKILLed session
work unchanged.  Once the workers are up it writes the *cluster file* into the
session directory (mode 0600 inside the 0700 directory): the head's address,
the session token, the shared-memory store.  Only the same user can read it,
and the token in it is what lets a driver in (:func:`find_cluster`,
``daskray.init(address=...)``).

The owner stops the cluster on SIGTERM or SIGINT (``daskray stop``), or when the
head dies, and removes everything of the session, log included.
"""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import sys
import tempfile
import time
from typing import Any

from ..errors import ClusterError
from .cluster import SESSION_PREFIX, LocalCluster
from .process import alive, child_setup, pidfd

CLUSTER_FILE = "cluster.json"
LOG_FILE = "cluster.log"


def cluster_file(session_dir: str) -> str:
    return os.path.join(session_dir, CLUSTER_FILE)


def running_clusters() -> list[dict]:
    """This user's clusters started with ``daskray start --head`` whose owner
    process is alive, newest first."""
    found = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SESSION_PREFIX + "*", CLUSTER_FILE)):
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue  # another user's, or being written
        if isinstance(info, dict) and alive(info.get("owner_pid", -1)):
            found.append(info)
    return sorted(found, key=lambda i: i.get("started", 0), reverse=True)


def find_cluster(address: str) -> dict:
    """The cluster file's contents for ``address``: ``"auto"`` (the newest running
    cluster of this user), the head's address as ``daskray start`` printed it, or
    the session directory."""
    if address == "auto":
        clusters = running_clusters()
        if not clusters:
            raise ClusterError(
                "no running daskray cluster found on this machine (address='auto'); start "
                "one with `daskray start --head`, or call daskray.init() without an "
                "address to start one for this process")
        return clusters[0]
    path = address[len("ipc://"):] if address.startswith("ipc://") else address
    session_dir = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.basename(session_dir).startswith(SESSION_PREFIX):
        raise ClusterError(
            f"{address!r} is not the address of a daskray cluster on this machine: give "
            "the address `daskray start --head` printed (ipc://...), or 'auto'. daskray "
            "runs on one machine; it cannot join another host's cluster")
    try:
        with open(cluster_file(session_dir)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        raise ClusterError(
            f"no running daskray cluster at {address!r} (no readable cluster file in "
            f"{session_dir}); `daskray status` lists the running ones") from None
    if not alive(info.get("owner_pid", -1)):
        raise ClusterError(f"the daskray cluster at {address!r} has stopped")
    return info


def _write_private(path: str, data: str) -> None:
    """Write ``path`` readable by this user only, all at once (no half file is seen)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def main() -> None:
    """The owner process (``python -m daskray.runtime.standalone``)."""
    config = child_setup()
    ready_fd: int = config["ready_fd"]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.append(True))
    try:
        cluster = LocalCluster(config["num_workers"], resources=config.get("resources"),
                               store_limit=config.get("store_limit"),
                               session_dir=config["session_dir"])
    except BaseException as exc:  # noqa: BLE001 - told to `daskray start`, which exits 1
        os.write(ready_fd, f"error: {exc}\n".encode())
        raise SystemExit(1) from None
    code = 0
    try:
        info: dict[str, Any] = {
            "address": cluster.head_address,
            "token": cluster.token.hex(),
            "session_dir": cluster.session_dir,
            "shm_prefix": cluster.shm_prefix,
            "store_limit": cluster.store.limit,
            "num_workers": cluster.num_workers,
            "resources": config.get("resources"),
            "owner_pid": os.getpid(),
            "head_pid": cluster.head.pid,
            "log": os.path.join(cluster.session_dir, LOG_FILE),
            "started": time.time(),
        }
        _write_private(cluster_file(cluster.session_dir), json.dumps(info))
        os.write(ready_fd, f"ready {cluster.head_address}\n".encode())
        os.close(ready_fd)
        head_fd = pidfd(cluster.head.pid)
        watched = [wake_r] + ([head_fd] if head_fd is not None else [])
        while not stop and cluster.head.poll() is None:
            select.select(watched, [], [], None if head_fd is not None else 1.0)
            while True:  # the signal handler has run; empty the wake-up pipe
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        if cluster.head.poll() is not None:
            print("daskray: the head process exited; the cluster is stopping", file=sys.stderr)
            code = 1
    finally:
        cluster.close()  # removes the session directory, cluster file and log with it
    raise SystemExit(code)


if __name__ == "__main__":
    main()
