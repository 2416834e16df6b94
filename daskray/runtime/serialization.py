"""Turning user objects into bytes and back.

Three kinds of payload cross process boundaries:

* **values** (task results, graph data): pickle protocol 5.  Small values are one
  in-band ``bytes``; large ones are a header plus out-of-band buffers that travel
  as their own ZeroMQ frames without a copy (:func:`dumps_frames`).  Plain
  ``pickle`` is tried first because it is 10x faster than cloudpickle; objects it
  cannot handle (lambdas, classes defined in ``__main__``) go through cloudpickle.
* **task bodies** of a graph: every task is pickled on its own, so the head can send
  a worker only the tasks it runs, but the functions they call are pulled out into
  one *function table* per graph that is cloudpickled once (:class:`GraphEncoder`).
  A 20,000-task graph calling one ``__main__`` function pays cloudpickle once, not
  20,000 times.
* **exceptions**: the original exception object when it survives a pickle round
  trip, otherwise its type name, message and traceback as text
  (:func:`dumps_exception`, :func:`loads_exception`).

Apache Arrow data (tables, record batches, arrays) pickles its buffers out of band
like numpy arrays, so a reader of shared memory maps them in place.  One fix on
the way: pyarrow pickles a *slice* with the whole buffers it views (a 1,000-row
batch of ``table.to_batches()`` carries the full table), so a slice much smaller
than its buffers is first copied to buffers of its own size
(:func:`_compact_arrow`).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import threading
import traceback
import types
from collections import ChainMap
from typing import Any, Iterable, Sequence

import cloudpickle
import cloudpickle.cloudpickle as _cloudpickle_impl

from ..errors import RemoteTraceback, SerializationError, TaskError
from . import shared_memory

PROTOCOL = 5
_PICKLE_FAILURES = (pickle.PicklingError, TypeError, AttributeError, ValueError)


def describe(obj: Any, limit: int = 80) -> str:
    """A short, safe description of ``obj`` for error messages.

    Functions and classes are named by module and qualified name, in full: that
    is what tells the user which one it is.
    """
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)):
        module = getattr(obj, "__module__", None)
        name = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
        kind = "class" if isinstance(obj, type) else "function"
        return f"{kind} {module}.{name}" if module else f"{kind} {name}"
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _code_reduce_keeping_filename(code: types.CodeType) -> tuple:
    """cloudpickle's reducer for code objects, minus its ``<dynamic-code>`` file name.

    Keeping the real file name is what lets a worker's traceback show the user's
    file and line for functions defined in a script or notebook-free module.
    """
    cls, args = _cloudpickle_impl._code_reduce(code)
    return cls, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


#: reducers of pyarrow's types ({type: reducer}), filled in once pyarrow is imported
_ARROW_REDUCERS: dict[type, Any] = {}


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(
        {types.CodeType: _code_reduce_keeping_filename}, _ARROW_REDUCERS,
        cloudpickle.Pickler.dispatch_table
    )


class _ValuePickler(pickle.Pickler):
    """The C pickler, with pyarrow's types reduced by :func:`_reduce_arrow`."""

    dispatch_table = _ARROW_REDUCERS


def _cloudpickle_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


# --------------------------------------------------------------------------- Arrow

#: a slice is compacted when its buffers exceed what it uses by this factor ...
_ARROW_WASTE_FACTOR = 2
#: ... and by at least this many bytes
_ARROW_WASTE_MIN = 1 << 20


def _arrow_loaded() -> bool:
    """Whether pyarrow is imported, its reducers then registered (on first sight)."""
    if _ARROW_REDUCERS:
        return True
    if "pyarrow" not in sys.modules:
        return False
    import pyarrow as pa  # imported already: waits only if another thread is importing it

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(c) for c in found)) if found else found

    kinds = {pa.Table, pa.RecordBatch, pa.ChunkedArray, pa.Array, *subclasses(pa.Array)}
    _ARROW_REDUCERS.update(dict.fromkeys(kinds, _reduce_arrow))
    return True


def _reduce_arrow(obj: Any) -> Any:
    """pyarrow's own reduction (buffers out of band), of a compacted copy of a slice."""
    return _compact_arrow(obj).__reduce_ex__(PROTOCOL)


