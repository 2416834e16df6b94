"""The host object store's memory limit: accounting, LRU spilling, ObjectStoreFullError.

Every process of a session writes its large objects into files of its own under
``/dev/shm`` (see :mod:`shared_memory`); the limit applies to all of them together.
There is no store server: the processes coordinate through the file system.

* **Accounting**: a lock file in the session directory makes "count, spill,
  create" and "unlink, count" one step across processes, and holds the bytes in
  use as its first 8 bytes.  When that count says a new object does not fit, the
  session's files in ``/dev/shm`` are listed and measured (which also corrects
  the count, say after a writer died before its files were counted out).
* **Least recently used**: writers and readers set a file's mtime when they touch
  it; spilling takes the oldest files first.
* **Pinning**: a reader holds a shared ``flock`` on an object's file for as long as
  its mapping lives (the mapping keeps a duplicate of the descriptor, and with it
  the lock, until the last view into it dies).  Spilling takes an exclusive lock
  without waiting and leaves alone any file it cannot lock: moving it would not
  free its pages.
* **Spilling**: a file is copied to the session's spill directory under the same
  name, then unlinked from ``/dev/shm``.  A reader that finds no file in
  ``/dev/shm`` maps the spilled copy from disk, so a descriptor stays valid
  whether or not its object was spilled.  An object larger than the whole limit
  is written to disk directly.
* **Full**: when the objects that could be spilled do not make room,
  :class:`~daskray.errors.ObjectStoreFullError` says how much was asked for, the
  limit, what is in use, and how much of it live views pin.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ObjectStoreFullError

SHM_DIR = "/dev/shm"
#: share of the machine's memory the store may use when no limit is given (Ray's default)
DEFAULT_FRACTION = 0.3
SPILL_DIR = "spill"


def namespace_prefix(session_prefix: str, namespace: int) -> str:
    """The file prefix of store namespace ``namespace`` of a session that has several."""
    return f"{session_prefix}h{namespace}-"


def default_limit() -> int:
    """30% of the machine's memory, and no more than 80% of ``/dev/shm``."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = int(ram * DEFAULT_FRACTION)
    try:
        shm = os.statvfs(SHM_DIR)
        limit = min(limit, int(shm.f_blocks * shm.f_frsize * 0.8))
    except OSError:
        pass
    return limit


@dataclass
class HostStore:
    """One session's shared-memory files, seen from one of its processes."""

    prefix: str  # every file of the session starts with this path
    session_dir: str
    limit: int
    _lock_fd: int | None = field(default=None, repr=False)
    _thread_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def spill_dir(self) -> str:
        return os.path.join(self.session_dir, SPILL_DIR)

    def spill_path(self, path: str) -> str:
        return os.path.join(self.spill_dir, os.path.basename(path))

    # ------------------------------------------------------------------ writing

    def create(self, path: str, size: int) -> int:
        """Create the file of a new object of ``size`` bytes, making room first: a
        descriptor open for writing that holds the writer's pin.  The file is
        ``path`` in ``/dev/shm``, or its spill path when the object is larger
        than the whole limit."""
        if size > self.limit:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
            return _create(self.spill_path(path), size)
        with self._locked() as lock_fd:
            used = _read_used(lock_fd)
            if used + size > self.limit:
                used, entries = self._scan()
                freed, pinned = self._spill(entries, used + size - self.limit)
                used -= freed
                _write_used(lock_fd, used)
                if used + size > self.limit:
                    raise ObjectStoreFullError(
                        f"the object store is full: an object of {_mib(size)} does not fit "
                        f"in its limit of {_mib(self.limit)}; {_mib(used)} is in use, "
                        f"{_mib(pinned)} of it pinned by live views (values still referenced "
                        "in some process) and the rest could not be spilled. Drop references "
                        "to objects you no longer need, or raise the limit with "
                        "daskray.init(object_store_memory=...)")
            fd = _create(path, size)
            _write_used(lock_fd, used + size)
            return fd

    # ------------------------------------------------------------------ reading

    def open_for_reading(self, path: str) -> int:
        """A descriptor of the object's file holding a reader's pin: in ``/dev/shm``,
        or its spilled copy.  ``FileNotFoundError`` if the object was freed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.spill_path(path), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:  # spilled (or freed) while we waited for the lock
            os.close(fd)
            return os.open(self.spill_path(path), os.O_RDONLY)
        with contextlib.suppress(OSError):
            os.utime(fd)  # most recently used
        return fd

    # ------------------------------------------------------------------ freeing

    def unlink(self, path: str) -> None:
        """Remove an object's file wherever it is."""
        if not path.startswith(self.prefix):  # another namespace's: its count corrects itself
            for p in (path, self.spill_path(path)):
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    os.unlink(p)
            return
        with self._locked() as lock_fd:
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except (FileNotFoundError, PermissionError):
                pass
            else:
                _write_used(lock_fd, max(0, _read_used(lock_fd) - size))
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(self.spill_path(path))

    def remove(self, prefix: str) -> int:
        """Remove the spilled files whose ``/dev/shm`` path starts with ``prefix``."""
        name = os.path.basename(prefix)
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.spill_dir):
                if entry.name.startswith(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    # ------------------------------------------------------------------ accounting

    def stats(self) -> dict:
        """The store's use: bytes and objects in memory and spilled, and the limit."""
        used, entries = self._scan()
        spilled = [e.stat().st_size for e in _scandir(self.spill_dir)
                   if e.name.startswith(os.path.basename(self.prefix))]
        return {"limit": self.limit, "used": used, "objects": len(entries),
                "spilled": sum(spilled), "spilled_objects": len(spilled),
                "spill_dir": self.spill_dir}

    def _scan(self) -> tuple[int, list[tuple[float, int, str]]]:
        name = os.path.basename(self.prefix)
        entries = []
        for entry in _scandir(os.path.dirname(self.prefix)):
            if entry.name.startswith(name):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, entry.path))
        return sum(e[1] for e in entries), entries

    def _spill(self, entries: list[tuple[float, int, str]], needed: int) -> tuple[int, int]:
        """Move least recently used unpinned files to disk until ``needed`` bytes
        are free: (bytes freed, bytes found pinned)."""
        freed = pinned = 0
        for _, size, path in sorted(entries):
            if freed >= needed:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                freed += size  # freed meanwhile
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pinned += size
                    continue
                self._copy_out(fd, path)
                os.unlink(path)
                freed += size
            finally:
                os.close(fd)
        return freed, pinned

    def _copy_out(self, fd: int, path: str) -> None:
        os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        target = self.spill_path(path)
        partial = target + ".partial"
        with open(partial, "wb") as out, os.fdopen(os.dup(fd), "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
        os.replace(partial, target)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The session's store lock, across processes (flock) and threads."""
        with self._thread_lock:
            if self._lock_fd is None:
                lock_file = os.path.basename(self.prefix) + "lock"  # one per store namespace
                self._lock_fd = os.open(os.path.join(self.session_dir, lock_file),
                                        os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield self._lock_fd
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._thread_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _read_used(lock_fd: int) -> int:
    data = os.pread(lock_fd, 8, 0)
    return struct.unpack("<q", data)[0] if len(data) == 8 else 0


def _write_used(lock_fd: int, used: int) -> None:
    os.pwrite(lock_fd, struct.pack("<q", used), 0)


def _create(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # the writer's pin until it is done
        os.ftruncate(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
