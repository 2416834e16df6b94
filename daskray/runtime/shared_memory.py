"""Large objects in shared memory, read by any process on the host without a copy.

An object is written once into a file under ``/dev/shm`` -- pickle protocol 5's
out-of-band buffers one after another, the small pickle header kept aside -- and
named by a small *descriptor* that travels in messages like any inline value.  A
reader maps the file read-only and unpickles with buffers that are views into
the mapping, so a numpy array or pandas column it gets is a zero-copy,
read-only view.  One copy per host, however many readers.

Lifetime: the file is unlinked when the object is freed.  A reader's mapping
keeps the pages alive for as long as its views exist (POSIX semantics of an
unlinked file), so freeing never pulls memory from under a live view; the
memory returns to the system when the last view dies.  Every file of a session
carries the session's prefix, so shutdown (or, after a crash, the next
``daskray.init``) removes whatever is left.

Names: ``/dev/shm/daskray-<driver pid>-<random>/<writer>-<pid>-<n>``: one private
directory per session.

Memory: with a :class:`~daskray.runtime.store_memory.HostStore` configured (every
process of a cluster session has one), writing makes room under the store's
limit by spilling least recently used objects to disk, and reading finds an
object wherever it is; see :mod:`store_memory`.
"""

from __future__ import annotations

import errno
import glob
import itertools
import mmap
import os
import pickle
import re
import shutil
import stat
import tempfile
import threading
import time
from typing import Any, Callable

from ..errors import ObjectLostError, ObjectStoreFullError
from .store_memory import HostStore, signals_deferred

