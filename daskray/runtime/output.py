"""What tasks print, captured in the worker and written by the driver, as Ray does.

::

    task ──print / C write──> fd 1, fd 2 (pipes) ──output thread──> head ──> driver
                                                   whole lines,        sys.stdout /
                                                   "(name pid=N) "     sys.stderr

The worker's fds 1 and 2 are pipes, so output written by C code is caught as
well as Python's.  One thread reads both, cuts the bytes into whole lines and
sends them, prefixed ``(task_name pid=N)`` (an actor's class name for an
actor), to the head over a socket of its own (ZeroMQ sockets are not
thread-safe; the main thread's stays its own).  Which task a line belongs to is
known without a race: the reader labels what it reads under a lock the main
thread takes to switch tasks, and output still in a pipe when a task ends is
followed by an end marker that carries the ended task's label (Ray's log files
carry such markers too).  A line the task left without its newline is sent
when the task ends.

Memory is bounded by dropping: past ``MAX_PENDING_BYTES`` unsent, lines are
dropped and counted, and a ``[N lines dropped]`` notice goes in their place,
so a task printing without end never blocks nor grows the worker.
"""

from __future__ import annotations

import array
import faulthandler
import fcntl
import os
import sys
import termios
import threading
from collections import deque
from typing import Callable, TextIO, Union

import zmq

from . import protocol as P
from . import transport

#: ends what a task left in a pipe (never printed: NUL bytes do not occur in text)
MARKER = b"\x00daskray-task-end\x00"
#: unsent output a worker keeps before it drops lines
MAX_PENDING_BYTES = 4 << 20
#: a message to the head carries at most about this much
BATCH_BYTES = 256 << 10
#: a "line" that never ends is cut at this length
MAX_LINE_BYTES = 1 << 20
#: messages the worker's output socket queues before the thread holds back
SEND_HWM = 64
READ_BYTES = 1 << 16


def task_label(key: object) -> str:
    """A task's name without the numbers and hashes of its key, as dask's
    ``key_split``: ``"f-12"`` -> ``"f"``, ``("inc-5f3a...", 0)`` -> ``"inc"``."""
    if isinstance(key, tuple) and key:
        key = key[0]
    if isinstance(key, bytes):
        key = key.decode(errors="replace")
    words = str(key).split("-")
    while len(words) > 1 and (words[-1].isdigit() or (
            len(words[-1]) >= 8 and all(c in "0123456789abcdef" for c in words[-1]))):
        words.pop()
    return "-".join(words)


def actor_label(key: object) -> str:
    """An actor's calls are named by its class: ``"Counter.add"`` -> ``"Counter"``."""
    return task_label(key).split(".")[0]


#: a task's label, or what makes it when a line of the task's is first filed: most
#: tasks print nothing, and naming every task costs more than running a tiny one
Label = Union[str, Callable[[], str]]


def prefix(label: str, pid: int) -> str:
    """Ray's prefix of a worker's line: ``(name pid=N) ``."""
    return f"({label} pid={pid}) "


