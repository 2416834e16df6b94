"""The head's worker processes: starting them, reaping them, replacing them.

Each process's pidfd sits in the head's poll, so a death is noticed at once.  A
dead task worker is replaced, at once or, when workers keep dying before they
finish a task (a crash loop), after a growing backoff; actor processes and extra
workers are never replaced here (the scheduler decides whether they come back).
This module knows processes, not tasks: what a death means for the work is the
head's business.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Iterable

import zmq

from . import settings, shared_memory, store_memory
from .process import pidfd, spawn

#: how long a stopping cluster gives its workers to exit before killing them
STOP_GRACE_SECONDS = 2.0
#: crash-loop deaths in a minute (``WorkerProcesses.crash_loop_death``) whose
#: replacements start at once; past them, each replacement waits (:func:`replacement_delay`)
REPLACEMENTS_AT_ONCE_PER_MINUTE = 10
#: the first delayed replacement waits this long, each next one twice as long
REPLACEMENT_BACKOFF_BASE = 0.1
#: the longest wait, unless dask config ``daskray.worker-replacement-backoff-max`` says
REPLACEMENT_BACKOFF_MAX = 30.0


def replacement_delay(recent_deaths: int, cap: float) -> float:
    """Seconds to wait before replacing a worker, given the crash-loop deaths of
    task workers in the last minute, this one included (a task that kills every
    worker it runs on, retried; workers that cannot start): none for the first
    ``REPLACEMENTS_AT_ONCE_PER_MINUTE``, then doubling from
    ``REPLACEMENT_BACKOFF_BASE``, never more than ``cap``.  A crash loop then
    costs little, and the cluster never stays without workers."""
    excess = recent_deaths - REPLACEMENTS_AT_ONCE_PER_MINUTE
    if excess <= 0:
        return 0.0
    return min(cap, REPLACEMENT_BACKOFF_BASE * 2.0 ** min(excess - 1, 64))


def replacement_backoff_max() -> float:
    """The longest wait before a replacement starts: dask config
    ``daskray.worker-replacement-backoff-max`` (a duration), default 30 s."""
    return settings.duration("daskray.worker-replacement-backoff-max",
                             REPLACEMENT_BACKOFF_MAX, 0, "30s")


#: extra workers per worker when ``daskray.max-extra-workers`` is not set
EXTRA_WORKERS_PER_WORKER = 2


def max_extra_workers(num_workers: int) -> int:
    """How many extra workers may stand in for workers whose tasks wait in get()
    at once: dask config ``daskray.max-extra-workers``, by default
    ``EXTRA_WORKERS_PER_WORKER`` per worker."""
    return settings.whole_number("daskray.max-extra-workers",
                                 EXTRA_WORKERS_PER_WORKER * num_workers, 0, 4)


class WorkerProcesses:
    """The worker processes the head started, by worker id: task workers (one per
    slot ``0..num_workers-1``, whose resources they have), actor processes and
    extra workers; and the replacements waiting out their backoff."""

    def __init__(self, config: dict[str, Any], poller: zmq.Poller) -> None:
        self.config = config
        self.poller = poller
        self.shm_prefix: str = config["shm_prefix"]
        #: >1 stands in for several hosts: worker slot i writes to store namespace
        #: i % n, the driver and the head are in namespace 0
        self.store_namespaces: int = config.get("store_namespaces", 1)
        self.procs: dict[str, subprocess.Popen] = {}
        self.fds: dict[int, str] = {}  # pidfd -> worker id
        self.slot_of: dict[str, int] = {}
        self.next_number = 0
        #: extra workers running, and those of them told to stop
        self.extra: set[str] = set()
        self.retiring: set[str] = set()
        self.actor_of: dict[str, str] = {}  # worker id -> the actor it hosts
        self.worker_of_actor: dict[str, str] = {}  # actor id -> its current process
        #: task workers that finished (or failed) a task: their deaths are no crash loop
        self.proven: set[str] = set()
        #: when crash-loop deaths (crash_loop_death) happened, in the last minute
        self.crash_loop_deaths: list[float] = []
        self.backoff_max = replacement_backoff_max()
        #: replacements waiting out their backoff: (when due, slot), soonest first
        self.pending: list[tuple[float, int]] = []

    def namespace_prefix(self, slot: int) -> str:
        """The file prefix of the store a worker in ``slot`` writes to."""
        if self.store_namespaces == 1:
            return self.shm_prefix
        return store_memory.namespace_prefix(self.shm_prefix, max(slot, 0) % self.store_namespaces)

    # ------------------------------------------------------------------ starting

    def spawn(self, slot: int, actor: str | None = None,
              actor_resources: dict | None = None, max_concurrency: int = 1,
              threaded: bool = False, extra: str | None = None,
              extra_resources: dict | None = None) -> str:
        """Start the worker for ``slot`` (0..num_workers-1: which resources it has),
        or, with ``actor``, the process of that actor, or, with ``extra`` (the id
        the scheduler chose), an extra worker with ``extra_resources`` in the store
        namespace of ``slot``.  Its id."""
        self.next_number += 1
        wid = extra or (f"w{self.next_number}" if actor is None else f"a{self.next_number}")
        self.slot_of[wid] = slot
        if actor is not None:
            self.actor_of[wid] = actor
            self.worker_of_actor[actor] = wid
        if extra is not None:
            self.extra.add(wid)
        proc = spawn("daskray.runtime.start_worker", {
            "actor": actor,
            "max_concurrency": max_concurrency,
            "threaded": threaded,
            "resources": self._resources(slot, actor, actor_resources, extra, extra_resources),
            "worker_id": wid,
            "token": self.config["token"],
            "session_dir": self.config["session_dir"],
            "head_address": self.config["head_address"],
            "shm_prefix": self.namespace_prefix(slot),
            "store_limit": self.config["store_limit"],
        })
        self.procs[wid] = proc
        fd = pidfd(proc.pid)
        if fd is not None:
            self.fds[fd] = wid
            self.poller.register(fd, zmq.POLLIN)
        return wid

    def _resources(self, slot: int, actor: str | None, actor_resources: dict | None,
                   extra: str | None, extra_resources: dict | None) -> dict:
        """What a new process offers: its actor's, its extra worker's, or its slot's."""
        if actor is not None:
            return actor_resources or {}
        if extra is not None:
            return extra_resources or {}
        resources = self.config.get("resources") or []
        return resources[slot] if slot < len(resources) else {}

    # ------------------------------------------------------------------ exits

    def exited(self, ready: Iterable) -> list[str]:
        """The processes whose pidfds are among the poll's ``ready``: they exited."""
        return [self.fds[fd] for fd in ready if fd in self.fds]

    def reap(self, wid: str) -> tuple[subprocess.Popen | None, int | None]:
        """Forget the exited process ``wid``: its pidfd, its exit status, the
        shared-memory files it had written for readers (they die with it).
        Its Popen (None if unknown) and exit status."""
        proc = self.procs.pop(wid, None)
        for fd, w in list(self.fds.items()):
            if w == wid:
                self.poller.unregister(fd)
                os.close(fd)
                del self.fds[fd]
        if proc is None:
            return None, None
        returncode = proc.wait()
        prefix = self.namespace_prefix(self.slot_of.get(wid, 0))
        shared_memory.remove_session(f"{prefix}w-{proc.pid}-")
        return proc, returncode

    def forget_actor_process(self, wid: str) -> str | None:
        """The actor the exited process ``wid`` hosted (None: it hosted none)."""
        actor = self.actor_of.pop(wid, None)
        if actor is not None and self.worker_of_actor.get(actor) == wid:
            del self.worker_of_actor[actor]
        return actor

    def crash_loop_death(self, wid: str, returncode: int | None,
                         running_task: bool | None) -> bool:
        """Whether a task worker's death may be a crash loop's: it had finished
        no task, and either was running one (``running_task``; None: it never
        joined), which may be what kills every worker, or exited on its own before
        it joined (it cannot start).  Workers killed after doing work, while idle,
        or while starting (the OOM killer, a chaos test) are no crash loop."""
        if wid in self.proven:
            self.proven.discard(wid)
            return False
        if running_task is not None:
            return running_task
        return returncode != -signal.SIGKILL

    def replace(self, wid: str, reason: str, crash_loop: bool) -> None:
        """Start the dead task worker's replacement: at once, or, when workers
        keep dying in a crash loop, once its backoff has passed
        (``start_due_replacements``, from the loop's tick).  Work waits for it
        meanwhile."""
        now = time.monotonic()
        self.crash_loop_deaths = [t for t in self.crash_loop_deaths if now - t < 60]
        delay = 0.0
        if crash_loop:
            self.crash_loop_deaths.append(now)
            delay = replacement_delay(len(self.crash_loop_deaths), self.backoff_max)
        slot = self.slot_of.get(wid, 0)
        if delay == 0:
            print(f"daskray: worker {wid} {reason}; starting a replacement", file=sys.stderr)
            self.spawn(slot)
            return
        print(f"daskray: worker {wid} {reason}; workers keep dying before they finish a task "
              f"({len(self.crash_loop_deaths)} in the last minute), so its replacement starts "
              f"in {delay:.1f} s", file=sys.stderr)
        self.pending.append((now + delay, slot))
        self.pending.sort()

    def start_due_replacements(self) -> None:
        """Start the replacements whose backoff has passed."""
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, slot = self.pending.pop(0)
            self.spawn(slot)

    def seconds_to_next_replacement(self) -> float | None:
        """How long until the next waiting replacement is due (None: none waits)."""
        return self.pending[0][0] - time.monotonic() if self.pending else None

    # ------------------------------------------------------------------ stopping

    def kill(self, wid: str) -> None:
        """Kill ``wid`` if it still runs; its exit is noticed through its pidfd."""
        proc = self.procs.get(wid)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def wait_all(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Wait ``grace`` seconds in all for every process to exit; kill the rest."""
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                proc.kill()
                proc.wait()