SHM_DIR = "/dev/shm"
#: descriptors start with this, so ``loads`` can tell them from a pickle
MARKER = b"DRSHM\x00"
_ALIGN = 64
#: pre-fault a mapping's page tables in one call (Linux); 0 where there is none
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: a pickle header larger than this goes into the file too (an object that pickles
#: in-band -- bytes, lists, object columns -- is all header)
HEADER_INLINE_LIMIT = 4096
#: the marker file in each session directory daskray makes, and its text's start
SESSION_MARKER = ".daskray-session"
_MARKER_TEXT = "daskray session of pid "
#: a session directory's name: the driver's pid, then mkdtemp's 8 random characters
_SESSION_DIR_NAME = re.compile(r"daskray-(\d+)-[a-z0-9_]{8}\Z")
_counter = itertools.count()
#: this process's view of its session's store; None outside a cluster session
_store: HostStore | None = None
#: the address, written into descriptors, of a server that sends this process's
#: objects to processes of other hosts (another store namespace)
_server: str | None = None
#: how this process reads another host's object: fetch(server, descriptor) -> value
_fetch_foreign: Callable[[str, bytes], Any] | None = None


def configure(store: HostStore | None, server: str | None = None,
              fetch_foreign: Callable[[str, bytes], Any] | None = None) -> None:
    """Set (or, with None, clear) the store this process's writes and reads go
    through, and how objects of other hosts are served and fetched."""
    global _store, _server, _fetch_foreign
    if store is not _store:
        _writer_mappings.clear()
    _store, _server, _fetch_foreign = store, server, fetch_foreign


def store() -> HostStore | None:
    return _store


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def create_session_dir(driver_pid: int) -> str:
    """A new private directory (mode 0700, random name) for one cluster session's
    segments, holding daskray's marker; the prefix of every segment path, ending
    in ``/``.

    ``/dev/shm`` is shared by every user: segments at predictable names there
    could be created first, or replaced once spilled, by someone else.  Inside
    a directory only we can enter, they cannot."""
    path = tempfile.mkdtemp(prefix=f"daskray-{driver_pid}-", dir=SHM_DIR)
    try:
        write_marker(path, driver_pid)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return os.path.join(path, "")


def is_descriptor(data: Any) -> bool:
    return type(data) is bytes and data[:6] == MARKER


def write(frames: list, prefix: str, writer: str) -> tuple[bytes, str]:
    """Write ``[header, buffer, ...]`` to a new segment; (descriptor, file path)."""
    header = memoryview(frames[0]).cast("B")
    buffers = [memoryview(b).cast("B") for b in frames[1:]]
    header_in_file = header.nbytes > HEADER_INLINE_LIMIT
    if header_in_file:
        buffers.append(header)
    offsets = []
    size = 0
    for buf in buffers:
        offsets.append((size, buf.nbytes))
        size += -(-buf.nbytes // _ALIGN) * _ALIGN
    path = f"{prefix}{writer}-{os.getpid()}-{next(_counter)}"
    with signals_deferred():  # a cancelled task must not leave a file half made
        for attempt in (1, 2):
            if _store is not None:
                fd = _store.create(path, size)  # the path names it even once spilled
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, max(size, 1))
                _fill(fd, size, offsets, buffers)
            except OSError as exc:
                _discard(path)
                if exc.errno != errno.ENOSPC:
                    raise
                if attempt == 1 and _store is not None:  # others filled /dev/shm: spill
                    _store.make_room(size)
                    continue
                raise ObjectStoreFullError(
                    f"{SHM_DIR} is full: an object of {size / 2**20:,.1f} MiB did not fit "
                    "(other programs use it too). Free space there, or lower "
                    "daskray.init(object_store_memory=...)") from exc
            except BaseException:
                _discard(path)
                raise
            finally:
                os.close(fd)
            break
    inline_header = None if header_in_file else bytes(header)
    descriptor = MARKER + pickle.dumps((path, inline_header, offsets, _server), protocol=5)
    return descriptor, path


def _fill(fd: int, size: int, offsets: list[tuple[int, int]], buffers: list) -> None:
    """Copy ``buffers`` into the new file ``fd`` of ``size`` bytes at ``offsets``.

    A file reused from the store's pool already has every page: it is filled
    through a mapping of it, one memcpy per buffer, with no page fault and no
    per-page work in the kernel's write path.  The mapping is this process's
    own from an earlier write of the same file where it still has one (see
    :class:`_WriterMappings`), else a new one whose page tables are set up in a
    single call (``MAP_POPULATE``).  A fresh file (holes) is filled with
    ``pwrite``: on tmpfs that is 2-3x faster than faulting fresh pages in
    through a mapping, and a full ``/dev/shm`` is an ``ENOSPC`` error then,
    where a mapping would take a SIGBUS."""
    reused = _writer_mappings.take(fd, size) if size and _fully_allocated(fd, size) else None
    if reused is not None:
        try:
            with memoryview(reused.mapping) as target:
                for (offset, length), buf in zip(offsets, buffers):
                    target[offset:offset + length] = buf
        finally:
            _writer_mappings.give_back(reused)
        return
    for (offset, length), buf in zip(offsets, buffers):
        done = 0
        while done < length:
            done += os.pwrite(fd, buf[done:], offset + done)


class _WriterMapping:
    """A writable mapping of one store file, made from a second open of it: a
    mapping keeps a duplicate of its descriptor, and a duplicate of the
    writer's descriptor would keep the writer's pin (its ``flock``) for as long
    as the mapping lives, so the store would take the object, once freed, for
    one a live view still reads.  ``fd`` (that second open, no lock on it) is
    kept to tell whether the file still exists."""

    __slots__ = ("fd", "mapping", "identity", "last_used")

    def __init__(self, fd: int, mapping: mmap.mmap, identity: tuple[int, int]) -> None:
        self.fd, self.mapping, self.identity = fd, mapping, identity
        self.last_used = time.monotonic()

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


class _WriterMappings:
    """The mappings this process wrote pooled files through, kept for the next
    write of the same file.

    Setting up a mapping of 100 MB (25,600 page-table entries) costs more than
    the copy into it, and unmapping it a third of the copy.  The store's pool
    hands the same few files back to a process that keeps writing objects of
    one size, so the mapping is kept after a write: the next write of that file
    (same inode) is a plain memcpy.  A kept mapping holds no pin and takes no
    memory of its own while its file exists; once the file is gone (spilled,
    or dropped from the pool) its pages would live on only through the
    mapping, so a thread closes mappings whose file has no name left, and any
    unused for :attr:`KEEP_SECONDS`, within :attr:`CHECK_SECONDS`."""

    #: at most this many mappings are kept (the least recently used go first)
    MAX_KEPT = 16
    KEEP_SECONDS = 5.0
    CHECK_SECONDS = 0.25

    def __init__(self) -> None:
        self._kept: dict[tuple[int, int], _WriterMapping] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def take(self, fd: int, size: int) -> _WriterMapping | None:
        """A mapping of at least ``size`` bytes of the file ``fd``, page tables
        filled, out of the kept ones for the caller's sole use; None where none
        can be had (no ``/proc``)."""
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        with self._lock:
            kept = self._kept.pop(identity, None)
        if kept is not None:
            if kept.mapping.size() >= size and os.path.samestat(st, os.fstat(kept.fd)):
                return kept
            self._close_later(kept)
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        except OSError:
            return None
        try:
            mapping = mmap.mmap(own, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except BaseException:
            os.close(own)
            raise
        return _WriterMapping(own, mapping, identity)

    def give_back(self, kept: _WriterMapping) -> None:
        """Keep ``kept`` for the next write of its file."""
        kept.last_used = time.monotonic()
        with self._lock:
            self._kept[kept.identity] = kept
            evicted = []
            while len(self._kept) > self.MAX_KEPT:
                evicted.append(self._kept.pop(next(iter(self._kept))))
            self._start()
            self._wake.notify()
        for old in evicted:
            old.close()

    def clear(self) -> None:
        """Close every kept mapping (the session's store is going away)."""
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for entry in kept:
            entry.close()

    def _close_later(self, entry: _WriterMapping) -> None:
        entry.last_used = float("-inf")  # the thread closes it on its next look
        with self._lock:
            self._kept[(-1, id(entry))] = entry
            self._start()
            self._wake.notify()

    def _start(self) -> None:  # with the lock held
        if self._thread is None or not self._thread.is_alive():  # (none after a fork)
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="daskray-shm-mappings")
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._kept:
                    self._wake.wait()
                self._wake.wait(self.CHECK_SECONDS)
                entries = list(self._kept.items())
            now = time.monotonic()
            stale = [(key, e) for key, e in entries
                     if now - e.last_used > self.KEEP_SECONDS or _unlinked(e.fd)]
            if not stale:
                continue
            closing = []
            with self._lock:  # a writer may have taken one meanwhile
                for key, entry in stale:
                    if self._kept.get(key) is entry:
                        closing.append(self._kept.pop(key))
            for entry in closing:
                entry.close()


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return True


_writer_mappings = _WriterMappings()


def _fully_allocated(fd: int, size: int) -> bool:
    """Whether every page of the first ``size`` bytes of ``fd`` has memory already
    (a pooled file), so writing to them through a mapping allocates nothing."""
    st = os.fstat(fd)
    pages = -(-size // mmap.PAGESIZE)
    return st.st_blocks * 512 >= pages * mmap.PAGESIZE


def read(descriptor: bytes) -> Any:
    """The object behind a descriptor, its buffers viewing the shared pages; an
    object in another host's store is fetched from the server its descriptor names."""
    path, header, offsets, server = pickle.loads(descriptor[len(MARKER):])
    if _store is not None and not path.startswith(_store.prefix):
        if server is None or _fetch_foreign is None:
            raise ObjectLostError(
                f"object {os.path.basename(path)} is in another host's store, and no "
                "process there was named to send it")
        return _fetch_foreign(server, descriptor)
    header, buffers = local_frames(descriptor)
    return pickle.loads(header, buffers=buffers)


def in_this_store(descriptor: bytes) -> bool:
    """Whether the descriptor names a file of this process's store namespace."""
    path = pickle.loads(descriptor[len(MARKER):])[0]
    return (_store is not None and isinstance(path, str) and path.startswith(_store.prefix)
            and "/" not in path[len(_store.prefix):])


def local_frames(descriptor: bytes) -> tuple[Any, list]:
    """(pickle header, buffers) of an object in this host's store, the buffers
    viewing the shared pages.  ``FileNotFoundError`` if it was freed."""
    path, header, offsets, _ = pickle.loads(descriptor[len(MARKER):])
    if not offsets:
        return header, []
    if header is None:  # the header is the file's last piece
        *offsets, (start, length) = offsets
    # the mapping keeps a duplicate of ``fd``, and with it the reader's pin, until
    # the last view into it dies
    with signals_deferred():
        fd = os.open(path, os.O_RDONLY) if _store is None else _store.open_for_reading(path)
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
    view = memoryview(mapped)
    if header is None:
        header = view[start:start + length]
    return header, [view[o:o + n] for o, n in offsets]


def _discard(path: str) -> None:
    """Remove a file being written, never keep it for reuse."""
    if _store is not None:
        _store.discard(path)
    else:
        _remove(path)


def unlink(path: str) -> None:
    """The object in ``path`` was freed: its file goes (or is kept for reuse)."""
    if _store is not None:
        _store.unlink(path)
    else:
        _remove(path)


def remove_session(prefix: str) -> int:
    """Remove every segment of a session (or of one writer: ``prefix`` is then
    longer), pooled and spilled ones too, and the session's directory when
    ``prefix`` is that directory; how many segments there were."""
    paths = glob.glob(glob.escape(prefix) + "*")
    for path in paths:
        _remove(path)
    removed = len(paths) + (_store.remove(prefix) if _store is not None else 0)
    if prefix.endswith("/"):
        _remove(prefix.rstrip("/"))
    return removed


def _remove(path: str) -> None:
    """Remove a segment, or a pool directory of segments, for good."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        os.unlink(path)
    except (FileNotFoundError, PermissionError):  # gone, or another user's
        pass


def write_marker(directory: str, pid: int) -> None:
    """Write daskray's marker into a session directory it has just made: the proof,
    which a sweep asks for, that daskray made it (for the process ``pid``).  A
    dot-file: segment listings never see it."""
    fd = os.open(os.path.join(directory, SESSION_MARKER),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_MARKER_TEXT}{pid}\n")


def marked_session(path: str) -> int | None:
    """The pid in daskray's marker if ``path`` is a session directory daskray made
    for this user: a real directory (not a symlink) of this user that nobody
    else may enter, holding a marker file of this user in daskray's format.
    None for anything else."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        # O_NONBLOCK: a FIFO planted there must not hang the sweep
        fd = os.open(os.path.join(path, SESSION_MARKER),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        text = f.read(64)
    match = re.fullmatch(rb"%s(\d+)\n" % _MARKER_TEXT.encode(), text)
    return int(match.group(1)) if match else None


def sweep_dead_sessions(alive: Callable[[int], bool]) -> int:
    """Remove the session directories daskray made for this user (see
    :func:`marked_session`) whose driver process is gone; how many.  Nothing
    else in ``/dev/shm`` is touched, whatever its name."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        match = _SESSION_DIR_NAME.match(name)
        if match is None:
            continue
        path = os.path.join(SHM_DIR, name)
        pid = int(match.group(1))
        if marked_session(path) != pid or alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
