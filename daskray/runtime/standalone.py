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

import fcntl
import glob
import json
import math
import os
import re
import select
import signal
import stat
import sys
import tempfile
import time
from typing import Any

from ..errors import ClusterError
from .cluster import LOCK_FILE, SESSION_PREFIX, LocalCluster, owner_alive
from .process import child_setup, pidfd

CLUSTER_FILE = "cluster.json"
LOG_FILE = "cluster.log"
CRASH_LOG_PREFIX = "daskray-crashed-"
_CRASH_LOG_NAME = re.compile(r"daskray-crashed-\d+(-\d+)?\.log\Z")
#: no cluster file is larger; a larger one is malformed
MAX_CLUSTER_FILE = 1 << 20


def cluster_file(session_dir: str) -> str:
    return os.path.join(session_dir, CLUSTER_FILE)


def _private_dir(path: str) -> bool:
    """Whether ``path`` is a real directory of this user that nobody else can enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


class MalformedClusterFile(ClusterError):
    """A cluster file of this user's that is not in the shape ``daskray start``
    writes: another version's, or damaged."""

    def __init__(self, session_dir: str, problem: str) -> None:
        lock = os.path.join(session_dir, LOCK_FILE)
        super().__init__(
            f"the cluster file {cluster_file(session_dir)} is malformed ({problem}): it was "
            "written by another version of daskray, or damaged, so daskray can neither join "
            f"nor stop that cluster. End the process that owns it (the one holding {lock}, "
            f"which `lsof {lock}` names) if it still runs, then remove {session_dir}; or "
            "give the address of another cluster")


#: the cluster file's fields and their JSON types (bool is no number here)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "address": str, "token": str, "session_dir": str, "shm_prefix": str, "log": str,
    "store_limit": int, "num_workers": int, "owner_pid": int, "head_pid": int,
    "started": (int, float),
}


def _read_cluster_file(session_dir: str) -> dict | None:
    """The cluster file of ``session_dir`` if this user made it and nobody else could
    have (the directory and the file private, no symlink), else None.  A driver
    trusts what it says: the head it names sends pickles.  Such a file that is not
    in the shape ``daskray start`` writes raises :class:`MalformedClusterFile`."""
    text = _private_file_text(session_dir)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise MalformedClusterFile(session_dir, f"not JSON: {exc}") from None
    problem = _malformation(info, session_dir)
    if problem is not None:
        raise MalformedClusterFile(session_dir, problem)
    shm_dir = shm_dir_of(info)
    if not (shm_dir.startswith(session_dir + os.sep) or _private_dir(shm_dir)):
        return None
    return info


def _private_file_text(session_dir: str) -> bytes | None:
    """The cluster file's bytes if it and its directory are this user's and private
    (no symlink), else None."""
    if not _private_dir(session_dir):
        return None
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the reader
        fd = os.open(cluster_file(session_dir), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        return f.read(MAX_CLUSTER_FILE)


def _malformation(info: Any, session_dir: str) -> str | None:
    """What makes ``info`` other than what ``daskray start`` writes; None if nothing."""
    if not isinstance(info, dict):
        return f"a JSON {type(info).__name__} where an object was expected"
    missing = sorted(k for k in _FIELDS if k not in info)
    if missing:
        return f"no {', '.join(missing)}"
    wrong = sorted(k for k, kind in _FIELDS.items()
                   if not isinstance(info[k], kind) or isinstance(info[k], bool))
    if wrong:
        return f"wrong types of {', '.join(wrong)}"
    if info["session_dir"] != session_dir:
        return f"it names another session directory, {info['session_dir']!r}"
    if not info["address"].startswith("ipc://"):
        return f"the address {info['address']!r} is not an ipc:// address"
    try:
        if len(bytes.fromhex(info["token"])) < 16:
            return "the token is too short"
    except ValueError:
        return "the token is not hexadecimal"
    small = sorted(k for k in ("store_limit", "num_workers", "owner_pid", "head_pid")
                   if info[k] < 1)
    if small:
        return f"{', '.join(small)} not positive"
    if not math.isfinite(info["started"]) or info["started"] < 0:
        return "started is not a time"
    resources = info.get("resources")
    if resources is not None and not (
            isinstance(resources, list) and all(isinstance(r, dict) for r in resources)):
        return "resources is not a list of objects"
    return None


def shm_dir_of(info: dict) -> str:
    """The directory of the cluster's shared-memory segments (its ``shm_prefix``
    is that directory's path with a trailing separator)."""
    return os.path.normpath(str(info.get("shm_prefix", "")).rstrip(os.sep) or "/nonexistent")


def running_clusters() -> list[dict]:
    """This user's clusters started with ``daskray start --head`` whose owner
    process runs, newest first."""
    return scan_clusters()[0]


def scan_clusters() -> tuple[list[dict], list[MalformedClusterFile]]:
    """(this user's running clusters, newest first; the errors of the malformed
    cluster files of running owners)."""
    found, malformed = [], []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SESSION_PREFIX + "*")):
        if not owner_alive(path):
            continue
        try:
            info = _read_cluster_file(path)
        except MalformedClusterFile as exc:
            malformed.append(exc)
            continue
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda i: i["started"], reverse=True), malformed


