"""What each worker does now, for ``daskray status`` (the head answers ``GetWorkerStatus``)."""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from ..errors import ClusterError
from . import protocol as P
from . import transport


def worker_status(state: Any, pids: dict[str, int]) -> dict[str, dict]:
    """Per joined worker (``state``: the head's SchedulerState; ``pids``: worker id
    -> process id): the task it runs (its name; None when idle), how many more wait
    for it (sent to it, or queued for it in the head), and the actor it hosts."""
    out: dict[str, dict] = {}
    for wid, ws in sorted(state.workers.items()):
        # a worker runs what it was sent in order: the oldest of them runs now
        running = sorted(ws.processing)
        ts = state.tasks.get(running[0]) if running else None
        out[wid] = {
            "task": None if ts is None else str(ts.name),
            "queued": max(0, len(running) - 1) + len(ws.queue),
            "actor": ws.actor,
            "extra": ws.extra,
            "pid": pids.get(wid),
        }
    return out


def query_worker_status(address: str, token: bytes, timeout: float = 5.0) -> dict[str, dict]:
    """Ask the head at ``address`` what its workers do (``worker_status``); joins
    as a client for the question and says goodbye after."""
    ctx = zmq.Context()
    sock = transport.dealer(ctx, address, token, identity=b"s" + os.urandom(7))
    try:
        sock.send_multipart(P.hello_frames(token, P.ROLE_CLIENT, f"driver:{os.getpid()}"))
        sock.send(P.encode(P.GetWorkerStatus(1)))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise ClusterError(f"the head at {address} did not answer within {timeout:.0f} s")
            try:
                msg = P.decode(transport.join_frames(sock.recv_multipart(copy=False)))
            except (P.ProtocolError, ValueError):
                continue
            if type(msg) is P.WorkerStatusReply:
                sock.send(P.encode(P.ClientGoodbye()))
                return msg.workers
    finally:
        sock.close(500)
        ctx.term()
