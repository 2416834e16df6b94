"""The drivers connected to the head: which wait for their welcome, and which are
watched so that their exit, however it happens, is noticed.

A driver other than the cluster's owner may exit without a goodbye (killed, say):
its pidfd sits in the head's poll, so its ObjectRefs stop keeping objects alive at
once, and the shared-memory files it wrote but never told the head about (killed
in the middle of a put) are removed.
"""

from __future__ import annotations

import glob
import os
from typing import Container, Iterable

import zmq

from . import shared_memory
from .process import alive, pidfd


class Clients:
    """The drivers waiting for their welcome, and the pids of those watched."""

    def __init__(self, poller: zmq.Poller, owner_pid: int, shm_prefix: str) -> None:
        self.poller = poller
        #: the driver that started the cluster: its exit stops the cluster instead
        self.owner_pid = owner_pid
        self.shm_prefix = shm_prefix
        self.fds: dict[int, bytes] = {}  # pidfd -> a joined driver's identity
        self.pid: dict[bytes, int] = {}  # a joined driver's identity -> its pid
        #: drivers whose hello was read, not yet welcomed
        self.waiting: list[bytes] = []

    def watch(self, ident: bytes, name: str) -> bool:
        """Watch the driver ``ident`` (its hello's ``name`` is ``driver:PID``)
        unless it is the cluster's owner.  Whether it is gone already (before its
        hello was read)."""
        _, _, pid = name.partition(":")
        if not pid.isdigit() or int(pid) == self.owner_pid:
            return False
        self.pid[ident] = int(pid)
        fd = pidfd(int(pid))
        if fd is not None:
            self.fds[fd] = ident
            self.poller.register(fd, zmq.POLLIN)
            return False
        return not alive(int(pid))

    def exited(self, ready: Iterable) -> list[bytes]:
        """The watched drivers whose pidfds are among the poll's ``ready``."""
        return [self.fds[fd] for fd in ready if fd in self.fds]

    def forget(self, ident: bytes) -> int | None:
        """Stop watching ``ident`` and waiting to welcome it; its pid, if watched."""
        for fd, who in list(self.fds.items()):
            if who == ident:
                self.poller.unregister(fd)
                os.close(fd)
                del self.fds[fd]
        self.waiting = [c for c in self.waiting if c != ident]
        return self.pid.pop(ident, None)

    def await_welcome(self, ident: bytes) -> None:
        """The driver ``ident`` said hello: it waits for its welcome."""
        self.waiting.append(ident)

    def take_waiting(self) -> list[bytes]:
        """The drivers waiting for their welcome, now no longer waiting."""
        waiting, self.waiting = self.waiting, []
        return waiting

    def remove_unannounced_files(self, pid: int, announced: Container[str]) -> None:
        """Remove the shared-memory files the driver ``pid`` wrote (puts and graph
        data) but never announced: no one else can know of them."""
        for writer in ("put", "g"):
            for path in glob.glob(f"{glob.escape(self.shm_prefix)}{writer}-{pid}-*"):
                if path not in announced:
                    shared_memory.unlink(path)
