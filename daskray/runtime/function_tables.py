"""The head's cache of function tables: the cloudpickled functions of graphs.

A graph message carries its function table and the table's content hash; the head
keeps one copy per hash for as long as a graph uses it, and sends each worker a
table once, with the first task of it the worker runs.  When the last graph using
a table is forgotten, the workers that have it are told to forget it too.
"""

from __future__ import annotations

from typing import Any

from . import protocol as P
from .serialization import table_id as content_id


class FunctionTables:
    """Tables by id, the graphs using each, and which worker has which."""

    def __init__(self) -> None:
        self.tables: dict[bytes, bytes] = {}  # table id -> cloudpickled function table
        self.users: dict[bytes, int] = {}  # table id -> live graphs using it
        self.of_graph: dict[Any, bytes] = {}  # graph id -> its table id
        self.sent: dict[str, set[bytes]] = {}  # worker id -> table ids it has

    def add(self, graph: Any, table_id: bytes, table: Any) -> None:
        """Keep ``graph``'s table (once per id, however many graphs name it).
        ProtocolError if a new table does not match its id."""
        if table_id not in self.tables:
            if type(table) is not bytes or content_id(table) != table_id:
                raise P.ProtocolError("graph message: the function table does not match its id")
            self.tables[table_id] = table
        self.users[table_id] = self.users.get(table_id, 0) + 1
        self.of_graph[graph] = table_id

    def for_run(self, worker: str, graph: Any) -> tuple[bytes, bytes | None]:
        """The id of ``graph``'s table, and the table itself if ``worker`` has not
        been sent it yet (it is then taken as sent)."""
        table_id = self.of_graph[graph]
        sent = self.sent[worker]
        if table_id in sent:
            return table_id, None
        sent.add(table_id)
        return table_id, self.tables[table_id]

    def forget_graph(self, graph: Any) -> tuple[bytes | None, list[str]]:
        """``graph`` is gone.  The id of its table if no graph uses it any more
        (else None), and the workers that have that table: they may forget it."""
        table_id = self.of_graph.pop(graph, None)
        if table_id is None:
            return None, []
        self.users[table_id] -= 1
        if self.users[table_id] > 0:
            return None, []
        del self.users[table_id]
        del self.tables[table_id]
        holders = [wid for wid, sent in self.sent.items() if table_id in sent]
        for wid in holders:
            self.sent[wid].discard(table_id)
        return table_id, holders

    def worker_joined(self, worker: str) -> None:
        self.sent[worker] = set()

    def worker_gone(self, worker: str) -> None:
        self.sent.pop(worker, None)

    def sizes(self) -> dict[str, int]:
        """What a finished workload must not leave behind."""
        return {"function tables": len(self.tables), "graph tables": len(self.of_graph)}