def _arrow_buffer_bytes(obj: Any) -> int:
    """Bytes of the buffers pyarrow's pickling of ``obj`` writes (whole buffers,
    however little of them ``obj`` views; dictionaries are not counted)."""
    import pyarrow as pa

    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return sum(_arrow_buffer_bytes(column) for column in obj.columns)
    if isinstance(obj, pa.ChunkedArray):
        return sum(_arrow_buffer_bytes(chunk) for chunk in obj.chunks)
    return sum(b.size for b in obj.buffers() if b is not None)


def _compact_arrow(obj: Any) -> Any:
    """``obj``, or, when it views much less of its buffers than pickling would
    write, an equal object whose buffers hold only its own data.

    The copy is made by an Arrow IPC round trip, which writes only the viewed part
    of each buffer.  Anything IPC cannot take is pickled as it is."""
    import pyarrow as pa

    used = obj.nbytes
    if _arrow_buffer_bytes(obj) - used <= max(used * (_ARROW_WASTE_FACTOR - 1), _ARROW_WASTE_MIN):
        return obj
    try:
        if isinstance(obj, (pa.Table, pa.RecordBatch)):
            return _through_ipc(obj)
        if isinstance(obj, pa.ChunkedArray):
            return _through_ipc(pa.table([obj], names=["_"])).column(0)
        return _through_ipc(pa.RecordBatch.from_arrays([obj], names=["_"])).column(0)
    except pa.ArrowException:
        return obj


def _through_ipc(data: Any) -> Any:
    """A table or record batch written to an Arrow IPC stream and read back."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    reader = pa.ipc.open_stream(sink.getvalue())
    if isinstance(data, pa.RecordBatch):
        return reader.read_next_batch()
    return reader.read_all()


# --------------------------------------------------------------------------- values


def _pickle_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """``pickle.dumps``, through :class:`_ValuePickler` once pyarrow is imported."""
    if not _arrow_loaded():
        return pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffer_callback)
    buf = io.BytesIO()
    _ValuePickler(buf, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` in-band; raise :class:`SerializationError` naming it if impossible."""
    try:
        return _pickle_dumps(obj)
    except _PICKLE_FAILURES:
        pass
    try:
        return _cloudpickle_dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle {describe(obj)} of type {type(obj).__qualname__}: {exc}. "
            "daskray sends values between processes with pickle; return or pass "
            "picklable objects (open files, locks, sockets and generators are not)."
        ) from exc


def loads(data: bytes | memoryview, buffers: Sequence[Any] = ()) -> Any:
    """Inverse of :func:`dumps` and :func:`dumps_frames`; a shared-memory
    descriptor gives the object it names, read in place."""
    if shared_memory.is_descriptor(data):
        return shared_memory.read(data)
    return pickle.loads(data, buffers=buffers)


def dumps_frames(obj: Any) -> list[Any]:
    """Pickle ``obj`` with out-of-band buffers: ``[header, buffer, buffer, ...]``.

    The buffers are memoryviews of the object's own memory (a numpy array's data,
    a pandas block), so no copy is made here; ZeroMQ sends them with ``copy=False``.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        header = _pickle_dumps(obj, buffer_callback=buffers.append)
    except _PICKLE_FAILURES:
        buffers = []
        try:
            header = _cloudpickle_dumps(obj, buffer_callback=buffers.append)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle {describe(obj)} of type {type(obj).__qualname__}: {exc}"
            ) from exc
    return [header, *(b.raw() for b in buffers)]


def frames_nbytes(frames: Iterable[Any]) -> int:
    """Total size in bytes of a list of frames as made by :func:`dumps_frames`."""
    return sum(memoryview(f).nbytes for f in frames)


# ---------------------------------------------------------------------- exceptions


def dumps_exception(exc: BaseException, key: Any) -> bytes:
    """Pack an exception raised by task ``key`` for the trip to the driver.

    The exception object itself travels when it pickles *and* unpickles (checked
    here, where the failure can still be reported); otherwise only text does.
    """
    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as failure:  # noqa: BLE001 - the task's failure must still be told
        tb_text = f"(its traceback could not be formatted: {failure!r})\n"
    blob: bytes | None
    try:
        blob = _dumps_exception_object(exc)
        loads(blob)
    except Exception:
        blob = None
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    return pickle.dumps(
        (blob, type(exc).__qualname__, message, tb_text, describe(key)), protocol=PROTOCOL
    )


class _ExceptionPickler(pickle.Pickler):
    """Pickles exceptions as their own classes reduce them: type, args, attributes.

    Reducers registered with ``copyreg`` for exception types are bypassed:
    ``import dask`` installs tblib's for every exception class then defined, which
    would also pickle the traceback (20,000 frames deep for a ``RecursionError``
    in a worker, too deep to pickle) and the chained exceptions (which may not
    pickle).  The traceback travels as text instead, whatever was imported.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            return obj.__reduce_ex__(PROTOCOL)
        return NotImplemented


