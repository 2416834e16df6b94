"""The wire protocol, sans I/O: typed messages <-> lists of frames.

Every connection starts with a *hello* that is checked before a single byte of
the peer's payload is unpickled::

    [b"daskray-hello", token, role, name]          role: b"client" | b"worker"

After that a message is one frame: a CRC-32 of the payload, then the payload, a
pickled tuple ``(tag, field, field, ...)`` of plain data (see :func:`decode`).
Object transfers between processes (``GET`` on a worker's data server) are raw
frames: ``[token, b"get", object id]`` → ``[b"ok", header, buffer, ...]``, the
buffers sent without a copy.

Records inside messages (a worker's reports, the tasks of a ``Run``) are typed
too: small NamedTuples (:mod:`.records`), the same class at both ends.  They
travel as what they are, a reference to their class and their fields: the decoder
refuses every class a message may name but these, listed by name in an explicit
allow-list (``records.RECORDS``).  A record's construction runs no code but a tuple's,
and checks its number of fields.  (Plain tuples converted at both ends were the
other choice: as cheap, within a microsecond per record, but with a converter to
keep beside every record.)

Decoding never raises anything but :class:`ProtocolError`, so a malformed
message is reported and dropped instead of killing the receiver.
"""

from __future__ import annotations

import hmac
import io
import operator
import pickle
import zlib
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from . import records

HELLO = b"daskray-hello"
ROLE_CLIENT = b"client"
ROLE_WORKER = b"worker"
GET = b"get"
GETSHM = b"getshm"
SHARED = b"shm"
PUT = b"put"
INTERRUPT = b"interrupt"
#: interrupt by killing the worker's process, if it runs one of the tasks named
INTERRUPT_FORCE = b"interruptforce"
PEER_LOST = b"peerlost"
DROPPED = b"dropped"
PING = b"ping"  # the head asks a worker's data server whether the process still runs
PONG = b"pong"
OK = b"ok"
MISSING = b"missing"


class ProtocolError(Exception):
    """A message that does not follow the protocol."""


def hello_frames(token: bytes, role: bytes, name: str) -> list[bytes]:
    return [HELLO, token, role, name.encode()]


def check_hello(frames: list[bytes], token: bytes) -> tuple[bytes, str] | None:
    """``(role, name)`` if ``frames`` is a hello carrying ``token``, else None."""
    if len(frames) != 4 or frames[0] != HELLO:
        return None
    if not hmac.compare_digest(bytes(frames[1]), token):
        return None
    role = bytes(frames[2])
    if role not in (ROLE_CLIENT, ROLE_WORKER):
        return None
    try:
        return role, bytes(frames[3]).decode()
    except UnicodeDecodeError:
        return None


_REGISTRY: dict[int, type] = {}


def message(tag: int):
    """Class decorator: a frozen, slotted dataclass registered under ``tag``."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True, slots=True)(cls)
        if tag in _REGISTRY:
            raise ValueError(f"message tag {tag} used twice")
        cls.TAG = tag
        cls._FIELDS = tuple(f.name for f in fields(cls))
        # (TAG, *fields) in one C call: encode runs for every message sent
        get_fields = operator.attrgetter(*cls._FIELDS) if cls._FIELDS else (lambda msg: ())
        if len(cls._FIELDS) == 1:
            cls._AS_TUPLE = staticmethod(lambda msg, get=get_fields, tag=tag: (tag, get(msg)))
        else:
            cls._AS_TUPLE = staticmethod(lambda msg, get=get_fields, tag=tag: (tag, *get(msg)))
        _REGISTRY[tag] = cls
        return cls

    return wrap


def encode(msg: Any) -> bytes:
    """The frame of ``msg``: a CRC-32 of the payload, then the payload (the
    message as a pickled tuple of plain data)."""
    payload = pickle.dumps(msg._AS_TUPLE(msg), protocol=5)
    return zlib.crc32(payload).to_bytes(4, "little") + payload


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (tuples, lists, dicts, sets, str, bytes,
    numbers, None) and the protocol's records: a message that names any other
    class or function is refused, so decoding a message runs no code of the
    sender's choosing.  Values of the user's (task bodies, results, exceptions)
    travel inside as bytes, unpickled by the process that needs them."""

    def find_class(self, module: str, name: str) -> Any:
        if module == records.__name__ and name in records.RECORDS:
            return records.RECORDS[name]
        raise pickle.UnpicklingError(f"a message may not refer to {module}.{name}")


