"""Asking another process's data server for one object it holds.

Used by the driver's client and by workers alike, so it lives apart from both.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from ..errors import HolderLostError, ObjectLostError
from . import protocol as P
from .serialization import loads


def fetch_object(sock: zmq.Socket, token: bytes, object_id: Any, timeout_ms: int,
                 shared: bool = False, holder_lost: Any = None) -> Any:
    """Ask the data server behind ``sock`` for an object; ``ObjectLostError`` if it is
    gone.  ``shared``: have it put in shared memory (worth it when read again).
    ``holder_lost()``: whether the holder is known dead (checked while waiting)."""
    request = [token, P.GET, str(object_id).encode()]
    sock.send_multipart(request + [P.SHARED] if shared else request)
    deadline = time.monotonic() + timeout_ms / 1000
    while not sock.poll(100 if holder_lost is not None else timeout_ms):
        if holder_lost is not None and holder_lost():
            raise HolderLostError(f"object {object_id}: the worker holding it died")
        if holder_lost is None or time.monotonic() > deadline:
            raise ObjectLostError(
                f"object {object_id}: its holder did not answer within {timeout_ms} ms")
    reply = sock.recv_multipart(copy=False)
    if reply[0].bytes == P.SHARED:
        return loads(reply[1].bytes)
    if reply[0].bytes != P.OK:
        raise ObjectLostError(f"object {object_id} is no longer held by the process asked for it")
    return loads(reply[1].buffer, buffers=[f.buffer for f in reply[2:]])
