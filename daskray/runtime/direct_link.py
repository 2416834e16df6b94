"""Unix stream sockets for actor calls sent straight to the actor's process.

A caller's calls and the actor's replies are small messages on a path where one
call waits on the one before it, so they skip ZeroMQ: a ZeroMQ message crosses
the sender's I/O thread and the receiver's, four thread switches per round trip
that a plain socket does not pay (a round trip between two processes costs about
half as much here).  What ZeroMQ gave these sockets is done here:

* **Framing.**  Each message is a 4-byte little-endian length and that many bytes
  (a :func:`~daskray.runtime.protocol.encode`\\ d message).
* **Authentication.**  A caller's first message is the session token itself,
  as ZeroMQ's PLAIN mechanism sends it on the other sockets.  The actor's
  process reads no more than the token's length from a peer before the token
  matched (a longer first message closes the connection at its length header),
  decodes nothing from it, sends it nothing, and closes a connection whose token
  does not match or does not come within ``HANDSHAKE_SECONDS`` (and the oldest
  such connection beyond ``MAX_UNAUTHENTICATED``).  An accept that fails (out of
  descriptors) pauses accepting for a second rather than polling ready without end.
* **Writes that never block.**  Both ends write without blocking; what a full
  socket does not take waits in the connection's buffer and goes when the socket
  is writable again.  The actor's process closes a connection whose peer lets
  more than ``MAX_UNSENT_BYTES`` of replies pile up unread.

:class:`DirectServer` is the actor's side: a listening socket and its
connections behind one epoll descriptor, which the worker's poll loop watches
with its other sockets.  :class:`DirectLink` is a caller's connection to one
actor process: the driver's I/O thread owns it, and the thread making a call
writes it there itself.
"""

from __future__ import annotations

import hmac
import itertools
import os
import select
import socket
import struct
import threading
import time
from typing import Any

HEADER = struct.Struct("<I")
#: a peer must present the session token within this long after connecting
HANDSHAKE_SECONDS = 10.0
#: replies a peer leaves unread beyond this close its connection
MAX_UNSENT_BYTES = 64 << 20
#: the largest message a connection takes (a length header above it closes it)
MAX_MESSAGE_BYTES = (1 << 32) - 1
#: connections still to present the token beyond this close the oldest of them
MAX_UNAUTHENTICATED = 64
#: after an accept fails (out of descriptors), new callers wait this long in the queue
ACCEPT_PAUSE_SECONDS = 1.0
_READ_BYTES = 1 << 18


