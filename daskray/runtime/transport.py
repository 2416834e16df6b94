"""ZeroMQ sockets with the options every daskray socket needs, and their
authentication.

* Every bound socket (the head's, a worker's data server, the driver's object
  server) authenticates its peers during ZeroMQ's own handshake: ZMTP's PLAIN
  mechanism carries the session token as the password, and this process's ZAP
  handler (:class:`Authenticator`, started with the first bound socket) checks it.
  A peer without the token is dropped before a single message of it is read, so
  it can neither take an identity another process will need nor hold a
  connection open past the handshake.
* ``MAXMSGSIZE`` on bound sockets is :data:`MAX_FRAME_BYTES`.  libzmq applies it
  to each frame, not to a multipart message: a peer sending a larger frame (the
  handshake's own commands included, before it has authenticated) is
  disconnected, so no single frame makes this process allocate more.  Senders
  to a bound socket split larger messages into frames of at most that size
  (:func:`send_message`, :func:`split_buffers`).  Connected sockets set no limit:
  they hear only the bound sockets daskray made (the head's messages to workers,
  data servers' replies).  It bounds frames, not what an authenticated peer may
  queue: high-water marks are off (below), and the session token is the trust
  boundary.
* ``HANDSHAKE_IVL`` is short: a peer that connects and never finishes the
  handshake loses its connection (and file descriptor) within seconds.
* ``LINGER`` is finite, so closing a socket never blocks shutdown.
* ``ROUTER_MANDATORY``: a message to a peer that is gone raises instead of
  vanishing, so the head learns about it.
* High-water marks are off: daskray bounds its queues itself (prefetch), and a
  silently dropped task report would hang a graph.

Also the wake-up pipes that threads (and finalizers) use to wake a polling loop,
:func:`raise_open_files_limit`, and :class:`ThrottledLog` for lines a hostile
peer could otherwise make us write without end.
"""

from __future__ import annotations

import hmac
import os
import resource
import sys
import threading
import time
import weakref
from typing import Any, Iterable, Sequence

import zmq

LINGER_MS = 200
#: the largest frame a bound socket accepts (see the module docstring)
MAX_FRAME_BYTES = 8 << 20
#: a peer must finish ZeroMQ's handshake (and its authentication) within this
HANDSHAKE_MS = 10_000
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"daskray"
PLAIN_USER = b"daskray"
#: the first frame of a message split into several
SPLIT = b"daskray-split"


