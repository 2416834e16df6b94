"""Where a worker keeps the objects it computed or received, by id (a task's id,
or a put's key).

An entry is a live Python value, or an object as it arrived: pickled bytes (an
input inline in a ``Run``), out-of-band frames (a large ``put``), or the
descriptor of a shared-memory file another process wrote.  Pickled entries are
unpickled on first read and the value kept, so an input never read costs nothing;
a descriptor is mapped anew at every read and never kept (a kept mapping would pin
the file in memory).

Values live in this process's memory.  Another process that asks for one gets it
as frames, or, once the data server decides to share it, from a shared-memory
file written on first request (:meth:`ObjectStore.export`) and read in place by
every reader on the host; the file is removed when the object is deleted.

Called from the worker's main thread, its data-server thread and a concurrent
actor's call threads: every method is a single dict operation or guards its
read-modify-write with a lock.
"""

from __future__ import annotations

import threading
from typing import Any

from . import shared_memory
from .serialization import dumps_frames, loads


class _Pickled:
    """An object as it arrived: in-band ``bytes``, or ``[header, buffer, ...]``."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def load(self) -> Any:
        if isinstance(self.data, list):
            return loads(self.data[0], buffers=self.data[1:])
        return loads(self.data)

    def frames(self) -> list:
        return self.data if isinstance(self.data, list) else [self.data]


class ObjectStore:
    """Objects by id, in this process."""

    def __init__(self) -> None:
        self._objects: dict[int, Any] = {}
        self._lock = threading.Lock()
        #: objects written to shared memory for other processes: {id: (descriptor, path)}
        self._exported: dict[Any, tuple[bytes, str]] = {}

    def __contains__(self, object_id: int) -> bool:
        return object_id in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def put(self, object_id: int, value: Any) -> None:
        self._objects[object_id] = value

    def put_pickled(self, object_id: int, data: bytes) -> None:
        """Keep an object that arrived pickled; it is unpickled when first read."""
        self._objects.setdefault(object_id, _Pickled(data))

    def put_frames(self, object_id: Any, frames: list) -> None:
        """Keep an object that arrived as out-of-band frames (a large ``put``)."""
        self._objects[object_id] = _Pickled(frames)

    def get(self, object_id: int) -> Any:
        """The value; ``KeyError`` if this store does not hold it.  An object in
        shared memory is mapped anew at every read, not kept: a kept mapping would
        pin it in memory for as long as this process holds it."""
        value = self._objects[object_id]
        if type(value) is _Pickled and shared_memory.is_descriptor(value.data):
            return value.load()
        if type(value) is _Pickled:
            with self._lock:
                value = self._objects[object_id]
                if type(value) is _Pickled:
                    value = value.load()
                    self._objects[object_id] = value
        return value

    def frames(self, object_id: int) -> list[Any]:
        """The object as frames for another process (see ``dumps_frames``)."""
        value = self._objects[object_id]
        if type(value) is _Pickled:
            return value.frames()
        return dumps_frames(value)

    def exported(self, object_id: Any) -> bool:
        return object_id in self._exported

    def export(self, object_id: Any, prefix: str, frames: list | None = None) -> bytes:
        """The object in shared memory, written there on first request: a descriptor
        readers map without copying.  ``frames``: the object's, if already made.
        ``KeyError`` if not held here."""
        with self._lock:
            found = self._exported.get(object_id)
            if found is None:
                if object_id not in self._objects:  # deleted meanwhile: nothing to write
                    raise KeyError(object_id)
                frames = frames if frames is not None else self.frames(object_id)
                found = self._exported[object_id] = shared_memory.write(frames, prefix, "w")
        return found[0]

    def delete(self, object_id: int) -> None:
        with self._lock:  # not between an export's check and its write
            self._objects.pop(object_id, None)
            found = self._exported.pop(object_id, None)
        if found is not None:
            shared_memory.unlink(found[1])
