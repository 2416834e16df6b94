"""ZeroMQ sockets with the options every daskray socket needs.

* ``LINGER`` is finite, so closing a socket never blocks shutdown.
* ``ROUTER_MANDATORY``: a message to a peer that is gone raises instead of
  vanishing, so the head learns about it.
* High-water marks are off: daskray bounds its queues itself (prefetch), and a
  silently dropped task report would hang a graph.
* ``MAXMSGSIZE`` bounds what an unauthenticated peer can make us buffer.

Also the wake-up pipes that threads (and finalizers) use to wake a polling loop.
"""

from __future__ import annotations

import os

import zmq

LINGER_MS = 200
MAX_MESSAGE_BYTES = 1 << 40


def _configure(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def router(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A ROUTER bound to ``address`` (ipc path or loopback tcp)."""
    sock = _configure(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(address)
    if address.startswith("ipc://"):
        os.chmod(address[len("ipc://"):], 0o600)
    return sock


def dealer(ctx: zmq.Context, address: str, identity: str | bytes | None = None) -> zmq.Socket:
    """A DEALER connected to ``address``."""
    sock = _configure(ctx.socket(zmq.DEALER))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode() if isinstance(identity, str) else identity)
    sock.connect(address)
    return sock


def ipc_address(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}"


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
