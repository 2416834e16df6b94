"""The driver's side of the cluster: submit graphs, receive their results.

::

    user threads ──submit (lock-guarded list + wake-up pipe)──> I/O thread ──DEALER──> head
    user threads <──per-graph SimpleQueue── I/O thread <── results, errors, notices

One I/O thread owns the socket to the head (ZeroMQ sockets are not thread-safe);
any number of user threads may run graphs at once, each waiting on its own
queue.  What the user threads queue while the I/O thread is busy leaves as one
:class:`~.protocol.Batch`, and the head answers a loop turn's results in one:
a burst of calls costs a few wake-ups of each process, not one per call.  The
I/O thread also owns the links to actors' processes that take calls straight
(``send_direct``, see :mod:`.session`; plain Unix sockets, :mod:`.direct_link`):
their replies are filed like the head's.  Large
results are fetched by the waiting thread straight from the worker that holds
them.  If the head process dies, every waiting graph fails with
:class:`~daskray.errors.ClusterError` instead of hanging.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Any, Callable

import zmq

from ..errors import ClusterError
from ..refs import tracker
from . import protocol as P
from .direct_link import DirectLink
from . import transport
from .process import pidfd
from .serialization import frames_nbytes
from .fetch import fetch_object
from .output import write_output

FETCH_TIMEOUT_MS = 60_000
#: messages for the head that nobody waits on (the registrations of calls sent
#: straight to actors, ref changes) wait at most this long for company: a loop of
#: direct calls then costs the head one message per few calls, not two per call
LAZY_SECONDS = 0.005
#: ... and at most this many of them
LAZY_COUNT = 256
#: the I/O thread looks for ref changes every 50 ms until this long after its last
#: wake-up, and is woken for them after that
ACTIVE_SECONDS = 1.0
#: calls remembered per actor process before those already answered are let go
SENT_KEPT = 10_000
#: poll flags as plain ints (operators on pyzmq's flag enums cost microseconds)
_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)


class _Lazy(bytes):
    """An encoded message for the head that may wait (see ``LAZY_SECONDS``)."""


def _call_bytes(call: tuple) -> int:
    """About how many bytes a direct call ``(ref, table_id, table, body)`` takes."""
    return len(call[3]) + (len(call[2]) if call[2] is not None else 0) + 64
#: what threads still waiting for results are told when this process shuts down
SHUT_DOWN = ("daskray.shutdown() was called while this was waiting: the connection to the "
             "cluster is closed. Call daskray.init() again to run more work")


class Client:
    """A connection from this process to a cluster's head."""

    def __init__(self, head_address: str, token: bytes, head_pid: int | None = None,
                 log_to_driver: bool = True) -> None:
        self.token = token
        self.ctx = zmq.Context()
        self._graph_numbers = itertools.count(1)
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        #: encoded messages for the head, in the order sent; the I/O thread takes them
        self._outgoing: list = []
        #: when the I/O thread started holding back lazy messages (None: it holds none)
        self._held_since: float | None = None
        #: how many held-back messages lead ``_outgoing`` (new ones must wake the thread)
        self._held = 0
        self.client_id = b"c" + os.urandom(7)
        self._head = transport.dealer(self.ctx, head_address, token, identity=self.client_id)
        self._head_pid = head_pid
        #: what is known of ObjectRefs: {ref key: RefResult}, filed by the I/O thread
        self.results: dict = {}
        self._results_changed = threading.Condition()
        self._next_store = 0
        #: where this process may write shared-memory segments (None: it may not)
        self.shm_prefix: str | None = None
        self._welcome: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: dict[str, str] = {}
        #: data-server addresses of workers that left: a read from one fails at once
        self.lost_workers: set[str] = set()
        self.closed = False
        self.failure: str | None = None
        # ref changes and messages to send wake the I/O thread through a pipe: a
        # write to it is safe from any thread and from a finalizer, where a zmq
        # socket or a lock is not
        self._ref_wake_r, self._ref_wake_w = os.pipe()
        os.set_blocking(self._ref_wake_r, False)
        os.set_blocking(self._ref_wake_w, False)
        #: whether the I/O thread may sleep long (see ``wake_for_refs``)
        self._sleeping_long = False
        #: ms to keep sending queued messages after close (see AttachedCluster)
        self.linger_ms = 0
        #: sockets to actors' processes taking calls straight, by address (I/O thread's)
        self._direct: dict[str, DirectLink] = {}
        #: addresses with calls queued for the I/O thread (a user thread then queues too)
        self._direct_queued: set[str] = set()
        #: links a user thread wrote to that hold unsent bytes or died (the I/O thread's)
        self._links_to_check: set[str] = set()
        #: calls sent to each address whose reply has not come: {address: {ref key: None}}
        self._direct_sent: dict[str, dict] = {}
        #: addresses whose sockets the I/O thread is to close
        self._direct_closing: list[str] = []
        #: actors whose process the head said is gone (see ActorMoved): read by the session
        self.moved_actors: set[str] = set()
        #: refs whose results are filed though this process holds no ObjectRef to
        #: them (the session's questions to actors, see session._Channel)
        self.watched: set = set()
        # the head watches the pid of a driver that joins a cluster it did not start
        self._head.send_multipart(P.hello_frames(token, P.ROLE_CLIENT, f"driver:{os.getpid()}"))
        if log_to_driver:  # what tasks print is written to this process's stdout/stderr
            self._head.send(P.encode(P.SubscribeOutput()))
        self._thread = threading.Thread(target=self._io_loop, name="daskray-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """Block until the head says all its workers are up; their addresses."""
        try:
            msg = self._welcome.get(timeout=timeout)
        except queue.Empty:
            raise ClusterError(
                f"the daskray cluster did not start within {timeout:.0f} s"
            ) from None
        if isinstance(msg, Exception):
            raise msg
        self.workers = dict(msg.workers)
        return self.workers

    def next_number(self) -> int:
        return next(self._graph_numbers)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None,
                 awaits: Any = None) -> bool:
        """Block until ``predicate()`` holds (checked as results arrive) or timeout.
        ``awaits`` (what is waited for) matters only inside a worker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._results_changed:
            while not predicate():
                if self.failure is not None:
                    raise ClusterError(self.failure)
                remaining = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if remaining <= 0:
                    return False
                self._results_changed.wait(remaining)
        return True

    def store_large(self, key: str, frames: list) -> str:
        """Store a large ``put`` value on a worker; that worker's id."""
        return self.store_many({key: frames})[key]

    def store_many(self, objects: dict[str, list]) -> dict[str, str]:
        """Store large objects on the workers, spread by bytes: {key: worker id}.

        All are sent at once, then every acknowledgement is awaited; the frames
        go without a copy (the worker keeps them as they arrive).
        """
        workers = sorted(self.workers)
        if not workers:
            raise ClusterError("no worker is running to hold the objects")
        start = self._next_store % len(workers)  # ties go round the workers
        load = {wid: 0 for wid in workers[start:] + workers[:start]}
        socks = {}
        placed: dict[str, str] = {}
        try:
            for key, frames in sorted(objects.items(), key=lambda kv: -frames_nbytes(kv[1])):
                wid = min(load, key=load.__getitem__)
                load[wid] += frames_nbytes(frames)
                sock = socks.get(wid)
                if sock is None:
                    sock = socks[wid] = transport.dealer(self.ctx, self.workers[wid], self.token)
                layout, pieces = transport.split_buffers(frames)
                sock.send_multipart([self.token, P.PUT, key.encode(), layout, *pieces], copy=False)
                placed[key] = wid
            self._next_store += 1
            pending = {wid: sum(1 for w in placed.values() if w == wid) for wid in socks}
            for wid, sock in socks.items():
                for _ in range(pending[wid]):
                    if not sock.poll(FETCH_TIMEOUT_MS) or sock.recv() != P.OK:
                        raise ClusterError(f"worker {wid} did not store an object sent to it")
        finally:
            for sock in socks.values():
                sock.close(0)
        return placed

    def new_graph(self) -> tuple[int, queue.SimpleQueue]:
        """A fresh graph number and the queue its messages will arrive on."""
        number = next(self._graph_numbers)
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self.failure is not None:
                raise ClusterError(self.failure)
            self._queues[number] = q
        return number, q

    def send(self, msg: Any) -> None:
        """Queue ``msg`` for the head; the I/O thread sends it, in order.

        Only the first message queued while the I/O thread is busy wakes it: a burst
        of calls costs one wake-up, not one thread switch per message."""
        data = P.encode(msg)
        with self._lock:
            if self.closed:
                raise ClusterError("the daskray client is closed; call daskray.init() first")
            self._outgoing.append(data)
            first = len(self._outgoing) - self._held == 1
        if first:
            transport.poke(self._ref_wake_w)

    def send_direct(self, address: str, msg: Any, then: Any = None) -> None:
        """Send ``msg`` to the actor's process at ``address`` (its direct socket),
        and queue ``then`` (if given) for the head.  The calling thread writes the
        call itself when the I/O thread has connected to that process and holds
        nothing more for it, and the process has answered since the last call
        (one call waiting on the one before skips a thread hand-off); else the I/O
        thread sends it, after what it holds for that process (each destination's
        messages stay in order)."""
        after = None if then is None else P.encode(then)
        call = (msg.ref, msg.table_id, msg.table, msg.body)  # encoded with the others
        with self._lock:
            if self.closed:
                raise ClusterError("the daskray client is closed; call daskray.init() first")
            link = self._direct.get(address)
            # straight only while the process has answered since the last call: a
            # burst of calls goes through the I/O thread, a few messages, not one each
            straight = link is not None and link.connected and link.answered \
                and address not in self._direct_queued
            if link is not None:
                link.answered = False
            sent = self._direct_sent.setdefault(address, {})
            sent[msg.ref] = None
            if len(sent) > SENT_KEPT:  # calls whose outcome the head told (not a reply)
                self._direct_sent[address] = sent = {
                    k: None for k in sent if k in tracker.counts and k not in self.results}
            if not straight:
                self._outgoing.append((address, call))
                self._direct_queued.add(address)
            if after is not None:
                self._outgoing.append(_Lazy(after))
            added = (not straight) + (after is not None)
            # a lazy registration alone wakes the I/O thread only if it holds nothing
            # yet: else its clock is running, and it sends it with the others
            first = len(self._outgoing) == 1 if straight else \
                len(self._outgoing) - self._held <= added
        if straight:
            link.send(P.encode(P.DirectCalls([call])))
            if link.dead or link.wants_write():  # the I/O thread watches or drops it
                with self._lock:
                    self._links_to_check.add(address)
                first = True
        if first:
            transport.poke(self._ref_wake_w)

    def close_direct(self, address: str) -> None:
        """Have the I/O thread close its socket to ``address`` (the process is gone)."""
        with self._lock:
            self._direct_closing.append(address)

    def forget(self, number: int) -> None:
        with self._lock:
            self._queues.pop(number, None)

    def fetch(self, address: str, object_id: int) -> Any:
        """Read an object straight from the worker holding it."""
        sock = transport.dealer(self.ctx, address, self.token)
        try:
            return fetch_object(sock, self.token, object_id, FETCH_TIMEOUT_MS, shared=True,
                                holder_lost=lambda: address in self.lost_workers)
        finally:
            sock.close(0)

    def close(self) -> None:
        """Disconnect from the head.  Threads still waiting for results (in ``get``,
        ``wait`` or a dask compute) raise :class:`ClusterError` instead of waiting
        forever for a connection that is gone."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        transport.poke(self._ref_wake_w)  # the I/O thread sends what is queued, then exits
        self._thread.join(5)
        # the tracker's wake hook was cleared before close; a late caller writes to -1
        fd, self._ref_wake_w = self._ref_wake_w, -1
        os.close(fd)
        if not self._thread.is_alive():  # else a socket is still open and term() would block
            self.ctx.term()
        self.fail_waiters(SHUT_DOWN)

    def fail_waiters(self, reason: str) -> None:
        """Make every thread waiting for results raise :class:`ClusterError` with
        ``reason``, and any later wait too; a failure already known stands."""
        if self.failure is None:
            self._fail_all(reason)

    # ------------------------------------------------------------------ I/O thread

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._head, zmq.POLLIN)
        poller.register(self._ref_wake_r, zmq.POLLIN)
        head_fd = pidfd(self._head_pid) if self._head_pid else None
        if head_fd is not None:
            poller.register(head_fd, zmq.POLLIN)
        watched_fd = head_fd  # closed when the loop ends, watched or not
        try:
            active_at = 0.0
            while True:
                connecting = self._connect_links(poller)
                # set before looking for ref changes: one recorded after the look
                # then sees it and wakes this thread (see ``wake_for_refs``)
                self._sleeping_long = time.monotonic() - active_at > ACTIVE_SECONDS
                timeout = 50 if tracker.has_changes() or not self._sleeping_long else 1000
                if connecting:  # a link waits for room in its actor's listen queue
                    timeout = min(timeout, 10)
                if self._held_since is not None:
                    left = self._held_since + LAZY_SECONDS - time.monotonic()
                    timeout = max(0, min(timeout, int(left * 1000) + 1))
                ready = dict(poller.poll(timeout))
                if ready:
                    active_at = time.monotonic()
                # the links polled (by fd) before this turn closes or makes any: a
                # new link may take a closed one's fd, never its events
                polled = [(link, ready.get(link.fileno())) for link in self._direct.values()
                          if link.registered]
                if self._ref_wake_r in ready:
                    transport.drain_pipe(self._ref_wake_r)
                hold = self._hold_lazy()
                # taken before taking the queue below: a drop recorded after a
                # submission that pins the same ref is then sent after it
                added, dropped = ([], []) if hold else tracker.take_changes()
                with self._lock:
                    outgoing, self._outgoing = self._outgoing, []
                    self._held = 0
                    closing = self.closed
                    gone, self._direct_closing = self._direct_closing, []
                    check, self._links_to_check = self._links_to_check, set()
                if gone:
                    self._close_direct(gone, poller)
                for address in check:
                    link = self._direct.get(address)
                    if link is not None:
                        self._after_io(address, link, poller)
                if any(type(item) is tuple for item in outgoing):
                    outgoing = self._send_direct(outgoing, poller)
                    with self._lock:  # written: user threads may write to them now
                        self._direct_queued = {item[0] for item in self._outgoing
                                               if type(item) is tuple}
                if hold and not closing:
                    with self._lock:  # back in front of what came meanwhile, in order
                        self._outgoing[:0] = outgoing
                        self._held = len(outgoing)
                    outgoing = []
                else:
                    self._held_since = None
                if added or dropped:
                    outgoing.append(P.encode(P.RefsUpdate(added, dropped)))
                for data in P.batches(outgoing):
                    transport.send_message(self._head, data)
                if closing:
                    return
                if self._head in ready:
                    # asking first: a recv that finds nothing raises zmq.Again, which
                    # costs five times as much
                    while self._head.get(zmq.EVENTS) & zmq.POLLIN:
                        try:
                            frame = self._head.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._deliver(frame)
                if len(ready) > 1 or self._head not in ready:
                    for link, events in polled:
                        if events and not link.dead:
                            self._serve_link(link, events, poller)
                if head_fd is not None and head_fd in ready:
                    self.fail_waiters("the daskray head process died; the cluster is gone. "
                                   "Call daskray.shutdown() and daskray.init() to start a new one.")
                    poller.unregister(head_fd)
                    head_fd = None
        finally:
            self._close_direct(list(self._direct), poller, ending=True)
            self._head.close(self.linger_ms)
            os.close(self._ref_wake_r)
            if watched_fd is not None:
                os.close(watched_fd)

    def _hold_lazy(self) -> bool:
        """Whether to hold back what waits for the head: only lazy messages (and
        ref changes), not for long, not many.  Starts the clock when it holds."""
        with self._lock:
            queued = [m for m in self._outgoing if type(m) is not tuple]
            if not queued or self.closed or any(type(m) is not _Lazy for m in queued) \
                    or len(queued) >= LAZY_COUNT:
                return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since < LAZY_SECONDS

    def _send_direct(self, outgoing: list, poller: zmq.Poller) -> list:
        """Send the messages for actors' processes (batched per process); what is
        left is for the head, in order."""
        to_head: list = []
        direct: dict[str, list] = {}
        for item in outgoing:
            if type(item) is tuple:
                direct.setdefault(item[0], []).append(item[1])
            else:
                to_head.append(item)
        for address, calls in direct.items():
            link = self._direct.get(address)
            if link is None:
                link = self._direct[address] = DirectLink(address, self.token)
                if link.dead:  # the process is gone: the head says what became of the calls
                    del self._direct[address]
                    link.close()
                    continue
            for group in P.direct_batches(calls, _call_bytes):
                link.send(P.encode(P.DirectCalls(group)))
            self._after_io(address, link, poller)
        return to_head

    def _connect_links(self, poller: zmq.Poller) -> bool:
        """Try again to connect the links a full listen queue turned away; whether
        any still waits."""
        waiting = False
        for address, link in list(self._direct.items()):
            if not link.connected:
                link.connect()
                self._after_io(address, link, poller)
                waiting = waiting or not (link.connected or link.dead)
        return waiting

    def _after_io(self, address: str, link: DirectLink, poller: zmq.Poller) -> None:
        """Drop a link that died; watch a connected one (an unconnected socket polls as
        hung up), for room to write too while it holds unsent bytes."""
        if link.dead:
            self._close_direct([address], poller)
            return
        if not link.connected:
            return
        if not link.registered:
            link.registered = True
            poller.register(link.fileno(), _POLLIN)
        if link.wants_write() != link.watched_for_writing:
            link.watched_for_writing = not link.watched_for_writing
            poller.modify(link.fileno(), _POLLIN | (_POLLOUT if link.watched_for_writing else 0))

    def _close_direct(self, addresses: list, poller: zmq.Poller, ending: bool = False) -> None:
        """Close the links to ``addresses`` (their processes are gone, or the session
        stopped using them).  Replies already in are filed first; the head is asked for
        the outcomes of the calls sent there that no reply told: a reply still on its
        way is lost with the link, and the head, told the process replied, would not
        tell the caller unasked."""
        for address in addresses:
            link = self._direct.pop(address, None)
            if link is None:
                continue
            if link.registered and not link.dead:
                self._file_replies(link)
            if link.registered:
                poller.unregister(link.fileno())
            link.close()
            with self._lock:  # user threads add to it under the lock
                sent = self._direct_sent.pop(address, None)
            if sent and not ending:
                counts, results = tracker.counts, self.results
                ask = [k for k in sent if k in counts and k not in results]
                if ask:  # after the registrations queued before it
                    with self._lock:
                        self._outgoing.append(P.encode(P.SubscribeRefs(ask)))
                    transport.poke(self._ref_wake_w)

    def _serve_link(self, link: DirectLink, events: int, poller: zmq.Poller) -> None:
        """Write what waited on ``link``; file the replies its process sent
        (RefResults only), all that came at once: the waiting threads are woken once."""
        address = link.address
        if events & _POLLOUT:
            link.flush()
        if events & (_POLLIN | _POLLERR):
            self._file_replies(link)
        self._after_io(address, link, poller)

    def _file_replies(self, link: DirectLink) -> None:
        filed = []
        counts = tracker.counts
        for data in link.receive():
            try:
                msg = P.decode(data)
                if type(msg) is not P.DirectResults or type(msg.results) is not list:
                    continue
                items = [P.RefResult(*r) for r in msg.results
                         if type(r) is tuple and len(r) == 7]
            except (P.ProtocolError, TypeError):
                continue
            with self._lock:  # user threads add to it under the lock
                sent = self._direct_sent.get(link.address, {})
                for m in items:
                    sent.pop(m.ref, None)
            filed.extend(m for m in items if m.ref in counts)
            link.answered = True
        if filed:
            with self._results_changed:
                results = self.results
                for msg in filed:
                    results[msg.ref] = msg
                self._results_changed.notify_all()

    def _deliver(self, frame: zmq.Frame) -> None:
        try:
            msg = P.decode(frame.buffer)
            if type(msg) is P.Batch:
                for data in P.batch_items(msg):
                    self._deliver_one(P.decode_batched(data))
                return
        except P.ProtocolError:
            return
        self._deliver_one(msg)

    def _deliver_one(self, msg: Any) -> None:
        t = type(msg)
        if t is P.WorkerOutput:
            written = write_output(msg.blocks)
            self._head.send(P.encode(P.OutputAck(written)))
        elif t is P.Welcome:
            self._welcome.put(msg)
        elif t is P.WorkersChanged:
            new = dict(msg.workers)
            self.lost_workers.update(set(self.workers.values()) - set(new.values()))
            self.workers = new
        elif t is P.RefResult:
            if msg.ref in tracker.counts or msg.ref in self.watched:
                with self._results_changed:
                    self.results[msg.ref] = msg
                    self._results_changed.notify_all()
        elif t is P.ActorReply or t is P.ResourcesReply or t is P.StateSizesReply \
                or t is P.ActorNames or t is P.TimelineReply:
            with self._results_changed:
                self.results[("reply", msg.request)] = msg
                self._results_changed.notify_all()
        elif t is P.ActorMoved:
            with self._results_changed:
                self.moved_actors.add(msg.actor)
        elif t is P.Rejected and msg.graph is not None:
            self._fail_graph(msg.graph, f"the head rejected graph {msg.graph}: {msg.reason}")
        elif t is P.Rejected:
            self._fail_all(f"the head rejected a message: {msg.reason}")
        else:
            q = self._queues.get(msg.graph)
            if q is not None:
                q.put(msg)

    def _fail_graph(self, number: Any, reason: str) -> None:
        """One submitted graph was refused: its waiter, or its refs, get the error."""
        q = self._queues.get(number)
        if q is not None:
            q.put(ClusterError(reason))
        keys = tracker.held_of_graph(self.client_id, number)
        with self._results_changed:
            for key in keys:
                self.results[key] = P.RefResult(key, None, None, 0, None, "ClusterError", reason)
            self._results_changed.notify_all()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self.failure = reason
            queues = list(self._queues.values())
        error = ClusterError(reason)
        self._welcome.put(error)
        for q in queues:
            q.put(error)
        with self._results_changed:
            self._results_changed.notify_all()

    def wake_for_refs(self) -> None:
        """Have the I/O thread send the ref changes soon (any thread, any context):
        a poke only if it may be sleeping long.  While the process keeps it busy it
        looks every 50 ms anyway, and a wake-up per dropped ref would cost each
        call a thread switch."""
        if self._sleeping_long:
            transport.poke(self._ref_wake_w)  # a closed pipe (-1) fails quietly too
