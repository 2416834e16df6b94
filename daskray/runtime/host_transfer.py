"""Objects from another host's store: sent over a socket instead of mapped.

A shared-memory descriptor can be mapped only on the host whose store holds the
file.  Every descriptor also names a server on that host -- the data server of
the worker that wrote it, or the driver's :class:`SharedObjectServer` -- so a
reader in another store namespace asks that server for the object's bytes:
``[token, GETSHM, descriptor]`` answered by ``[OK, header, buffer, ...]``, the
buffers sent straight from the mapping.

On one machine every process shares one store and none of this runs, unless a
cluster is started with several store namespaces (``init(_store_namespaces=2)``),
which stands in for several hosts in the tests.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import zmq

from ..errors import ObjectLostError
from . import protocol as P
from . import shared_memory, transport
from .serialization import loads

FETCH_TIMEOUT_MS = 60_000


def serve_descriptor(sock: zmq.Socket, ident: Any, descriptor: bytes) -> None:
    """Answer a GETSHM request for an object of this host's store."""
    if not (shared_memory.is_descriptor(descriptor) and shared_memory.in_this_store(descriptor)):
        sock.send_multipart([ident, P.MISSING])
        return
    try:
        header, buffers = shared_memory.local_frames(descriptor)
    except FileNotFoundError:
        sock.send_multipart([ident, P.MISSING])
        return
    sock.send_multipart([ident, P.OK, header, *buffers], copy=False)


def fetch(ctx: zmq.Context, token: bytes, server: str, descriptor: bytes) -> Any:
    """The object behind another host's ``descriptor``, from ``server``."""
    sock = transport.dealer(ctx, server, token)
    try:
        sock.send_multipart([token, P.GETSHM, descriptor])
        if not sock.poll(FETCH_TIMEOUT_MS):
            raise ObjectLostError(
                f"the host holding an object did not send it within {FETCH_TIMEOUT_MS} ms")
        reply = sock.recv_multipart(copy=False)
    finally:
        sock.close(0)
    if reply[0].bytes != P.OK:
        raise ObjectLostError("an object of another host's store was freed before it was read")
    return loads(reply[1].buffer, buffers=[f.buffer for f in reply[2:]])


class SharedObjectServer(threading.Thread):
    """Sends the objects this process wrote to readers on other hosts."""

    def __init__(self, ctx: zmq.Context, address: str, token: bytes) -> None:
        super().__init__(name="daskray-object-server", daemon=True)
        self.address = address
        self.token = token
        self.sock = transport.router(ctx, address, token)
        self.log = transport.ThrottledLog()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if not self.sock.poll(200):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                if len(frames) != 4 or not P.hmac.compare_digest(frames[1].bytes, self.token):
                    continue  # unauthenticated or malformed: not looked at further
                if frames[2].bytes != P.GETSHM:
                    continue
                try:
                    serve_descriptor(self.sock, frames[0], frames[3].bytes)
                except Exception as exc:  # noqa: BLE001 - the server outlives any request
                    self.log.write("an object request failed", repr(exc)[:300])
                    with contextlib.suppress(zmq.ZMQError):
                        self.sock.send_multipart([frames[0], P.MISSING])
        finally:
            self.sock.close(0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
