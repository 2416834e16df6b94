"""The head's part in forwarding what tasks print: to the driver whose work it is.

A block of lines goes to the driver that submitted the task (up the nesting: a
task's own calls count as its driver's); blocks of a task the head no longer
knows, and of an actor's concurrent calls, go to every driver that asked.  Only
drivers that asked (``SubscribeOutput``, ``init(log_to_driver=True)``) get any.

Memory is bounded by dropping: each driver may have ``MAX_UNACKED_BYTES`` sent
and not yet written (it acknowledges what it wrote, ``OutputAck``); past that
lines are dropped and counted, and a ``[N lines dropped]`` notice goes with the
next block that fits.
"""

from __future__ import annotations

from typing import Any, Callable

from . import protocol as P

#: output a driver may have on its way, sent and not acknowledged
MAX_UNACKED_BYTES = 16 << 20


class OutputRouter:
    """Which drivers want output, and how much each has not written yet."""

    def __init__(self, send: Callable[[bytes, Any], None],
                 driver_of: Callable[[int], bytes | None]) -> None:
        self.send = send
        self.driver_of = driver_of
        #: {driver: [bytes unacknowledged, lines dropped]}
        self.subscribers: dict[bytes, list[int]] = {}

    def subscribe(self, ident: bytes) -> None:
        self.subscribers.setdefault(ident, [0, 0])

    def forget(self, ident: bytes) -> None:
        self.subscribers.pop(ident, None)

    def ack(self, ident: bytes, nbytes: int) -> None:
        credit = self.subscribers.get(ident)
        if credit is not None:
            credit[0] = max(0, credit[0] - int(nbytes))

    def forward(self, blocks: list) -> None:
        """Send a worker's blocks ``(task, stream, text)`` to the drivers they are for."""
        if not self.subscribers:
            return
        out: dict[bytes, list] = {}
        for task, stream, text in blocks:
            if not isinstance(text, str) or stream not in (1, 2):
                raise P.ProtocolError(f"a block of output must be (task, 1 or 2, text), "
                                      f"got ({task!r}, {stream!r}, {type(text).__name__})")
            driver = self.driver_of(task) if task is not None else None
            targets = [driver] if driver in self.subscribers else \
                list(self.subscribers) if driver is None else []
            for ident in targets:
                self._admit(ident, out, stream, text)
        for ident, kept in out.items():
            self.send(ident, P.WorkerOutput(kept))

    def _admit(self, ident: bytes, out: dict, stream: int, text: str) -> None:
        """Queue ``text`` for ``ident`` if its allowance has room, else count it dropped."""
        credit = self.subscribers[ident]
        if credit[0] + len(text) > MAX_UNACKED_BYTES:
            credit[1] += text.count("\n")
            return
        kept = out.setdefault(ident, [])
        if credit[1]:
            notice = (f"(daskray) [{credit[1]} lines of worker output dropped: this driver "
                      "did not write them as fast as the workers printed]\n")
            kept.append((None, 2, notice))
            credit[0] += len(notice)
            credit[1] = 0
        kept.append((None, stream, text))
        credit[0] += len(text)


def driver_of_task(tasks: dict, task: int) -> bytes | None:
    """The driver whose work ``task`` is (``tasks``: the scheduler's TaskStates):
    its graph's client, or for a task's own calls, that task's driver, up the
    nesting; None if the head no longer knows the task."""
    ts = tasks.get(task)
    while ts is not None:
        if ts.graph.parent is None:
            return ts.graph.id[0]
        ts = tasks.get(ts.graph.parent)
    return None
