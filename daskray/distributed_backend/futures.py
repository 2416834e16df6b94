"""This process's distributed Futures: one for each object it holds an ObjectRef to.

The dask scheduler keeps a key's data while some client *wants* it.  daskray counts
ObjectRefs per process (``daskray.refs.tracker``); this table turns those counts into
the wants of this process's ``distributed.Client``:

* a ref this process made (``.remote()``, ``put``) keeps the Future its submission
  returned;
* a ref that arrived inside a value (unpickled here) is announced to the scheduler
  (``client-desires-keys``) when the tracker reports it, or at once when it is used;
* when the last ObjectRef of a key in this process is gone its Future is released, but
  never before the task behind it finished: a call runs even if its result is dropped
  (Ray's rule), and the refs nested in its arguments (its *pins*) live until then, so
  the task can still read them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..refs import RefKey, dask_key_of, tracker

if TYPE_CHECKING:
    from distributed import Future


class FutureTable:
    """RefKey -> (the Future this process wants it by, the Futures pinned with it)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        # reentrant: a ref collected by a GC run inside our own critical section
        # calls ``release`` on the same thread
        self._lock = threading.RLock()
        self._entries: dict[RefKey, tuple[Future, tuple[Future, ...]]] = {}
        #: keys announced by this process (adopted), as opposed to submitted by it
        self.adopted: set[RefKey] = set()
        #: how many keys this process has announced so far
        self.announced = 0

    def own(self, key: RefKey, future: Future, pins: Iterable[RefKey] = ()) -> None:
        """Record the Future of an object this process just made; ``pins`` are the
        refs nested in its arguments, kept until the task behind it finished."""
        from distributed import Future

        pinned = tuple(Future(dask_key_of(k), self.client) for k in pins)
        with self._lock:
            self._entries[key] = (future, pinned)

    def future_of(self, key: RefKey) -> Future:
        """The Future of ``key``, announcing the want to the scheduler if it is new."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            return entry[0]
        return self.adopt([key])[0]

    def adopt(self, keys: Iterable[RefKey]) -> list[Future]:
        """Futures for refs that came from elsewhere; new ones are told to the
        scheduler in one message."""
        from distributed import Future

        futures, new = [], []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    future = Future(dask_key_of(key), self.client)
                    self._entries[key] = entry = (future, ())
                    self.adopted.add(key)
                    new.append(future.key)
                futures.append(entry[0])
        if new:
            self.announced += len(new)
            send = self.client._send_to_scheduler
            send({"op": "client-desires-keys", "keys": new, "client": self.client.id})
            for key in new:  # a key the scheduler no longer has comes back "cancelled"
                send({"op": "report-key", "key": key})
        return futures

    @contextlib.contextmanager
    def borrowed(self, key: RefKey) -> Iterator[Future]:
        """A Future of ``key`` of the caller's own, for as long as the block runs.

        Unlike ``future_of``'s, its want does not end when this process's last ObjectRef
        of ``key`` goes (an actor call's task knows its actor by key alone, while other
        refs of it here come and go), and it does not outlive its use (a want kept by a
        process that holds no ref would keep the object, an actor, forever)."""
        from distributed import Future

        name = dask_key_of(key)
        future = Future(name, self.client)
        # a state this client made just now (or one another thread's release is about
        # to drop) hears nothing unless asked; asking again for a pending one is harmless
        if future.status == "pending":
            send = self.client._send_to_scheduler
            send({"op": "client-desires-keys", "keys": [name], "client": self.client.id})
            send({"op": "report-key", "key": name})
        try:
            yield future
        finally:
            _release_all((future, ()))

    def sync_with_tracker(self) -> None:
        """Announce the refs this process received since the last call and still holds."""
        added, _ = tracker.take_changes()
        if added:
            counts = tracker.counts
            self.adopt([k for k in dict.fromkeys(added) if counts.get(k, 0) > 0])

    def release(self, key: RefKey) -> None:
        """The last ObjectRef of ``key`` here is gone: stop wanting it, once its task
        (if still running) finished."""
        with self._lock:
            entry = self._entries.pop(key, None)
            self.adopted.discard(key)
        if entry is None:
            return
        future = entry[0]
        if future.done():
            _release_all(entry)
        else:
            future.add_done_callback(lambda _f, entry=entry: _release_all(entry))

    def clear(self) -> None:
        """Release everything (the session ends)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self.adopted.clear()
        for entry in entries:
            _release_all(entry)

    def __len__(self) -> int:
        return len(self._entries)


def _release_all(entry: tuple[Future, tuple[Future, ...]]) -> None:
    future, pins = entry
    for f in (future, *pins):
        try:
            f.release()
        except Exception:  # the client closed meanwhile: nothing left to release
            pass