def frame(payload: Any) -> bytes:
    """``payload`` with its length header, ready to write."""
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Cuts the bytes read from a stream into messages."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """The messages ``data`` completes; ValueError for a length over the limit."""
        buf = self._buffer
        buf += data
        out = []
        start = 0
        end = len(buf)
        while end - start >= 4:
            (size,) = HEADER.unpack_from(buf, start)
            if size > self._limit:
                raise ValueError(f"a message of {size} bytes is over the limit")
            if end - start - 4 < size:
                break
            out.append(bytes(buf[start + 4:start + 4 + size]))
            start += 4 + size
        if start:
            del buf[:start]
        return out

    def pending(self) -> int:
        return len(self._buffer)


def _write_some(sock: socket.socket, unsent: bytearray) -> None:
    """Write what ``sock`` takes now of ``unsent`` and drop it from there."""
    while unsent:
        try:
            n = sock.send(unsent)
        except (BlockingIOError, InterruptedError):
            return
        del unsent[:n]


class _Peer:
    __slots__ = ("sock", "reader", "authenticated", "since", "unsent")

    def __init__(self, sock: socket.socket, token_bytes: int) -> None:
        self.sock = sock
        self.reader = FrameReader(limit=token_bytes)  # until the token matched
        self.authenticated = False
        self.since = time.monotonic()
        self.unsent = bytearray()


class DirectServer:
    """The actor process's end: accepts callers, checks their token, hands out
    their messages (:meth:`receive`) and sends them replies (:meth:`send`)."""

    def __init__(self, path: str, token: bytes, log: Any) -> None:
        self.path = path
        self._token = token
        self._log = log
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._peers: dict[int, _Peer] = {}  # by peer id
        self._by_fd: dict[int, int] = {}  # fd -> peer id
        self._ids = itertools.count(1)
        #: while set (a monotonic time), the listener is not watched: an accept that
        #: fails leaves the caller queued, and the socket would poll ready without end
        self._accept_paused_until: float | None = None

    def fileno(self) -> int:
        """Readable when anything waits (a new caller, a message, room to write)."""
        return self._epoll.fileno()

    def receive(self) -> list[tuple[int, bytes]]:
        """The messages authenticated peers sent, as (peer id, bytes), in order per
        peer; also accepts callers, writes what waited, and drops dead peers."""
        out: list[tuple[int, bytes]] = []
        listener = self._listener.fileno()
        for fd, events in self._epoll.poll(0):
            if fd == listener:
                self._accept()
                continue
            pid = self._by_fd.get(fd)
            if pid is None:
                continue
            peer = self._peers[pid]
            if events & select.EPOLLOUT:
                self._flush(pid, peer)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._read(pid, peer, out)
        self.expire()
        return out

    def send(self, pid: int, payload: bytes) -> bool:
        """Send ``payload`` to peer ``pid`` (now, or when its socket takes it);
        False if that peer is gone."""
        peer = self._peers.get(pid)
        if peer is None:
            return False
        peer.unsent += frame(payload)
        had_backlog = len(peer.unsent) > 4 + len(payload)
        try:
            _write_some(peer.sock, peer.unsent)
        except OSError:
            self._close(pid)
            return False
        if len(peer.unsent) > MAX_UNSENT_BYTES:
            self._log.write("closed a direct-call connection whose peer reads no replies")
            self._close(pid)
            return False
        if peer.unsent and not had_backlog:
            self._epoll.modify(peer.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return True

    def expire(self) -> None:
        """Close connections that did not present the token in time; watch the
        listener again after a pause."""
        now = time.monotonic()
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._epoll.modify(self._listener.fileno(), select.EPOLLIN)
        for pid, peer in list(self._peers.items()):
            if not peer.authenticated and now - peer.since > HANDSHAKE_SECONDS:
                self._log.write("closed a direct-call connection that never authenticated")
                self._close(pid)

    def close(self) -> None:
        for pid in list(self._peers):
            self._close(pid)
        self._epoll.close()
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, for one: the caller waits
                self._log.write("could not accept a direct-call connection", str(exc))
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                self._epoll.modify(self._listener.fileno(), 0)
                return
            sock.setblocking(False)
            waiting = [p for p, peer in self._peers.items() if not peer.authenticated]
            if len(waiting) >= MAX_UNAUTHENTICATED:
                self._log.write("closed a direct-call connection that never authenticated "
                                "(too many waiting)")
                self._close(waiting[0])
            pid = next(self._ids)
            self._peers[pid] = _Peer(sock, len(self._token))
            self._by_fd[sock.fileno()] = pid
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, pid: int, peer: _Peer, out: list) -> None:
        while True:
            try:
                data = peer.sock.recv(_READ_BYTES if peer.authenticated
                                      else 4 + len(self._token) - peer.reader.pending())
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(pid)
                return
            if not data:
                self._close(pid)
                return
            try:
                messages = peer.reader.feed(data)
            except ValueError as exc:
                self._log.write("closed a direct-call connection", str(exc))
                self._close(pid)
                return
            if not peer.authenticated:
                if not messages:
                    continue
                if not hmac.compare_digest(messages[0], self._token):
                    self._log.write("refused a direct-call connection without the "
                                    "session token")
                    self._close(pid)
                    return
                peer.authenticated = True
                peer.reader = FrameReader()
                continue
            out.extend((pid, m) for m in messages)

    def _flush(self, pid: int, peer: _Peer) -> None:
        try:
            _write_some(peer.sock, peer.unsent)
        except OSError:
            self._close(pid)
            return
        if not peer.unsent:
            self._epoll.modify(peer.sock.fileno(), select.EPOLLIN)

    def _close(self, pid: int) -> None:
        peer = self._peers.pop(pid, None)
        if peer is None:
            return
        fd = peer.sock.fileno()
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        peer.sock.close()


class DirectLink:
    """A caller's connection to one actor process.

    Any thread may :meth:`send` (a user thread writes its call itself, saving a
    hand-off to the I/O thread); one thread (the owner, the driver's I/O thread)
    receives, connects, flushes and closes.  :meth:`send` never blocks: a message
    the socket does not take waits in ``unsent`` (the owner polls :meth:`fileno`
    for writing while :meth:`wants_write`).  If the process is gone (nothing
    listens, the connection breaks) the link is *dead*: what it held and what is
    sent to it later is dropped, as a message to a dead process would be -- the
    head tells the caller what became of those calls."""

    def __init__(self, path: str, token: bytes) -> None:
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.reader = FrameReader()
        self.unsent = bytearray(frame(token))
        self.connected = False
        self.dead = False
        #: guards ``unsent``, the state and writes to the socket
        self.lock = threading.Lock()
        #: whether the process answered since the last call sent (the owner's flag)
        self.answered = True
        #: whether the owner polls it, and for room to write (the owner's flags)
        self.registered = False
        self.watched_for_writing = False
        self.connect()

    def fileno(self) -> int:
        return self.sock.fileno()

    def connect(self) -> None:
        """Try to connect (again): a full listen queue leaves it for later."""
        with self.lock:
            if self.connected or self.dead:
                return
            try:
                self.sock.connect(self.address)
            except (BlockingIOError, InterruptedError):
                return  # the listen queue is full: the owner tries again soon
            except OSError:
                self._die()
                return
            self.connected = True
            self._write()

    def send(self, payload: bytes) -> None:
        data = frame(payload)
        with self.lock:
            if self.dead:
                return
            self.unsent += data
            if self.connected:
                self._write()

    def flush(self) -> None:
        with self.lock:
            if self.connected and not self.dead:
                self._write()

    def wants_write(self) -> bool:
        return self.connected and bool(self.unsent)

    def receive(self) -> list[bytes]:
        """The messages the process sent that have come in (none once dead)."""
        out: list[bytes] = []
        while self.connected and not self.dead:
            try:
                data = self.sock.recv(_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            try:
                if not data:
                    raise ValueError("closed")
                out.extend(self.reader.feed(data))
            except ValueError:
                with self.lock:
                    self._die()
        return out

    def close(self) -> None:
        with self.lock:
            self.dead = True
            self.sock.close()

    def _write(self) -> None:
        try:
            _write_some(self.sock, self.unsent)
        except OSError:
            self._die()

    def _die(self) -> None:
        self.dead = True  # nothing listens (ENOENT, ECONNREFUSED) or it broke (EPIPE)
        self.connected = False  # no thread writes to it straight any more
        self.unsent = bytearray()
