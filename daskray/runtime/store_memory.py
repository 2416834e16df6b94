"""The host object store's memory limit: accounting, LRU spilling, ObjectStoreFullError.

Every process of a session writes its large objects into files of its own under
``/dev/shm`` (see :mod:`shared_memory`); the limit applies to all of them together.
There is no store server: the processes coordinate through the file system.

* **Accounting**: two lock files in the session directory.  Writers take the
  *space* lock to make room and create their file, one at a time; the *count*
  lock guards the bytes in use, kept in its file, and is held only for a moment,
  so freeing an object never waits for a writer that is spilling.  When the
  count says a new object does not fit, the session's files in ``/dev/shm`` are
  listed and measured, which also corrects the count (say after a writer died
  before its files were counted out).
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
* **Reuse**: writing into fresh tmpfs pages costs 2-3 times a copy into pages
  that exist (first-touch faults, zeroing).  A freed file of 1 MiB or more that
  nobody maps goes into the namespace's *pool* directory instead of being
  unlinked, up to a quarter of the limit, and a writer takes a pooled file of
  its size (up to twice it) before creating one.  Pooled files count as used;
  making room drops them before spilling any object.
* **Full**: when the objects that could be spilled do not make room,
  :class:`~daskray.errors.ObjectStoreFullError` says how much was asked for, the
  limit, what is in use: objects still referenced by ObjectRefs and how much of
  them live views pin, and values still in use whose ObjectRefs are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ObjectStoreFullError
from .process import lock_held

SHM_DIR = "/dev/shm"
#: share of the machine's memory the store may use when no limit is given (Ray's default)
DEFAULT_FRACTION = 0.3
SPILL_DIR = "spill"
#: freed files smaller than this are unlinked, not pooled
MIN_POOLED = 1 << 20
#: share of the limit pooled files may take
POOL_FRACTION = 0.25


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGUSR1 (how a worker cancels the task it runs) for a moment: a
    task cancelled inside the store's bookkeeping would leave a lock held, a
    count wrong or a file half made.  The signal arrives right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
    _lock_fds: dict = field(default_factory=dict, repr=False)
    _thread_locks: dict = field(
        default_factory=lambda: {"space": threading.Lock(), "count": threading.Lock()},
        repr=False)

    @property
    def spill_dir(self) -> str:
        return os.path.join(self.session_dir, SPILL_DIR)

    def spill_path(self, path: str) -> str:
        return os.path.join(self.spill_dir, os.path.basename(path))

    @property
    def pool_dir(self) -> str:
        return self.prefix + "pool"

    @property
    def freed_dir(self) -> str:
        return self.prefix + "freed"

    # ------------------------------------------------------------------ writing

    def create(self, path: str, size: int) -> int:
        """Create the file of a new object of ``size`` bytes, making room first: a
        descriptor open for writing that holds the writer's pin.  The file is
        ``path`` in ``/dev/shm``, or its spill path when the object is larger
        than the whole limit."""
        if size > self.limit:
            _make_dir(self.spill_dir)
            return _create(self.spill_path(path), size)
        with self._locked("space"):  # one writer at a time makes room
            fd = self._from_pool(path, size)
            if fd is not None:
                return fd
            with self._locked("count") as count_fd:
                used = _read_used(count_fd)
            if used + size > self.limit:
                used, _ = self._make_room(size)
                if used + size > self.limit:
                    raise self._full_error(size, used)
            fd = _create(path, size)
            self._count(size)
            return fd

    def _full_error(self, size: int, used: int) -> ObjectStoreFullError:
        """The error for a writer of ``size`` bytes when even spilling left only
        ``limit - used`` free: what fills the store, in the user's terms.

        The objects' files belong to objects still referenced by ObjectRefs; those
        live views map are pinned and cannot spill (values got with ``get`` and
        still in use, arguments of running tasks).  Freed objects' files that
        live views still map keep their memory too: values in use whose
        ObjectRefs are gone."""
        _, entries = self._scan()
        referenced = sum(e[1] for e in entries)
        pinned = sum(e[1] for e in entries if _pinned(e[2]))
        in_use = _files(self.freed_dir)
        return ObjectStoreFullError(
            f"the object store is full: an object of {_mib(size)} does not fit in its limit "
            f"of {_mib(self.limit)}; {_mib(used)} in use: {_mib(referenced)} in "
            f"{_counted(len(entries), 'object')} still referenced by ObjectRefs, "
            f"{_mib(pinned)} of it pinned by live views (values got with daskray.get and "
            f"still in use, arguments of running tasks), and "
            f"{_mib(sum(e[1] for e in in_use))} in {_counted(len(in_use), 'value')} in use "
            "whose ObjectRefs are gone. Delete values you no longer need (or copy what you "
            "keep), drop ObjectRefs, or raise the limit with "
            "daskray.init(object_store_memory=...)")

    def make_room(self, size: int) -> None:
        """Spill until ``size`` more bytes fit, as far as possible (a writer found
        ``/dev/shm`` itself full)."""
        with self._locked("space"):
            self._make_room(size, limit=self._scan()[0])

    def _make_room(self, size: int, limit: int | None = None) -> tuple[int, int]:
        """Drop the pool, reap freed files no view maps any more, spill least
        recently used objects, until ``size`` more bytes fit under ``limit``
        (default: the store's); (bytes in use, bytes pinned).  Repeated while it
        makes progress: objects freed meanwhile move files under our feet."""
        limit = self.limit if limit is None else limit
        used = pinned = 0
        for _ in range(4):
            self._drain_pool()
            self._reap_freed()
            used, entries = self._recount()
            if used + size <= limit:
                break
            pinned = self._spill(entries, used + size - limit)
            after, _ = self._recount()
            progress, used = after < used, after
            if used + size <= limit or not progress:
                break
        return used, pinned

    def _recount(self) -> tuple[int, list[tuple[float, int, str]]]:
        """``_scan``, and the count set to what it found: the files are the truth."""
        with self._locked("count") as count_fd:
            used, entries = self._scan()
            _write_used(count_fd, used)
        return used, entries

    # ------------------------------------------------------------------ reading

    def open_for_reading(self, path: str) -> int:
        """A descriptor of the object's file holding a reader's pin: in ``/dev/shm``,
        or its spilled copy.  ``FileNotFoundError`` if the object was freed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.spill_path(path), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = _still_at(fd, path)
        if st is None:  # spilled (or freed) while we waited for the lock
            os.close(fd)
            return os.open(self.spill_path(path), os.O_RDONLY)
        if time.time() - st.st_mtime > 1.0:  # most recently used (to the second)
            with contextlib.suppress(OSError):
                os.utime(fd)
        return fd

    # ------------------------------------------------------------------ freeing

    def unlink(self, path: str) -> None:
        """Remove an object's file wherever it is."""
        if not path.startswith(self.prefix):  # another namespace's: its count corrects itself
            _unlink_quietly(path, self.spill_path(path))
            return
        # never waits for a writer making room: the count has a lock of its own
        if self._keep_freed(path) is None:
            self._unlink_counted(path)
        _unlink_quietly(self.spill_path(path))

    def discard(self, path: str) -> None:
        """Remove a file its writer gave up on (never pooled)."""
        self._unlink_counted(path)
        _unlink_quietly(self.spill_path(path))

    def _unlink_counted(self, path: str) -> None:
        """Unlink a file in this namespace's memory and count its bytes out, in one
        step under the count lock (so the count never drifts low)."""
        with self._locked("count") as count_fd:
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                return
            _write_used(count_fd, max(0, _read_used(count_fd) - size))

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

    # ------------------------------------------------------------------ the pool

    def _keep_freed(self, path: str) -> str | None:
        """Where a freed object's file went instead of being unlinked: the pool
        (reusable: nobody maps it, big enough, room in the pool), or the
        *freed* directory while live views still map it (its pages are in use,
        so it keeps counting until they are gone); None to unlink it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            size = os.fstat(fd).st_size
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                where = self.freed_dir  # a live view still reads it
            else:
                if size < MIN_POOLED or \
                        sum(e[1] for e in self._pooled()) + size > self.limit * POOL_FRACTION:
                    return None
                where = self.pool_dir
            _make_dir(where)
            try:
                os.rename(path, os.path.join(where, os.path.basename(path)))
            except FileNotFoundError:
                return None
            return where
        finally:
            os.close(fd)

    def _reap_freed(self) -> None:
        """Unlink the freed files no live view maps any more."""
        for _, _, freed in _files(self.freed_dir):
            try:
                fd = os.open(freed, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            else:
                self._unlink_counted(freed)
            finally:
                os.close(fd)

    def _from_pool(self, path: str, size: int) -> int | None:
        """A pooled file of ``size`` to ``2 * size`` bytes renamed to ``path`` and
        cut to ``size``, open for writing with the writer's pin; None if none fits."""
        for _, pooled_size, pooled in sorted(self._pooled(), key=lambda e: e[1]):
            if not size <= pooled_size <= 2 * size:
                continue
            try:
                os.rename(pooled, path)
            except FileNotFoundError:
                continue
            fd = os.open(path, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, max(size, 1))
            self._count(size - pooled_size)
            return fd
        return None

    def _drain_pool(self) -> None:
        """Drop every pooled file: room is needed."""
        for _, _, pooled in self._pooled():
            self._unlink_counted(pooled)

    def _pooled(self) -> list[tuple[float, int, str]]:
        return _files(self.pool_dir)

    def _count(self, delta: int) -> None:
        with self._locked("count") as count_fd:
            _write_used(count_fd, max(0, _read_used(count_fd) + delta))

    # ------------------------------------------------------------------ accounting

    def stats(self) -> dict:
        """The store's use: ``used`` bytes (objects, and freed objects live views
        still map) and ``objects`` in memory; ``spilled`` bytes and
        ``spilled_objects`` on disk; ``pooled`` bytes kept for reuse; the ``limit``
        (which all of those in memory share); ``spill_dir``."""
        used, entries = self._scan()
        spilled = [e.stat().st_size for e in _scandir(self.spill_dir)
                   if e.name.startswith(os.path.basename(self.prefix))]
        pooled = sum(e[1] for e in self._pooled())
        return {"limit": self.limit, "used": used - pooled, "objects": len(entries),
                "pooled": pooled, "spilled": sum(spilled), "spilled_objects": len(spilled),
                "spill_dir": self.spill_dir}

    def _scan(self) -> tuple[int, list[tuple[float, int, str]]]:
        """(bytes in memory: objects, pool and freed files; the objects' files)."""
        name = os.path.basename(self.prefix)
        entries = []
        for entry in _scandir(os.path.dirname(self.prefix)):
            if entry.name.startswith(name) and not entry.name.startswith(".") \
                    and (st := _stat(entry)) is not None:  # (not the session's marker)
                entries.append((st.st_mtime, st.st_size, entry.path))
        kept = sum(e[1] for e in self._pooled()) + sum(e[1] for e in _files(self.freed_dir))
        return sum(e[1] for e in entries) + kept, entries

    def _spill(self, entries: list[tuple[float, int, str]], needed: int) -> int:
        """Move least recently used unpinned files to disk until ``needed`` bytes
        are free; the bytes found pinned."""
        freed = pinned = 0
        for _, size, path in sorted(entries):
            if freed >= needed:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # freed meanwhile: the next scan counts what that gave
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pinned += size
                    continue
                if not _still_at(fd, path):  # freed (pooled) before we locked it
                    continue
                self._copy_out(fd, path)
                if not _still_at(fd, path):  # freed while being copied: drop the copy
                    _unlink_quietly(self.spill_path(path))
                _unlink_quietly(path)  # the recount that follows counts it out
                freed += size
            finally:
                os.close(fd)
        return pinned

    def _copy_out(self, fd: int, path: str) -> None:
        _make_dir(self.spill_dir)
        target = self.spill_path(path)
        partial = target + ".partial"
        try:
            with open(partial, "wb") as out, os.fdopen(os.dup(fd), "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
            os.replace(partial, target)
        except BaseException:
            _unlink_quietly(partial)
            raise

    @contextlib.contextmanager
    def _locked(self, which: str) -> Iterator[int]:
        """One of the namespace's two locks, across processes (flock) and threads:
        ``"space"`` while a writer makes room (long: it may spill), ``"count"``
        while the bytes-in-use count, kept in that lock's file, is read or changed."""
        with self._thread_locks[which]:
            fd = self._lock_fds.get(which)
            if fd is None:
                name = f"{os.path.basename(self.prefix)}{which}"  # one per store namespace
                fd = self._lock_fds[which] = os.open(
                    os.path.join(self.session_dir, name), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for which, lock in self._thread_locks.items():
            with lock:
                fd = self._lock_fds.pop(which, None)
                if fd is not None:
                    os.close(fd)


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


def _stat(entry: os.DirEntry) -> os.stat_result | None:
    """A regular file's stat, or None (a directory, or gone)."""
    try:
        if not entry.is_file(follow_symlinks=False):
            return None
        return entry.stat()
    except FileNotFoundError:
        return None


def _still_at(fd: int, path: str) -> os.stat_result | None:
    """The open file ``fd``'s stat if it is still the file at ``path`` (not moved
    away), else None."""
    try:
        st = os.fstat(fd)
        if st.st_nlink > 0 and os.stat(path).st_ino == st.st_ino:
            return st
    except FileNotFoundError:
        pass
    return None


def _make_dir(path: str) -> None:
    """Make a private directory of the store, its parent being the session's: not
    ``makedirs``, which would bring back a session directory already removed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _unlink_quietly(*paths: str) -> None:
    """Unlink files that may be gone already (or be another user's)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError, PermissionError, IsADirectoryError):
            os.unlink(path)


def _files(directory: str) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of the regular files in ``directory``."""
    return [(st.st_mtime, st.st_size, e.path) for e in _scandir(directory)
            if (st := _stat(e)) is not None]


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _pinned(path: str) -> bool:
    """Whether a live view (or its writer) holds the object file ``path``."""
    return lock_held(path, exclusive=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (which releases a lock taken)
    return False


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