def _configure(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def router(ctx: zmq.Context, address: str, token: bytes) -> zmq.Socket:
    """A ROUTER bound to ``address`` (ipc path or loopback tcp) that admits only
    peers presenting ``token`` in the handshake."""
    Authenticator.ensure(ctx, token)
    sock = _configure(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.bind(address)
    if address.startswith("ipc://"):
        os.chmod(address[len("ipc://"):], 0o600)
    return sock


def dealer(ctx: zmq.Context, address: str, token: bytes,
           identity: str | bytes | None = None) -> zmq.Socket:
    """A DEALER connected to ``address``, authenticating with ``token``.  It
    connects only to addresses daskray made, so what it receives is unbounded."""
    sock = _configure(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.PLAIN_USERNAME, PLAIN_USER)
    sock.setsockopt(zmq.PLAIN_PASSWORD, token.hex().encode())
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode() if isinstance(identity, str) else identity)
    sock.connect(address)
    return sock


def ipc_address(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}"


# ---------------------------------------------------------------- authentication


class Authenticator(threading.Thread):
    """This process's ZAP handler: admits a handshake whose PLAIN password is the
    session token, refuses every other one (and logs that, throttled).

    One per ZeroMQ context, started by the first :func:`router`; it ends when the
    context is terminated.  Without a ZAP handler libzmq refuses every PLAIN
    peer, so a bound socket never admits anyone unchecked.
    """

    _running: "weakref.WeakKeyDictionary[zmq.Context, Authenticator]" = \
        weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def ensure(cls, ctx: zmq.Context, token: bytes) -> None:
        with cls._lock:
            current = cls._running.get(ctx)
            if current is not None and current.is_alive():
                if not hmac.compare_digest(current.password, token.hex().encode()):
                    raise ValueError("one ZeroMQ context serves one session token")
                return
            cls._running[ctx] = auth = cls(ctx, token)
            auth.start()

    def __init__(self, ctx: zmq.Context, token: bytes) -> None:
        super().__init__(name="daskray-authenticator", daemon=True)
        self.password = token.hex().encode()
        # bound here, before any router exists: no handshake can miss it
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.log = ThrottledLog()

    def run(self) -> None:
        try:
            while True:
                try:
                    request = self.sock.recv_multipart()
                except zmq.ContextTerminated:
                    return
                self.sock.send_multipart(self.answer(request))
        except zmq.ZMQError:
            return
        finally:
            self.sock.close(0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply (RFC 27) to one handshake's request."""
        if len(request) < 6:  # not a ZAP request: libzmq never sends one
            return [b"1.0", b"", b"500", b"malformed request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        ok = (domain == ZAP_DOMAIN and mechanism == b"PLAIN" and len(credentials) == 2
              and hmac.compare_digest(credentials[1], self.password))
        if ok:
            return [version, request_id, b"200", b"OK", PLAIN_USER, b""]
        self.log.write("refused a connection that did not present the session token")
        return [version, request_id, b"400", b"not authenticated", b"", b""]


# ---------------------------------------------------------------- large messages


def send_message(sock: zmq.Socket, data: Any, prefix: Sequence[Any] = ()) -> None:
    """Send one encoded message (bytes or a zmq Frame) as frames of at most
    :data:`MAX_FRAME_BYTES`, after the ``prefix`` frames; :func:`join_frames`
    puts it back together."""
    view = memoryview(data.buffer if isinstance(data, zmq.Frame) else data).cast("B")
    if len(view) <= MAX_FRAME_BYTES:
        if prefix:
            sock.send_multipart([*prefix, data], copy=False)
        else:
            sock.send(data, copy=False)
        return
    sock.send_multipart([*prefix, SPLIT, *_pieces(view)], copy=False)


def join_frames(frames: Sequence[zmq.Frame]) -> memoryview | bytes:
    """One message from the frames :func:`send_message` split it into;
    ``ValueError`` for frames it did not make."""
    if len(frames) == 1:
        return frames[0].buffer
    if len(frames) > 2 and frames[0].bytes == SPLIT:
        return b"".join(f.buffer for f in frames[1:])
    raise ValueError(f"expected one message, got {len(frames)} frames that are not one "
                     "split message")


def split_buffers(buffers: Iterable[Any]) -> tuple[bytes, list[memoryview]]:
    """Out-of-band buffers as frames of at most :data:`MAX_FRAME_BYTES`, and the
    layout (pieces per buffer) :func:`join_buffers` needs; no copy is made."""
    counts, pieces = [], []
    for buffer in buffers:
        parts = _pieces(memoryview(buffer).cast("B"))
        counts.append(str(len(parts)))
        pieces.extend(parts)
    return ",".join(counts).encode(), pieces


def join_buffers(layout: bytes, frames: Sequence[zmq.Frame]) -> list[memoryview | bytes]:
    """The buffers :func:`split_buffers` sent (a buffer in one piece is not copied).
    ``ValueError`` if the frames do not match the layout."""
    counts = [int(c) for c in layout.split(b",")] if layout else []
    if any(c < 1 for c in counts) or sum(counts) != len(frames):
        raise ValueError(f"{len(frames)} frames do not match the layout {layout[:100]!r}")
    buffers, at = [], 0
    for count in counts:
        part = frames[at:at + count]
        buffers.append(part[0].buffer if count == 1 else b"".join(f.buffer for f in part))
        at += count
    return buffers


def _pieces(view: memoryview) -> list[memoryview]:
    if len(view) <= MAX_FRAME_BYTES:
        return [view]
    return [view[i:i + MAX_FRAME_BYTES] for i in range(0, len(view), MAX_FRAME_BYTES)]


# ---------------------------------------------------------------- process limits


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (each peer
    connection is a file descriptor, and libzmq aborts the process when an ipc
    listener runs out of them); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# ---------------------------------------------------------------- logging


class ThrottledLog:
    """Writes a line to stderr at most once per ``interval`` seconds per text,
    saying how many like it were held back, so that a peer sending garbage cannot
    fill the disk with our complaints about it."""

    def __init__(self, interval: float = 10.0, prefix: str = "daskray") -> None:
        self.interval = interval
        self.prefix = prefix
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, text: str, detail: str = "") -> bool:
        """Log ``text`` (+ ``detail``, which does not count as a different line);
        whether it was written now."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(text)
            if last is not None and now - last < self.interval:
                self._held[text] = self._held.get(text, 0) + 1
                return False
            if len(self._last) > 1000:  # texts are few; never grow without bound
                self._last.clear()
                self._held.clear()
            self._last[text] = now
            held = self._held.pop(text, 0)
        more = f" ({held} more like it in the last {self.interval:.0f} s)" if held else ""
        print(f"{self.prefix}: {text}{': ' + detail if detail else ''}{more}",
              file=sys.stderr, flush=True)
        return True


# ---------------------------------------------------------------- wake-up pipes


def poke(fd: int) -> None:
    """Wake whoever polls the read end of pipe ``fd`` (any thread, even a
    finalizer, where a zmq socket or a lock is not safe); a full pipe is awake."""
    try:
        os.write(fd, b"r")
    except OSError:
        pass


def drain_pipe(fd: int) -> None:
    """Empty the (non-blocking) read end of a wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
