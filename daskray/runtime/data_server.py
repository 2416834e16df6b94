"""A worker's data server, and its client side: reading objects from other workers.

The data server is a thread of its own, so it answers while a task runs: other
processes' reads of this worker's objects (``GET``, sent as frames, or shared in
place), puts of large objects (``PUT``), the head's pings, interrupts and notices
that a peer died.  It ends the process when the head is gone.

:class:`PeerReader` is the other end: how a task's inputs held by other workers
are read, with the holder's death noticed while waiting.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable

import zmq

from ..errors import ObjectStoreFullError
from ..scheduler.policy import SHARE_THRESHOLD
from . import protocol as P
from . import host_transfer, transport
from .fetch import fetch_object
from .object_store import ObjectStore
from .process import pidfd
from .serialization import frames_nbytes

#: how long a read from another worker may wait for its answer
FETCH_TIMEOUT_MS = 60_000


def decode_object_id(arg: bytes) -> int | str:
    """Objects are kept under a task id (digits) or a put's key (a string)."""
    text = arg.decode()
    return int(text) if text.isdigit() else text



class DataServer(threading.Thread):
    """Serves this process's objects to other processes; watches the parent."""

    def __init__(
        self, ctx: zmq.Context, address: str, token: bytes, store: ObjectStore,
        parent_pid: int, on_interrupt: Any,
    ) -> None:
        super().__init__(name="daskray-data-server", daemon=True)
        self.sock = transport.router(ctx, address, token)
        self.log = transport.ThrottledLog(prefix="daskray worker")
        self.token = token
        self.store = store
        self.parent_pid = parent_pid
        self.on_interrupt = on_interrupt
        self.shm_prefix: str | None = None
        #: data-server addresses of workers the head said died
        self.lost_peers: set[str] = set()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        parent_fd = pidfd(self.parent_pid)
        if parent_fd is not None:
            poller.register(parent_fd, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if parent_fd is not None and parent_fd in events or os.getppid() != self.parent_pid:
                os._exit(0)  # the head is gone: nobody will ever need us again
            if self.sock in events:
                self._serve(self.sock.recv_multipart(copy=False))

    def _serve(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0]
        if len(frames) < 4 or not P.hmac.compare_digest(frames[1].bytes, self.token):
            # every peer has the token (the handshake checked it): a bug, not an attack
            self.log.write("ignored a data request without the session token")
            return
        verb, arg = frames[2].bytes, frames[3].bytes
        try:
            if verb == P.GET:
                object_id = decode_object_id(arg)
                # asked to share it (the driver), shared already, or big: written
                # once, read in place by every reader on the host; else sent (a
                # task reads an input once, and copying beats fresh shared pages)
                share = len(frames) > 4 and frames[4].bytes == P.SHARED
                try:
                    out = None
                    if self.shm_prefix is not None and not share:
                        share = self.store.exported(object_id)
                        if not share:
                            out = self.store.frames(object_id)
                            share = frames_nbytes(out) >= SHARE_THRESHOLD
                    if self.shm_prefix is not None and share:
                        try:
                            descriptor = self.store.export(object_id, self.shm_prefix, out)
                        except (ObjectStoreFullError, OSError) as exc:
                            # no room (or no way) in shared memory: the asker gets a
                            # copy of its own
                            self.log.write("an object was sent, not shared",
                                           f"object {object_id}: {exc}")
                            descriptor = None
                        if descriptor is not None:
                            self.sock.send_multipart([ident, P.SHARED, descriptor])
                            return
                    if out is None:
                        out = self.store.frames(object_id)
                except KeyError:
                    self.sock.send_multipart([ident, P.MISSING])
                    return
                self.sock.send_multipart([ident, P.OK, *out], copy=False)
            elif verb == P.PING:
                self.sock.send_multipart([ident, P.PONG])
            elif verb == P.PEER_LOST:
                self.lost_peers.add(arg.decode())
            elif verb == P.GETSHM:  # a reader on another host
                host_transfer.serve_descriptor(self.sock, ident, arg)
            elif verb == P.PUT:
                key = decode_object_id(arg)
                if len(frames) < 5 or not isinstance(key, str) or key in self.store:
                    raise ValueError("a put must name a new key and the layout of its buffers")
                self.store.put_frames(key, transport.join_buffers(frames[4].bytes, frames[5:]))
                self.sock.send_multipart([ident, P.OK])
            elif verb == P.INTERRUPT or verb == P.INTERRUPT_FORCE:
                dropped = self.on_interrupt([decode_object_id(x) for x in arg.split(b",") if x],
                                            verb == P.INTERRUPT_FORCE)
                if dropped:
                    self.sock.send_multipart(
                        [ident, P.DROPPED, b",".join(str(t).encode() for t in dropped)])
        except Exception as exc:  # noqa: BLE001 - this thread must outlive any request
            self.log.write(f"a {verb[:20]!r} request failed", repr(exc)[:300])
            if verb in (P.GET, P.GETSHM):  # the asker fails now, not after its timeout
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send_multipart([ident, P.MISSING])


class PeerReader:
    """Reads objects from other workers' data servers: one socket per peer for
    the main thread, kept; one per read for other threads (a concurrent actor's
    calls: a zmq socket serves one thread, and an actor may have 1000 of them)."""

    def __init__(self, ctx: zmq.Context, token: bytes, lost_peers: set[str]) -> None:
        self.ctx = ctx
        self.token = token
        #: data-server addresses of workers the head said died (see DataServer)
        self.lost_peers = lost_peers
        self.sockets: dict[str, zmq.Socket] = {}

    def fetch(self, address: str, object_id: Any) -> Any:
        """The object ``object_id`` held by the data server at ``address``;
        ``ObjectLostError`` (``HolderLostError``) if it is gone."""
        lost = self.lost_peers
        holder_lost: Callable[[], bool] = lambda: address in lost  # noqa: E731
        if threading.current_thread() is not threading.main_thread():
            sock = transport.dealer(self.ctx, address, self.token)
            try:
                return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS,
                                    holder_lost=holder_lost)
            finally:
                sock.close(0)
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.sockets[address] = transport.dealer(self.ctx, address, self.token)
        try:
            return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS,
                                holder_lost=holder_lost)
        except BaseException:
            # its answer may still come: a later fetch must not read it as its own
            self.sockets.pop(address, None)
            sock.close(0)
            raise

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