class OutputCapture:
    """A worker's fds 1 and 2 as pipes, and the thread that forwards their lines."""

    def __init__(self, ctx: zmq.Context, head_address: str, token: bytes,
                 worker_id: str) -> None:
        self.pid = os.getpid()
        self.sock = transport.dealer(ctx, head_address, token, identity=f"{worker_id}/output")
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.send_multipart(P.hello_frames(token, P.ROLE_WORKER, f"{worker_id}/output"))
        #: guards the labels and the pipes' partial lines (see the module)
        self.lock = threading.Lock()
        #: (task id, label) of what runs now
        self.current: tuple[int | None, Label] = (None, "worker")
        #: what runs again once the switch back left for later is made (task_ended)
        self._back_to: tuple[int | None, Label] | None = None
        #: per stream: (task id, label) of ended tasks whose end marker is in the pipe
        self.ended: dict[int, deque] = {1: deque(), 2: deque()}
        self.partial: dict[int, bytes] = {1: b"", 2: b""}
        self.read_fds: dict[int, int] = {}  # read end -> stream
        self.pending: deque = deque()  # (task, stream, text with prefix and newline)
        self.pending_bytes = 0
        self.dropped = 0
        self.thread: threading.Thread | None = None
        self._fatal: TextIO | None = None
        #: the answer of FIONREAD (used under the lock)
        self._count = array.array("i", [0])

    # ------------------------------------------------------------ main thread

    def start(self) -> None:
        """Make fds 1 and 2 pipes and start the thread reading them."""
        # the interpreter's fatal errors still reach the terminal or log, not a pipe
        # a dying process can no longer read
        self._fatal = os.fdopen(os.dup(2), "w")
        faulthandler.enable(file=self._fatal)
        for stream in (1, 2):
            r, w = os.pipe()
            os.dup2(w, stream)
            os.close(w)
            self.read_fds[r] = stream
        for f in (sys.stdout, sys.stderr):
            try:
                f.reconfigure(line_buffering=True)
            except (AttributeError, ValueError):
                pass
        self.thread = threading.Thread(target=self._run, name="daskray-output", daemon=True)
        self.thread.start()

    def task_started(self, task: int | None, label: Label) -> tuple[int | None, Label]:
        """Lines from now on are ``task``'s (named ``label``); what ran before."""
        if self._back_to is None:
            before = self.current
        else:  # the switch back a task ended with, left to this one (task_ended)
            before, self._back_to = self._back_to, None
        self._switch((task, label))
        return before

    def task_ended(self, before: tuple[int | None, Label], later: bool = False) -> None:
        """The current task ended; ``before`` (from ``task_started``) runs again.

        ``later``: the worker goes on to its next task at once, so the switch back
        is left to the next :meth:`task_started`, or to :meth:`settle` when the
        worker goes idle: one switch per task instead of two (a switch asks the
        kernel about both pipes).  The worker's own lines in between, if any, are
        counted as the ended task's."""
        if later:
            self._back_to = before
        else:
            self._switch(before)

    def settle(self) -> None:
        """Make the switch back a task ended with, if it was left for later."""
        if self._back_to is not None:
            before, self._back_to = self._back_to, None
            self._switch(before)

    def _switch(self, new: tuple[int | None, Label]) -> None:
        """Lines from now on are ``new``'s.  What the current label left in a pipe
        (or half a line of it) is followed by an end marker there, which the reader
        knows belongs to the current label.  The marker is written after the lock
        is released: a full pipe blocks the write until the reader, which needs the
        lock, has read."""
        if new == self.current:  # the same label goes on (an actor's calls, say)
            return
        _flush_python_streams()
        marked = []
        with self.lock:
            for r, stream in self.read_fds.items():
                if self.partial[stream] or _unread(r, self._count):
                    self.ended[stream].append(self.current)
                    marked.append(stream)
            self.current = new
        for stream in marked:
            _write_all(stream, MARKER + b"\n")

    def close(self, timeout: float = 2.0) -> None:
        """Send what is left (the process is ending)."""
        if self.thread is None:
            return
        self.settle()
        self.task_ended(self.current)
        for stream in (1, 2):  # EOF for the reader, once the pipes are empty
            os.close(stream)
        self.thread.join(timeout)
        self.sock.close(500)

    # ------------------------------------------------------------ output thread

    def _run(self) -> None:
        poller = zmq.Poller()
        for r in self.read_fds:
            poller.register(r, zmq.POLLIN)
        open_fds = set(self.read_fds)
        while open_fds or self.pending:
            poller.register(self.sock, zmq.POLLOUT if self.pending else 0)
            ready = dict(poller.poll(1000 if open_fds else 200))
            for r in list(open_fds):
                if r in ready and not self._read(r):
                    poller.unregister(r)
                    open_fds.discard(r)
            self._send()
            if not open_fds and self.pending and not ready:
                return  # the head is gone: nothing more can leave

    def _read(self, r: int) -> bool:
        """Read what ``r`` has and file its lines; False at end of file."""
        stream = self.read_fds[r]
        with self.lock:
            try:
                data = os.read(r, READ_BYTES)
            except BlockingIOError:
                return True
            if not data:
                self._file_line(stream, self.partial[stream], self.current)
                self.partial[stream] = b""
                return False
            self._split(stream, data)
        return True

    def _split(self, stream: int, data: bytes) -> None:
        """Under the lock: cut ``data`` into lines, each under the label it belongs to."""
        pieces = (self.partial[stream] + data).split(b"\n")
        self.partial[stream] = pieces.pop()
        ended = self.ended[stream]
        for line in pieces:
            owner = ended[0] if ended else self.current
            if line.endswith(MARKER):
                self._file_line(stream, line[:-len(MARKER)], owner)
                if ended:
                    ended.popleft()
            else:
                self._file_line(stream, line, owner)
        if len(self.partial[stream]) > MAX_LINE_BYTES:
            self._file_line(stream, self.partial[stream], ended[0] if ended else self.current)
            self.partial[stream] = b""

    def _file_line(self, stream: int, line: bytes, owner: tuple[int | None, Label]) -> None:
        if not line:
            return
        if self.pending_bytes > MAX_PENDING_BYTES:
            self.dropped += 1
            return
        if self.dropped:
            self._queue(None, 2, f"[{self.dropped} lines dropped: the cluster did not take "
                                 f"this worker's output as fast as it was printed]",
                        "daskray")
            self.dropped = 0
        self._queue(owner[0], stream, line.decode(errors="replace"), owner[1])

    def _queue(self, task: int | None, stream: int, text: str, label: Label) -> None:
        if not isinstance(label, str):
            label = label()
        text = prefix(label, self.pid) + text + "\n"
        self.pending.append((task, stream, text))
        self.pending_bytes += len(text)

    def _send(self) -> None:
        """Send the pending lines, in batches, while the socket takes them."""
        with self.lock:
            while self.pending:
                blocks, size = _batch(self.pending)
                msg = P.WorkerOutput([(task, stream, text) for task, stream, text, _ in blocks])
                try:  # a batch is far below transport.MAX_FRAME_BYTES: one frame
                    self.sock.send(P.encode(msg), zmq.NOBLOCK)
                except zmq.Again:
                    return
                for _ in range(sum(b[3] for b in blocks)):
                    self.pending.popleft()
                self.pending_bytes -= size