class _ExceptionCloudPickler(_Pickler):
    """:class:`_ExceptionPickler` for exceptions plain pickle cannot handle (a
    class defined in ``__main__``): cloudpickle, exceptions reduced as themselves."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            return obj.__reduce_ex__(PROTOCOL)
        return super().reducer_override(obj)


def _dumps_exception_object(exc: BaseException) -> bytes:
    """Pickle the exception object itself (see :class:`_ExceptionPickler`)."""
    buf = io.BytesIO()
    try:
        _ExceptionPickler(buf, protocol=PROTOCOL).dump(exc)
    except _PICKLE_FAILURES:
        buf = io.BytesIO()
        _ExceptionCloudPickler(buf, protocol=PROTOCOL).dump(exc)
    return buf.getvalue()


def loads_exception(data: bytes) -> BaseException:
    """Inverse of :func:`dumps_exception`: the original exception, cause attached."""
    blob, type_name, message, tb_text, key = pickle.loads(data)
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return TaskError(key, type_name, message, tb_text)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb_text}"""')
    if isinstance(exc, SystemExit):
        return exited_error(exc, key, tb_text)
    return exc


def exited_error(exc: BaseException, key: Any, tb_text: str) -> TaskError:
    """The error a task that raised ``exc``, a ``SystemExit`` (``sys.exit()``),
    raises in its caller: a TaskError naming the task, whose ``__cause__`` is
    ``exc``.  Raised as itself, a ``sys.exit()`` in a task would end the driver.
    (A task's KeyboardInterrupt stays itself: dask's schedulers raise it so.)"""
    error = TaskError(key, type(exc).__qualname__, str(exc), tb_text,
                      "the task ended itself; its caller gets this error instead, and the "
                      "worker process lives on")
    error.__cause__ = exc
    return error


# ---------------------------------------------------------------------- task bodies


#: for instances (not classes), the answer depends on their type only: {type: bool}
_NEEDS_BY_TYPE: dict[type, bool] = {}


def _needs_cloudpickle(obj: Any) -> bool:
    """Objects plain pickle would write as a reference the workers cannot resolve."""
    kind = type(obj)
    known = _NEEDS_BY_TYPE.get(kind)
    if known is not None:  # every object pickled passes here: keep it cheap
        return known
    if isinstance(obj, type):  # a class: its own name decides, not its metaclass's
        # asked each time: a module reloaded or patched may rebind the name
        return (obj.__module__ == "__main__" or "<locals>" in obj.__qualname__
                or not _importable_as_itself(obj))
    if kind.__module__ == "__main__" or "<locals>" in kind.__qualname__:
        return True  # not kept: such classes may be made anew per call
    needs = isinstance(obj, types.FunctionType)
    _NEEDS_BY_TYPE[kind] = needs
    return needs


def _importable_as_itself(cls: type) -> bool:
    """Whether ``module.qualname`` names this very class (a class wrapped by a
    decorator, such as ``@daskray.remote``, is not: its name names the wrapper)."""
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


