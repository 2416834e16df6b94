"""What remote calls print on a dask worker reaches the drivers, prefixed as Ray's.

A dask worker runs its tasks in threads of one process, so its file descriptors
cannot be told apart per task as on daskray's own runtime.  Instead
``sys.stdout`` and ``sys.stderr`` become :class:`_Routed` streams: text written
by a thread running a daskray call is cut into whole lines, prefixed
``(name pid=N)`` and sent as a ``daskray-output`` event (distributed's event log,
what ``distributed.print`` uses), which the drivers that asked
(``init(log_to_driver=True)``) write to their ``sys.stdout`` / ``sys.stderr``.
Other threads write to the worker's streams as before.  Events go to every
daskray driver of the cluster (distributed's events are per topic, not per
client), and what C code writes to the fds is not caught on this backend.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator

from ..runtime.output import prefix

TOPIC = "daskray-output"
#: a call's lines are sent once this much is buffered, or this old
BATCH_CHARS = 64 << 10
BATCH_SECONDS = 0.2

_lock = threading.Lock()
#: the output of the daskray calls running in this process, by thread
_calls: dict[int, "_CallOutput"] = {}


class _CallOutput:
    """One call's text not sent yet: whole lines, and a partial one per stream."""

    def __init__(self, label: str, send: Any) -> None:
        self.prefix = prefix(label, os.getpid())
        self.send_event = send
        self.partial = {1: "", 2: ""}
        self.lines: dict[int, list[str]] = {1: [], 2: []}
        self.size = 0
        self.sent_at = time.monotonic()

    def add(self, stream: int, text: str) -> None:
        pieces = (self.partial[stream] + text).split("\n")
        self.partial[stream] = pieces.pop()
        self.lines[stream].extend(pieces)
        self.size += len(text)
        if self.size >= BATCH_CHARS or time.monotonic() - self.sent_at > BATCH_SECONDS:
            self.send()

    def send(self, final: bool = False) -> None:
        """Send the whole lines (with ``final``, the unfinished ones too)."""
        for stream in (1, 2):
            lines = self.lines[stream]
            if final and self.partial[stream]:
                lines.append(self.partial[stream])
                self.partial[stream] = ""
            if lines:
                self.send_event({"stream": stream,
                                 "text": "".join(f"{self.prefix}{line}\n" for line in lines)})
                self.lines[stream] = []
        self.size = 0
        self.sent_at = time.monotonic()


class _Routed:
    """``sys.stdout`` / ``sys.stderr`` of a dask worker: a daskray call's text is
    collected for the drivers, anyone else's goes to the stream it replaced."""

    def __init__(self, stream: int, original: Any) -> None:
        self._stream = stream
        self._original = original

    def write(self, text: str) -> int:
        call = _calls.get(threading.get_ident())
        if call is None:
            return self._original.write(text)
        call.add(self._stream, text)
        return len(text)

    def flush(self) -> None:
        if threading.get_ident() not in _calls:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty...
        return getattr(self._original, name)


def _install() -> None:
    """Route this process's ``sys.stdout`` and ``sys.stderr`` (once)."""
    with _lock:
        if not isinstance(sys.stdout, _Routed):
            sys.stdout = _Routed(1, sys.stdout)
        if not isinstance(sys.stderr, _Routed):
            sys.stderr = _Routed(2, sys.stderr)


@contextlib.contextmanager
def call_output(label: str) -> Iterator[None]:
    """Around a daskray call on a dask worker: what it prints goes to the drivers,
    its lines prefixed with ``label`` (the function's name)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a worker (the driver's own thread)
        yield
        return
    _install()
    ident = threading.get_ident()
    outer = _calls.get(ident)
    if outer is not None:
        outer.send(final=True)  # a call run inside another's thread
    _calls[ident] = call = _CallOutput(label, lambda msg: worker.log_event(TOPIC, msg))
    try:
        yield
    finally:
        call.send(final=True)
        if outer is None:
            _calls.pop(ident, None)
        else:
            _calls[ident] = outer


def write_event(event: Any) -> None:
    """The driver's handler of ``daskray-output`` events: the text to this process's
    ``sys.stdout`` or ``sys.stderr``, as they are now."""
    _, msg = event
    if not isinstance(msg, dict) or not isinstance(msg.get("text"), str):
        return
    target = sys.stdout if msg.get("stream") == 1 else sys.stderr
    try:
        target.write(msg["text"])
        target.flush()
    except (OSError, ValueError):
        pass
