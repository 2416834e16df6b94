"""The head's control line to each worker's data server: heartbeats, interrupts,
and notices that a peer died.

The data server is a thread of its own in the worker, so it answers while a task
runs: a worker that stops answering pings for ``worker_ttl`` seconds is stopped or
hung with the GIL held, and is killed (its exit then goes the usual way).  An
interrupt reaches a running task through it, and its answer names the queued
tasks the worker dropped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Iterable

import zmq

from . import protocol as P
from . import transport

#: how often the head pings every worker (when a worker TTL is set)
HEARTBEAT_SECONDS = 0.5


class WorkerControl:
    """One DEALER socket per joined worker, to its data server, and what the
    heartbeats have heard (or not) from each."""

    def __init__(self, ctx: zmq.Context, token: bytes, poller: zmq.Poller,
                 worker_ttl: float | None) -> None:
        self.ctx = ctx
        self.token = token
        self.poller = poller
        #: seconds of silence after which a worker is killed as hung (None: never)
        self.worker_ttl = worker_ttl
        self.sockets: dict[str, zmq.Socket] = {}
        self.worker_of: dict[zmq.Socket, str] = {}
        #: worker id -> when the oldest ping it has not answered was sent
        self.unanswered_since: dict[str, float] = {}
        self.last_ping = 0.0
        self.hung: dict[str, float] = {}  # worker id -> seconds silent when it was killed
        #: workers told to end their process for daskray.cancel(force=True)
        self.force_cancelled: set[str] = set()

    def connect(self, wid: str, address: str) -> None:
        """Open the control line to the data server of ``wid``, which just joined."""
        sock = self.sockets[wid] = transport.dealer(self.ctx, address, self.token)
        self.poller.register(sock, zmq.POLLIN)
        self.worker_of[sock] = wid

    def disconnect(self, wid: str) -> float | None:
        """Close the line to the exited ``wid``; the seconds it had been silent when
        it was killed as hung (None: it was not)."""
        sock = self.sockets.pop(wid, None)
        if sock is not None:
            self.poller.unregister(sock)
            self.worker_of.pop(sock, None)
            sock.close(0)
        self.unanswered_since.pop(wid, None)
        return self.hung.pop(wid, None)

    def peer_lost(self, address: str) -> None:
        """Tell every worker that the data server at ``address`` is gone: a read
        from it still in flight must not wait out its timeout."""
        for sock in self.sockets.values():
            sock.send_multipart([self.token, P.PEER_LOST, address.encode()])

    def interrupt(self, wid: str, tasks: Iterable[int], force: bool = False) -> None:
        """Ask ``wid`` to interrupt these tasks if running (``force``: by ending its
        process), and drop them if queued."""
        sock = self.sockets.get(wid)
        if sock is not None:
            if force:
                self.force_cancelled.add(wid)
            verb = P.INTERRUPT_FORCE if force else P.INTERRUPT
            sock.send_multipart([self.token, verb, b",".join(str(t).encode() for t in tasks)])

    def take_force_cancel(self, wid: str) -> bool:
        """Whether ``wid`` was told to end its process for a force cancel (asked
        once, when it exited: its death is then that cancel's, not a crash)."""
        if wid in self.force_cancelled:
            self.force_cancelled.discard(wid)
            return True
        return False

    def heard_from(self, wid: str) -> None:
        """``wid`` sent something: it is alive."""
        self.unanswered_since.pop(wid, None)

    def ready(self, ready: Iterable) -> list[str]:
        """The workers whose control sockets are among the poll's ``ready``."""
        return [self.worker_of[s] for s in ready if s in self.worker_of]

    def read_replies(self, wid: str) -> list[int]:
        """Read every answer from ``wid``'s data server: the queued tasks it
        dropped when told to interrupt them."""
        sock = self.sockets[wid]
        dropped: list[int] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            self.heard_from(wid)
            if len(frames) == 2 and frames[0] == P.DROPPED:
                # task ids, or direct calls' keys (see scheduler.actors.direct_key)
                dropped.extend(int(t) if t.isdigit() else t.decode(errors="replace")
                               for t in frames[1].split(b",") if t)

    def check(self, procs: dict[str, subprocess.Popen]) -> dict[str, list[int]]:
        """Ping every worker's data server every ``HEARTBEAT_SECONDS``; kill a
        worker (of ``procs``) that has not answered a ping sent ``worker_ttl``
        seconds ago.  Silence counts from the oldest unanswered ping, after reading
        every answer already there, so a head that was busy itself does not take
        its workers for dead.  The tasks those answers said were dropped, by worker."""
        now = time.monotonic()
        if self.worker_ttl is None or now - self.last_ping < HEARTBEAT_SECONDS:
            return {}
        self.last_ping = now
        dropped = {wid: self.read_replies(wid) for wid in list(self.sockets)}
        for wid, sock in self.sockets.items():
            asked = self.unanswered_since.get(wid)
            proc = procs.get(wid)
            if asked is not None and now - asked > self.worker_ttl and proc is not None:
                self._kill_hung(wid, proc, now - asked)
                continue
            if asked is None:
                self.unanswered_since[wid] = now
            sock.send_multipart([self.token, P.PING, b""])
        return {wid: tasks for wid, tasks in dropped.items() if tasks}

    def _kill_hung(self, wid: str, proc: subprocess.Popen, silent: float) -> None:
        if wid in self.hung:
            return
        self.hung[wid] = silent
        print(f"daskray: worker {wid} pid {proc.pid} has not answered for "
              f"{silent:.0f} s (distributed.scheduler.worker-ttl); killing it", file=sys.stderr)
        proc.kill()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