def decode(frame: bytes | memoryview) -> Any:
    """The message in ``frame``.  A frame whose checksum does not match (cut,
    garbled, or not daskray's) is refused before it is unpickled: a garbled pickle
    can make the unpickler allocate without bound (its memo opcodes)."""
    view = memoryview(frame).cast("B")
    if len(view) < 5 or zlib.crc32(view[4:]) != int.from_bytes(view[:4], "little"):
        raise ProtocolError(f"undecodable message ({len(view)} bytes): its checksum does "
                            "not match")
    try:
        data = _PlainDataUnpickler(io.BytesIO(view[4:])).load()
    except Exception as exc:
        raise ProtocolError(f"undecodable message ({len(frame)} bytes): {exc!r}") from None
    if type(data) is not tuple or not data or type(data[0]) is not int \
            or data[0] not in _REGISTRY:
        raise ProtocolError(f"unknown message: {str(data)[:100]}")
    cls = _REGISTRY[data[0]]
    if len(data) - 1 != len(cls._FIELDS):
        raise ProtocolError(
            f"message {cls.__name__} has {len(data) - 1} fields, expected {len(cls._FIELDS)}"
        )
    return cls(*data[1:])


# ------------------------------------------------------------------ client -> head


@message(1)
class SubmitGraph:
    TAG: ClassVar[int]
    graph: int
    names: list
    deps: list
    priorities: list
    bodies: list
    data: dict
    wanted: list
    groups: list
    function_table: bytes
    #: content hash of ``function_table``: workers keep tables by it
    table_id: bytes
    fail_fast: bool
    notify: bool
    #: {node: ref key} for nodes standing for existing objects
    external: dict
    #: ref keys pickled inside task arguments
    pinned: list
    max_retries: int
    retry_exceptions: bool
    resources: dict | None
    #: a call of this actor's method
    actor: str | None = None
    #: the graph is this actor's constructor: {"id", "max_restarts", ...}
    create_actor: dict | None = None
    #: data nodes already stored on workers: {node: (worker id, store key, nbytes)}
    data_holders: dict | None = None
    #: set by a worker: the task whose code made this call
    parent: int | None = None
    #: data nodes in shared memory: {node: file}
    shared: dict | None = None
    #: the caller sent this call (an actor's) straight to the actor's process,
    #: this worker id: the head records it as running there and dispatches nothing
    direct: str | None = None


@message(2)
class CancelGraph:
    graph: int


@message(3)
class ReleaseGraph:
    graph: int


@message(4)
class StopCluster:
    pass


@message(27)
class ClientGoodbye:
    """A driver that joined a running cluster disconnects: drop its ObjectRefs."""


@message(5)
class PutObject:
    """``daskray.put``: a small value inline, or a large one already stored on a worker."""

    graph: int
    name: str
    inline: bytes | None
    holder: str | None
    nbytes: int
    store_key: str | None
    #: the shared-memory file ``inline`` describes
    shared: str | None


@message(6)
class RefsUpdate:
    """This process started (``added``) or stopped (``dropped``) holding these refs."""

    added: list
    dropped: list


@message(7)
class SubscribeRefs:
    refs: list


@message(8)
class CancelRefs:
    refs: list
    force: bool = False
    recursive: bool = True


@message(9)
class KillActorRequest:
    actor: str
    #: False: restart it, as after a crash, while its ``max_restarts`` lasts
    no_restart: bool = True


@message(31)
class GetResources:
    """Ask what the cluster has and what is free; answered by :class:`ResourcesReply`."""

    request: int


@message(40)
class GetStateSizes:
    """Ask how much the head's scheduler state holds (a debugging aid: tests check
    that a finished workload leaves nothing); answered by :class:`StateSizesReply`."""

    request: int


