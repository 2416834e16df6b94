"""``ObjectRef``: a handle to an object in the cluster, and the counting that frees it.

An ObjectRef names an object by ``(owner client id, graph number, node)``.  It is
hashable, picklable (pass it to tasks, actors, other refs' values) and a dask
collection: ``dask.compute(ref)``, ``dask.delayed(f)(ref)``, and dask graphs that
mix refs with arrays or DataFrames run as one graph on daskray.

Reference counting (:class:`RefTracker`, one per process): the head keeps an
object while any process holds an ObjectRef to it.  A process reports only when
its count for an object goes 0 → 1 ("added") or 1 → 0 ("dropped"), in batches.
The process that created a ref (by ``.remote()`` or ``put``) starts at one
without a message: the head counted the owner's reference at submission.  A ref
pickled into a task's arguments is *pinned* by that task until it finishes, so
it survives the gap between the sender dropping it and the receiver unpickling
it.
"""

from __future__ import annotations

import threading
from typing import Any

from . import backend

RefKey = tuple  # (owner client id: bytes, graph number: int, node: int)

_KEY_PREFIX = "daskray-ref-"


def dask_key_of(key: RefKey) -> str:
    """The string an ObjectRef is known by inside dask graphs."""
    owner, graph, node = key
    return f"{_KEY_PREFIX}{owner.hex()}-{graph}-{node}"


def ref_key_of(dask_key: Any) -> RefKey | None:
    """Inverse of :func:`dask_key_of`; ``None`` for any other dask key."""
    if not isinstance(dask_key, str) or not dask_key.startswith(_KEY_PREFIX):
        return None
    try:
        owner, graph, node = dask_key[len(_KEY_PREFIX):].rsplit("-", 2)
        return (bytes.fromhex(owner), int(graph), int(node))
    except ValueError:
        return None


class RefTracker:
    """This process's ObjectRef counts, and the changes not yet told to the head."""

    def __init__(self) -> None:
        # reentrant: an ObjectRef collected by a GC run that starts inside incref
        # (a dict growing) decrefs on the same thread
        self.lock = threading.RLock()
        self.counts: dict[RefKey, int] = {}
        self.added: list[RefKey] = []
        self.dropped: list[RefKey] = []
        #: refs whose count fell to zero, for the client to forget what it knew
        self.on_drop: Any = None
        #: whether a cluster hears of the changes (not in local mode)
        self.reporting = False
        #: called (outside the lock) when a change is recorded and none was pending,
        #: so whoever sends the changes need not poll for them
        self.wake: Any = None

    def incref(self, key: RefKey, owned: bool) -> None:
        first = False
        with self.lock:
            n = self.counts.get(key, 0)
            self.counts[key] = n + 1
            if n == 0 and not owned and self.reporting:
                first = not (self.added or self.dropped)
                self.added.append(key)
        wake = self.wake
        if first and wake is not None:
            wake()

    def decref(self, key: RefKey) -> None:
        first = False
        with self.lock:
            n = self.counts.get(key, 0) - 1
            if n > 0:
                self.counts[key] = n
                return
            self.counts.pop(key, None)
            if self.reporting:
                first = not (self.added or self.dropped)
                self.dropped.append(key)
        wake = self.wake
        if first and wake is not None:
            wake()
        if self.on_drop is not None:
            self.on_drop(key)

    def held_of_graph(self, owner: bytes, graph: Any) -> list[RefKey]:
        """The keys this process holds refs to among the objects of ``owner``'s
        graph ``graph`` (a call it made)."""
        with self.lock:
            return [k for k in self.counts if k[0] == owner and k[1] == graph]

    def take_changes(self) -> tuple[list[RefKey], list[RefKey]]:
        """The changes since the last call (added, dropped), for one message."""
        with self.lock:
            added, dropped = self.added, self.dropped
            self.added, self.dropped = [], []
        return added, dropped

    def has_changes(self) -> bool:
        return bool(self.added or self.dropped)


tracker = RefTracker()

_collecting = threading.local()


