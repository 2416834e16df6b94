"""What the head sends, gathered per destination over one loop turn and sent at its end.

Tasks for a worker go out as one ``Run`` per turn; objects to free as one ``Free``,
after the Runs (a Run stores the inline inputs it carries, even of a task then
dropped); any other message to a worker goes after the Runs queued before it, so
the worker sees everything in the order the scheduler decided.  The results a
driver hears of in one turn go to it as one ``Batch``.
"""

from __future__ import annotations

from typing import Any, Container, Mapping

import zmq

from . import protocol as P
from . import transport


class Outbox:
    """Per-destination batches for one loop turn, and the socket they leave by."""

    def __init__(self, sock: zmq.Socket, log: transport.ThrottledLog) -> None:
        self.sock = sock
        self.log = log
        self.runs: dict[str, list] = {}
        self.run_tables: dict[str, dict] = {}
        self.worker_out: dict[str, list] = {}
        self.client_out: dict[bytes, list] = {}
        self.frees: dict[str, list] = {}  # worker id -> objects to free

    def run(self, worker: str, item: Any, table_id: bytes, table: bytes | None) -> None:
        """Queue a task for ``worker``, with its function table if it lacks it."""
        if table is not None:
            self.run_tables.setdefault(worker, {})[table_id] = table
        self.runs.setdefault(worker, []).append(item)

    def free(self, worker: str, objects: Any) -> None:
        self.frees.setdefault(worker, []).extend(objects)

    def to_worker(self, worker: str, msg: Any) -> None:
        """Queue ``msg`` for ``worker``, after the tasks queued for it so far."""
        self._flush_runs(worker)
        self.worker_out.setdefault(worker, []).append(msg)

    def to_client(self, ident: bytes, msg: Any) -> None:
        """Queue ``msg`` for the driver, or the task's calls in a worker, ``ident``."""
        self.client_out.setdefault(ident, []).append(msg)

    def drop_worker(self, worker: str) -> None:
        """Forget what this loop turn would have sent to ``worker`` (it is gone or
        retiring: nothing may reach it any more)."""
        self.runs.pop(worker, None)
        self.run_tables.pop(worker, None)
        self.worker_out.pop(worker, None)
        self.frees.pop(worker, None)

    def drop_client(self, ident: bytes) -> None:
        self.client_out.pop(ident, None)

    def _flush_runs(self, worker: str) -> None:
        items = self.runs.pop(worker, None)
        if items:
            tables = self.run_tables.pop(worker, {})
            self.worker_out.setdefault(worker, []).append(P.Run(items, tables))

    def send(self, ident: bytes, msg: Any) -> None:
        """Send ``msg`` to the peer ``ident`` now."""
        self.send_encoded(ident, P.encode(msg))

    def send_encoded(self, ident: bytes, data: bytes) -> None:
        """Send the encoded message ``data`` to the peer ``ident`` now."""
        try:
            self.sock.send_multipart([ident, data], copy=False)
        except zmq.ZMQError as exc:  # the peer is gone; its loss is handled elsewhere
            self.log.write("could not send to a peer that left", f"{ident!r}: {exc}")

    def flush(self, live_workers: Container[str], retiring: Container[str],
              peers: Mapping[bytes, tuple]) -> None:
        """Send the loop turn's batches: to the ``live_workers`` but those
        ``retiring`` (they are idle and may close their socket any moment), and to
        the clients still among the ``peers`` ({identity: (role, name)}); the
        results for a driver go in batches."""
        for worker in list(self.runs):
            self._flush_runs(worker)
        for worker, objects in self.frees.items():  # last: a Run may carry one inline
            if worker in live_workers:
                self.worker_out.setdefault(worker, []).append(P.Free(tuple(objects)))
        self.frees = {}
        for worker, msgs in self.worker_out.items():
            if worker in retiring:
                continue
            ident = worker.encode()
            for msg in msgs:
                self.send(ident, msg)
        self.worker_out = {}
        for ident, msgs in self.client_out.items():
            peer = peers.get(ident)
            if peer is None:
                continue  # a driver that left: nothing can reach it
            if retiring and ident.decode(errors="replace") in retiring:
                continue  # a task on a retiring extra worker called: it has ended
            if peer[0] == P.ROLE_CLIENT and len(msgs) > 1:
                self._send_batched_results(ident, msgs)
            else:
                for msg in msgs:
                    self.send(ident, msg)
        self.client_out = {}

    def _send_batched_results(self, ident: bytes, msgs: list) -> None:
        """Send ``msgs`` to the driver ``ident`` in order, each run of results
        (``RefResult``) as one :class:`~.protocol.Batch`; any other message alone."""
        results: list = []
        for msg in msgs:
            if type(msg) is P.RefResult:
                results.append(P.encode(msg))
                continue
            for data in P.batches(results):
                self.send_encoded(ident, data)
            results = []
            self.send(ident, msg)
        for data in P.batches(results):
            self.send_encoded(ident, data)