@message(30)
class GetActor:
    """Ask for the handle of a named actor; answered by :class:`ActorReply`."""

    name: str
    request: int
    #: None: the namespace of the asking driver (or of the task's driver)
    namespace: str | None = None
    #: set by a worker: the task whose code asks
    parent: int | None = None


@message(42)
class ListActors:
    """Ask for the names of the live named actors; answered by :class:`ActorNames`."""

    request: int
    all_namespaces: bool = False
    parent: int | None = None


@message(65)
class GetTimeline:
    """Ask for the task events the head has logged since event ``since``
    (``daskray.timeline``); answered by :class:`TimelineReply`."""

    request: int
    since: int = 0


@message(43)
class SetNamespace:
    """A driver says its namespace: its (and its tasks') named actors are there."""

    namespace: str


# ------------------------------------------------------------------ head -> client


@message(10)
class Welcome:
    #: {worker id: data server address}
    workers: dict
    session: str


@message(11)
class Result:
    graph: int
    node: int
    inline: bytes | None
    #: data server address of the worker holding a large result
    holder: str | None
    object_id: int


@message(12)
class Error:
    graph: int
    node: int
    error: bytes | None
    kind: str | None
    message: str | None


@message(13)
class Started:
    graph: int
    node: int
    worker: str


@message(14)
class Finished:
    graph: int
    node: int
    worker: str
    inline: bytes | None


@message(17)
class RefResult:
    """A remote object is ready (``inline`` or on ``holder``) or failed."""

    ref: tuple
    inline: bytes | None
    holder: str | None
    object_id: int
    error: bytes | None
    kind: str | None
    message: str | None


@message(18)
class ActorReply:
    request: int
    handle: bytes | None


@message(44)
class ActorNames:
    """The names of live named actors: names, or [namespace, name] pairs."""

    request: int
    names: list


@message(66)
class TimelineReply:
    """The head's task events: (seq, key, worker, start, end, state) tuples,
    oldest first; times are the head's ``time.time()``."""

    request: int
    events: list


@message(32)
class ResourcesReply:
    request: int
    total: dict
    available: dict


@message(41)
class StateSizesReply:
    request: int
    #: {what: how many}, see ``Head.state_sizes``
    sizes: dict


@message(15)
class WorkersChanged:
    workers: dict


@message(16)
class Rejected:
    """The head could not accept a message; ``reason`` says why.  ``graph``: the
    number of the rejected graph, when the message submitted one (only that
    graph fails); None for any other message (the connection is then unusable)."""

    reason: str
    graph: Any = None


# ------------------------------------------------------------------ worker <-> head


@message(20)
class WorkerReady:
    address: str
    pid: int
    slots: int
    resources: dict
    #: the actor this process hosts, or None for a worker
    actor: str | None


@message(21)
class Reports:
    """A batch of reports from a worker, in the order they happened: each one of
    the records ``FinishedReport``, ``ErredReport``, ``StartedReport``,
    ``ReleasedReport``, ``RefsReport`` or ``BlockedReport`` (see :mod:`.records`)."""

    items: list


@message(22)
class Run:
    """Tasks to run, in order (a ``RunTask`` record each, see :mod:`.records`),
    plus the function tables this worker has not been sent yet, by id."""

    tasks: list
    tables: dict


@message(23)
class Free:
    objects: tuple


@message(24)
class Cancel:
    tasks: tuple


@message(25)
class Forget:
    """Function tables no graph uses any more, by id."""

    tables: tuple


@message(26)
class Stop:
    pass


# ------------------------------------------------------------------ worker output


@message(60)
class WorkerOutput:
    """What tasks printed, as blocks of whole lines, each already prefixed
    ``(name pid=N) ``: ``(task id or None, stream 1|2, text)`` per block.  A
    worker's output thread sends it to the head over a socket of its own; the
    head forwards the blocks (task id None) to the drivers that asked."""

    blocks: list


@message(61)
class SubscribeOutput:
    """A driver wants its tasks' output (``init(log_to_driver=True)``, the default)."""