def _batch(pending: deque) -> tuple[list, int]:
    """The first lines of ``pending`` (up to ``BATCH_BYTES``), consecutive lines of
    one task and stream joined in one block ``[task, stream, text, n_lines]``."""
    blocks: list = []
    size = 0
    for task, stream, text in pending:
        if size and size + len(text) > BATCH_BYTES:
            break
        if blocks and blocks[-1][0] == task and blocks[-1][1] == stream:
            blocks[-1][2] += text
            blocks[-1][3] += 1
        else:
            blocks.append([task, stream, text, 1])
        size += len(text)
    return blocks, size


def _unread(fd: int, buf: array.array) -> bool:
    """Whether pipe ``fd`` holds bytes not read yet (``buf``: room for the count)."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return False
    return buf[0] > 0


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _flush_python_streams() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError, AttributeError):
            pass


# ------------------------------------------------------------ driver side


def write_output(blocks: list, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Write forwarded blocks to this process's ``sys.stdout`` / ``sys.stderr`` as
    they are now (Jupyter replaces them); the number of bytes written."""
    written = 0
    for block in blocks:
        stream, text = block[1], block[2]
        target = (out or sys.stdout) if stream == 1 else (err or sys.stderr)
        if target is None:
            continue
        try:
            target.write(text)
            target.flush()
        except Exception:  # noqa: BLE001 - a closed or odd stream must not stop the caller
            pass
        written += len(text)
    return written