def find_cluster(address: str) -> dict:
    """The cluster file's contents for ``address``: ``"auto"`` (the newest running
    cluster of this user), the head's address as ``daskray start`` printed it, or
    the session directory."""
    if address == "auto":
        clusters, malformed = scan_clusters()
        if not clusters and malformed:
            raise malformed[0]
        if not clusters:
            raise ClusterError(
                "no running daskray cluster found on this machine (address='auto'); start "
                "one with `daskray start --head`, or call daskray.init() without an "
                "address to start one for this process")
        return clusters[0]
    path = address[len("ipc://"):] if address.startswith("ipc://") else address
    session_dir = os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path))
    if not os.path.basename(session_dir).startswith(SESSION_PREFIX):
        raise ClusterError(
            f"{address!r} is not the address of a daskray cluster on this machine: give "
            "the address `daskray start --head` printed (ipc://...), or 'auto'. daskray "
            "runs on one machine; for many machines give a dask scheduler's address "
            "(tcp://HOST:8786) to run on a dask.distributed cluster")
    try:
        info = _read_cluster_file(session_dir)
    except MalformedClusterFile:
        if not owner_alive(session_dir):
            raise ClusterError(f"the daskray cluster at {address!r} has stopped") from None
        raise
    if info is None:
        raise ClusterError(
            f"no running daskray cluster of yours at {address!r} (no cluster file in "
            f"{session_dir} that only you could have written); `daskray status` lists "
            "the running ones")
    if not owner_alive(session_dir):
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
    # held until this process ends, however it ends: the proof that it runs
    lock_fd = os.open(os.path.join(config["session_dir"], LOCK_FILE),
                      os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
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
    head_fd = None
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
        if head_fd is not None:
            os.close(head_fd)
        if code:  # not asked to stop: the log says why, so it outlives the session
            keep_crash_log(cluster.session_dir)
        cluster.close()  # removes the session directory, cluster file and log with it
    raise SystemExit(code)


def keep_crash_log(session_dir: str) -> str | None:
    """Keep the log of a cluster that stopped without being asked to, readable by
    this user only, as ``$TMPDIR/daskray-crashed-<pid>.log`` (``-<pid>-<n>.log``
    if that name is taken); its path, or None if it could not be kept.

    A hard link to the log: it never follows nor replaces what is at that name (a
    symlink planted there, say), and the log's mode stays private."""
    log = os.path.join(session_dir, LOG_FILE)
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.fchmod(fd, 0o600)
        for n in range(100):
            name = f"{CRASH_LOG_PREFIX}{os.getpid()}{f'-{n}' if n else ''}.log"
            target = os.path.join(os.path.dirname(session_dir), name)
            try:
                os.link(log, target, follow_symlinks=False)
                return target
            except FileExistsError:
                continue
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def crash_logs() -> list[str]:
    """Logs of this user's clusters that stopped without being asked to: files of
    the name and kind :func:`keep_crash_log` makes (regular, this user's, private,
    one link), never a symlink or another user's file planted under such a name."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return []
    logs = []
    for name in sorted(names):
        if not _CRASH_LOG_NAME.match(name):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() \
                and not st.st_mode & 0o077 and st.st_nlink == 1:
            logs.append(path)
    return logs


if __name__ == "__main__":
    main()