@message(62)
class OutputAck:
    """A driver wrote ``nbytes`` of forwarded output: the head may send that much more."""

    nbytes: int


@message(63)
class GetWorkerStatus:
    """Ask what each worker runs and has queued; answered by :class:`WorkerStatusReply`."""

    request: int


@message(64)
class WorkerStatusReply:
    request: int
    #: {worker id: {"task": name or None, "queued": int, "actor": id or None}}
    workers: dict


# ------------------------------------------------------------------ caller <-> actor, direct


@message(71)
class DirectCall:
    """A call of an actor's method, sent by its caller straight to the actor's
    process (its direct socket) instead of through the head.  The caller tells
    the head too (a ``SubmitGraph`` with ``direct`` set); the actor replies with a
    :class:`RefResult` on the same socket and reports to the head as usual."""

    #: the ObjectRef key of the call's result, chosen by the caller
    ref: tuple
    #: the function table the body refers to, by id; its bytes the first time
    #: the caller sends it to this process (None after)
    table_id: bytes
    table: bytes | None
    #: the pickled task (``serialization.decode_task``), as in a ``RunTask``
    body: bytes


@message(74)
class DirectCalls:
    """Several :class:`DirectCall` s to one actor's process, in order, as one
    message: ``(ref, table_id, table, body)`` each (one decode for a burst)."""

    calls: list


@message(75)
class DirectResults:
    """An actor's process replies to several direct calls of one caller at once:
    the fields of a :class:`RefResult` each, as a tuple."""

    results: list


def direct_batches(items: list, size_of: Any) -> list[list]:
    """``items`` (direct calls or their replies) in order, as lists for one
    ``DirectCalls`` / ``DirectResults`` message each, of about :data:`BATCH_BYTES`
    at most (``size_of(item)``: its bytes); an item larger than that goes alone."""
    return _grouped(items, size_of)


@message(72)
class ActorMoved:
    """Head -> caller: the process of ``actor`` that this caller sent calls to
    straight is gone (the actor restarts, or died): send calls through the head
    until it says where the actor is again."""

    actor: str


@message(73)
class WatchActor:
    """Caller -> head: this caller is about to learn where ``actor``'s process
    takes calls straight; say :class:`ActorMoved` when that process goes."""

    actor: str


# ------------------------------------------------------------------ either way


@message(70)
class Batch:
    """Several messages between a driver and the head, sent as one: each is an
    encoded message (:func:`encode`), in order.  A burst of calls from a driver,
    or of results for it, then costs one send and one wake-up, not one each.
    A batch never holds a batch (:func:`decode_batched`)."""

    messages: tuple


#: a batch holds at most this many bytes of messages; more go in the next one
BATCH_BYTES = 1 << 20


def batches(encoded: list) -> list:
    """``encoded`` messages as few frames as :data:`BATCH_BYTES` allows, in order: a
    message alone stays as it is, larger ones travel on their own."""
    return [_batch_frame(group) for group in _grouped(encoded, len)]


def _grouped(items: list, size_of: Any) -> list[list]:
    """``items`` in order, cut into lists of at most :data:`BATCH_BYTES` by
    ``size_of``; an item larger than that is a list of its own."""
    out: list[list] = []
    group: list = []
    size = 0
    for item in items:
        n = size_of(item)
        if group and size + n > BATCH_BYTES:
            out.append(group)
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        out.append(group)
    return out


def _batch_frame(group: list) -> Any:
    return group[0] if len(group) == 1 else encode(Batch(tuple(bytes(m) for m in group)))


def batch_items(msg: Batch) -> tuple:
    """The encoded messages in ``msg``; ``ProtocolError`` if it holds anything else."""
    if type(msg.messages) is not tuple or any(type(m) is not bytes for m in msg.messages):
        raise ProtocolError("a Batch holds a tuple of encoded messages")
    return msg.messages


def decode_batched(data: bytes) -> Any:
    """One message of a batch (:func:`decode`); a batch inside a batch is refused."""
    msg = decode(data)
    if type(msg) is Batch:
        raise ProtocolError("a Batch may not hold a Batch")
    return msg