class _TablePickler(pickle.Pickler):
    """A C pickler that moves functions and ``__main__`` objects into a shared table.

    It hooks ``reducer_override``, which the C pickler skips for ints, floats,
    strings, bytes, lists, tuples and dicts: a task's plain arguments (say a
    random state of 624 ints) cost no Python call each.
    """

    def __init__(self, file: io.BytesIO, table: list[Any], index: dict[int, int],
                 plain_classes: dict[int, type]) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._table = table
        self._index = index
        self._plain_classes = plain_classes

    def reducer_override(self, obj: Any) -> Any:
        slot = self._index.get(id(obj))  # already in the table (or preloaded there)
        if slot is None:
            if obj is _table_entry or id(obj) in self._plain_classes:
                return NotImplemented
            if not _needs_cloudpickle(obj):
                if isinstance(obj, type):  # e.g. dask's Task, in every task body
                    self._plain_classes[id(obj)] = obj
                return NotImplemented
            slot = self._index[id(obj)] = len(self._table)
            self._table.append(obj)
        return _table_entry, (slot,)


#: the function table of the task being unpickled in this thread
_decoding = threading.local()


def _table_entry(slot: int) -> Any:
    """Entry ``slot`` of the function table of the task being unpickled."""
    return _decoding.table[slot]


class GraphEncoder:
    """Pickles the task bodies of one graph, sharing one function table.

    >>> enc = GraphEncoder()
    >>> blobs = [enc.encode_task(t, name) for name, t in tasks]   # doctest: +SKIP
    >>> table = enc.encode_table()                                # doctest: +SKIP
    """

    def __init__(self, preload: Sequence[Any] = ()) -> None:
        self._table: list[Any] = list(preload)
        self._index: dict[int, int] = {id(obj): i for i, obj in enumerate(self._table)}
        self._buffer = io.BytesIO()
        #: classes plain pickle writes by name, by id (they are kept here, so the
        #: ids stay theirs): asked once per graph, not once per task
        self._plain_classes: dict[int, type] = {}
        #: one pickler for every task (its memo cleared between them): making
        #: one per task costs as much as pickling a small task
        self._pickler: _TablePickler | None = None

    @property
    def table_size(self) -> int:
        """Entries in the function table so far."""
        return len(self._table)

    def encode_task(self, body: Any, name: Any, *, name_is_key: bool = False) -> bytes:
        """Pickle one task body; ``name`` appears in the error if it cannot be pickled
        (with ``name_is_key``, ``name`` is the task's key, described only then: a
        graph of many tasks need not describe every key)."""
        buf = self._buffer
        buf.seek(0)
        buf.truncate()
        pickler = self._pickler
        if pickler is None:
            pickler = self._pickler = _TablePickler(buf, self._table, self._index,
                                                    self._plain_classes)
        try:
            pickler.dump(body)
            pickler.clear_memo()
        except Exception as exc:
            self._pickler = None  # a failed dump may leave it half-way: start afresh
            if name_is_key:
                name = describe(name)
            raise SerializationError(
                f"task {name} cannot be pickled: {exc}. Its arguments are sent to "
                "worker processes, so they must be picklable (open files, locks, "
                "sockets and generators are not); create such objects inside the task."
            ) from exc
        return buf.getvalue()

    def encode_table(self) -> bytes:
        """Cloudpickle the function table; name the culprit when that fails."""
        try:
            return _cloudpickle_dumps(self._table)
        except Exception:
            for obj in self._table:
                try:
                    _cloudpickle_dumps(obj)
                except Exception as exc:
                    raise SerializationError(
                        f"cannot pickle {describe(obj)}: {exc}. Functions and the "
                        "objects they refer to (globals, closure variables) are "
                        "sent to worker processes; make them picklable, or create "
                        "the unpicklable object inside the function."
                    ) from exc
            raise


def table_id(data: bytes) -> bytes:
    """The content hash a function table is known by, in every process."""
    return hashlib.blake2b(data, digest_size=16).digest()


def decode_table(data: bytes) -> list[Any]:
    """Inverse of :meth:`GraphEncoder.encode_table`."""
    return cloudpickle.loads(data)


def decode_task(blob: bytes, table: list[Any]) -> Any:
    """Inverse of :meth:`GraphEncoder.encode_task`."""
    outer = getattr(_decoding, "table", None)
    _decoding.table = table
    try:
        return pickle.loads(blob)
    finally:
        _decoding.table = outer