class collect_pickled_refs:  # noqa: N801 - used as a function: ``with collect_pickled_refs()``
    """Record the keys of ObjectRefs pickled in this thread inside the block:
    ``with collect_pickled_refs() as found``.  (A class rather than a generator:
    a worker enters it for every result it pickles.)"""

    __slots__ = ("_found", "_outer")

    def __enter__(self) -> list[RefKey]:
        self._found: list[RefKey] = []
        self._outer = getattr(_collecting, "found", None)
        _collecting.found = self._found
        return self._found

    def __exit__(self, *exc_info: Any) -> None:
        _collecting.found = self._outer


def _rebuild(key: RefKey) -> "ObjectRef":
    return ObjectRef(key, owned=False)


class ObjectRef:
    """A reference to an object in the cluster; ``get()`` returns its value."""

    __slots__ = ("_key", "__weakref__")
    __dask_future__ = True  # dask treats it like a distributed Future in graphs

    def __init__(self, key: RefKey, owned: bool = False) -> None:
        self._key = key
        tracker.incref(key, owned)

    def __del__(self) -> None:
        try:
            tracker.decref(self._key)
        except Exception:  # interpreter shutdown
            pass

    def __reduce__(self) -> tuple:
        found = getattr(_collecting, "found", None)
        if found is not None:
            found.append(self._key)
        return _rebuild, (self._key,)

    def __copy__(self) -> "ObjectRef":
        return ObjectRef(self._key)

    def __deepcopy__(self, memo: dict) -> "ObjectRef":
        return ObjectRef(self._key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._key == self._key

    def __repr__(self) -> str:
        owner, graph, node = self._key
        return f"ObjectRef({owner.hex()[:8]}-{graph}-{node})"

    @property
    def key(self) -> str:
        """The key this object has in dask graphs."""
        return dask_key_of(self._key)

    def get(self, timeout: float | None = None) -> Any:
        """The object's value (``daskray.get(self, timeout=...)``)."""
        return backend.current().get([self], timeout)[0]

    def __await__(self):
        import asyncio

        return asyncio.get_running_loop().run_in_executor(_await_pool(), self.get).__await__()

    def future(self) -> "concurrent.futures.Future":
        """A ``concurrent.futures.Future`` of the object's value (Ray's
        ``ObjectRef.future()``): its result is the value, or the task's error."""
        return _await_pool().submit(self.get)

    def as_future(self) -> "asyncio.Future":
        """An ``asyncio.Future`` of the object's value, in the current event loop
        (Ray's ``ObjectRef.as_future()``): ``await ref.as_future()``, or pass it
        to ``asyncio.wait_for`` / ``asyncio.gather``.  Cancelling it does not
        cancel the task (``daskray.cancel`` does)."""
        import asyncio

        return asyncio.wrap_future(self.future())

    # ---------------------------------------------------------------- dask collection

    def __dask_graph__(self) -> dict:
        return {self.key: self}

    def __dask_keys__(self) -> list:
        return [self.key]

    def __dask_layers__(self) -> tuple:
        return (self.key,)

    def __dask_tokenize__(self) -> str:
        return self.key

    def __dask_postcompute__(self) -> tuple:
        return _first, ()

    def __dask_postpersist__(self) -> tuple:
        return _rebuild_persisted, (self._key,)

    @staticmethod
    def __dask_optimize__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return dsk

    @staticmethod
    def __dask_scheduler__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        # dask's entry point is the public API's, far above refs: reached through the
        # package's lazy loader (a layer exception named in tests/test_layers.py)
        import daskray

        return daskray.get(dsk, keys, **kwargs)


def _first(results: Any) -> Any:
    return results[0]


def _rebuild_persisted(dsk: Any, key: RefKey, rename: Any = None) -> ObjectRef:
    return ObjectRef(key)


#: threads that wait in get() for awaited refs: not asyncio's default executor,
#: whose few threads (cores + 4) an async actor's concurrent awaits would use up
#: while the awaited calls wait for those same threads: a deadlock
AWAIT_THREADS = 1000
_await_executor = None
_await_lock = threading.Lock()


def _await_pool():
    global _await_executor
    with _await_lock:
        if _await_executor is None:
            from concurrent.futures import ThreadPoolExecutor

            _await_executor = ThreadPoolExecutor(AWAIT_THREADS, thread_name_prefix="daskray-await")
        return _await_executor
