"""What tasks and actors print reaches the driver: whole lines, prefixed as Ray's."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import threading
from typing import Iterator

import pytest

import daskray
from daskray.runtime import protocol as P
from daskray.runtime.output_router import OutputRouter, driver_of_task

LINES_PER_WORKER = 10_000
WAIT_SECONDS = 60


class LineSink:
    """A stand-in for ``sys.stdout`` / ``sys.stderr``: keeps the lines written to
    it, and wakes a waiter once a line matching ``until`` has arrived ``count`` times."""

    def __init__(self) -> None:
        self.text = ""
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            self.text += text
            self.changed.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        with self.changed:
            return self.text.splitlines()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = WAIT_SECONDS) -> bool:
        """Whether ``count`` lines matching ``pattern`` arrived within ``timeout``
        (the text is searched once: only what arrived since the last look)."""
        regex = re.compile(pattern, re.M)
        seen = {"upto": 0, "found": 0}

        def enough() -> bool:
            end = self.text.rfind("\n") + 1
            if end > seen["upto"]:
                seen["found"] += len(regex.findall(self.text, seen["upto"], end))
                seen["upto"] = end
            return seen["found"] >= count

        with self.changed:
            return self.changed.wait_for(enough, timeout)


@contextlib.contextmanager
def sinks() -> Iterator[tuple[LineSink, LineSink]]:
    """``sys.stdout`` and ``sys.stderr`` replaced by sinks for the block (in the
    test's body: pytest sets its own capture again after the fixtures run)."""
    out, err = LineSink(), LineSink()
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = before


@daskray.remote
def flood(i: int, n: int, barrier_dir: str) -> int:
    """Print ``n`` lines, once all four tasks run (so they print at the same time)."""
    import pathlib
    import time

    pathlib.Path(barrier_dir, str(i)).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(barrier_dir)) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    for j in range(n):
        print(f"task {i} line {j} " + "x" * (j % 50))
    return os.getpid()


@pytest.mark.timeout(120)
def test_four_workers_printing_at_once_reach_the_driver_whole_and_prefixed(
        restart_cluster, tmp_path):
    daskray.shutdown()
    daskray.init(num_workers=4)
    with sinks() as (out, _):
        pids = daskray.get([flood.remote(i, LINES_PER_WORKER, str(tmp_path))
                            for i in range(4)], timeout=WAIT_SECONDS)
        assert len(set(pids)) == 4
        assert out.wait_for(r"^\(flood pid=\d+\) task \d line ", 4 * LINES_PER_WORKER)
    pattern = re.compile(r"^\(flood pid=(\d+)\) task (\d) line (\d+) (x*)$")
    seen = set()
    for line in out.lines():
        m = pattern.match(line)
        assert m, f"a line split, interleaved or without its prefix: {line!r}"
        pid, task, number, xs = int(m[1]), int(m[2]), int(m[3]), m[4]
        assert pid == pids[task] and len(xs) == number % 50
        seen.add((task, number))
    assert len(seen) == 4 * LINES_PER_WORKER


@daskray.remote
def chatty() -> None:
    import logging

    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("chatty").warning("a logged warning")
    os.write(1, b"written by C code\n")  # fd 1 itself, as C's printf would
    sys.stdout.write("no newline at the end")


def test_stdout_stderr_logging_and_an_unfinished_line(cluster):
    with sinks() as (out, err):
        daskray.get(chatty.remote(), timeout=WAIT_SECONDS)
        assert out.wait_for(r"^\(chatty pid=\d+\) no newline at the end$")
        assert err.wait_for(r"^\(chatty pid=\d+\) (WARNING:chatty:)?a logged warning$")
        assert out.wait_for(r"^\(chatty pid=\d+\) to stdout$")
        assert out.wait_for(r"^\(chatty pid=\d+\) written by C code$")
        assert err.wait_for(r"^\(chatty pid=\d+\) to stderr$")
    assert "to stderr" not in out.text and "to stdout" not in err.text


@daskray.remote
def polite(word: str) -> None:
    print(f"{word} on stdout")
    print(f"{word} on stderr", file=sys.stderr)
    sys.stdout.write(f"{word} without a newline")


def test_prints_reach_the_driver_on_each_backend(backend):
    with sinks() as (out, err):
        daskray.get(polite.remote(backend), timeout=WAIT_SECONDS)
        assert out.wait_for(rf"^\(polite pid=\d+\) {backend} on stdout$")
        assert err.wait_for(rf"^\(polite pid=\d+\) {backend} on stderr$")
        assert out.wait_for(rf"^\(polite pid=\d+\) {backend} without a newline$")


@daskray.remote
class Talker:
    def say(self, text: str) -> None:
        print(text)


def test_an_actors_lines_carry_its_class_name(cluster):
    with sinks() as (out, _):
        talker = Talker.remote()
        daskray.get(talker.say.remote("hello from an actor"), timeout=WAIT_SECONDS)
        assert out.wait_for(r"^\(Talker pid=\d+\) hello from an actor$")


DRIVER = textwrap.dedent("""
    import sys, daskray

    @daskray.remote
    def loud():
        print("TASK-SAYS-HELLO")
        print("TASK-WARNS", file=sys.stderr)

    daskray.init(num_workers=1, log_to_driver={log_to_driver})
    daskray.get(loud.remote(), timeout=60)
    daskray.get(loud.remote(), timeout=60)
    daskray.shutdown()
    print("DRIVER-DONE")
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("log_to_driver", [True, False])
def test_log_to_driver_false_keeps_tasks_output_away(log_to_driver):
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(log_to_driver=log_to_driver)],
                          capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "DRIVER-DONE" in proc.stdout
    if log_to_driver:  # the control: the same driver sees them when it asks
        assert re.search(r"^\(loud pid=\d+\) TASK-SAYS-HELLO$", proc.stdout, re.M)
        assert re.search(r"^\(loud pid=\d+\) TASK-WARNS$", proc.stderr, re.M)
    else:
        assert "TASK-SAYS-HELLO" not in proc.stdout + proc.stderr
        assert "TASK-WARNS" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- the head's routing


class _Graph:
    def __init__(self, client, parent=None):
        self.id = (client, 1)
        self.parent = parent


class _Task:
    def __init__(self, client, parent=None):
        self.graph = _Graph(client, parent)


def test_output_goes_to_the_driver_of_the_task_up_the_nesting():
    tasks = {1: _Task(b"driver-a"), 2: _Task(b"w1", parent=1), 3: _Task(b"driver-b")}
    sent = []
    router = OutputRouter(lambda ident, msg: sent.append((ident, msg)),
                          lambda task: driver_of_task(tasks, task))
    for ident in (b"driver-a", b"driver-b"):
        router.subscribe(ident)
    router.forward([(2, 1, "(f pid=1) nested\n"), (3, 1, "(g pid=2) b's\n"),
                    (99, 2, "(h pid=3) unknown task\n")])
    got = {ident: [block[2] for block in msg.blocks] for ident, msg in sent}
    assert got == {b"driver-a": ["(f pid=1) nested\n", "(h pid=3) unknown task\n"],
                   b"driver-b": ["(g pid=2) b's\n", "(h pid=3) unknown task\n"]}
    assert all(type(msg) is P.WorkerOutput for _, msg in sent)


def test_a_driver_that_does_not_keep_up_gets_a_count_of_dropped_lines(monkeypatch):
    monkeypatch.setattr("daskray.runtime.output_router.MAX_UNACKED_BYTES", 100)
    sent = []
    router = OutputRouter(lambda ident, msg: sent.append(msg), lambda task: None)
    router.subscribe(b"d")
    line = "(f pid=1) " + "y" * 29 + "\n"  # 40 bytes
    router.forward([(None, 1, line)] * 5)  # room for two
    assert [b[2] for b in sent[0].blocks] == [line, line]
    router.ack(b"d", 80)
    router.forward([(None, 1, line)])
    notice, last = sent[1].blocks
    assert notice[1] == 2 and "[3 lines of worker output dropped" in notice[2]
    assert last[2] == line


def test_a_driver_that_did_not_subscribe_gets_nothing():
    sent = []
    router = OutputRouter(lambda ident, msg: sent.append(msg), lambda task: None)
    router.forward([(None, 1, "(f pid=1) x\n")])
    router.subscribe(b"d")
    router.forget(b"d")
    router.forward([(None, 1, "(f pid=1) x\n")])
    assert sent == []


# ---------------------------------------------------------------- the worker's side


@pytest.fixture
def capture():
    """An OutputCapture whose pipes are not installed and whose socket reaches no one:
    its line handling alone."""
    import zmq

    from daskray.runtime.output import OutputCapture

    ctx = zmq.Context()
    cap = OutputCapture(ctx, "ipc:///nonexistent/daskray-test.sock", b"t" * 32, "wtest")
    yield cap
    cap.sock.close(0)
    ctx.term()


def test_lines_left_in_a_pipe_keep_the_label_of_the_task_that_printed_them(capture):
    from daskray.runtime.output import MARKER

    capture.current = (7, "second")
    capture.ended[1].append((6, "first"))  # "first" ended with output still unread
    capture._split(1, b"end of first\nunfinished " + b"of first" + MARKER + b"\nsecond's\n")
    capture._split(1, b"half a line")
    assert [(task, text.split(") ", 1)[1]) for task, _, text in capture.pending] == [
        (6, "end of first\n"), (6, "unfinished of first\n"), (7, "second's\n")]
    assert all(text.startswith("(first pid=") for task, _, text in capture.pending
               if task == 6)
    assert capture.partial[1] == b"half a line" and not capture.ended[1]


def test_a_worker_drops_lines_past_its_bound_and_says_how_many(capture, monkeypatch):
    monkeypatch.setattr("daskray.runtime.output.MAX_PENDING_BYTES", 100)
    capture.current = (1, "f")
    capture._split(1, b"".join(b"line %d\n" % i for i in range(50)))
    kept = len(capture.pending)
    assert 0 < kept < 50 and capture.dropped == 50 - kept
    capture.pending.clear()
    capture.pending_bytes = 0
    capture._split(1, b"after\n")
    notice, after = capture.pending
    assert notice[1] == 2 and f"[{50 - kept} lines dropped" in notice[2]
    assert after[2].endswith(") after\n") and capture.dropped == 0


def test_log_to_driver_false_leaves_the_dask_clients_events_alone(on_distributed):
    from daskray.distributed_backend.output import TOPIC

    daskray.shutdown()
    daskray.init(address=on_distributed.scheduler_address, log_to_driver=False)
    try:
        client = daskray.api._runtime.distributed.client
        assert TOPIC not in client._event_handlers
    finally:
        daskray.shutdown()
    daskray.init(address=on_distributed.scheduler_address)
    assert TOPIC in daskray.api._runtime.distributed.client._event_handlers


@pytest.mark.timeout(60)
def test_malformed_output_does_not_take_the_head_down(cluster):
    import zmq

    from daskray.runtime import transport

    running = daskray.api._runtime.cluster
    ctx = zmq.Context()
    sock = transport.dealer(ctx, running.head_address, running.token, identity="w999/output")
    try:
        sock.send_multipart(P.hello_frames(running.token, P.ROLE_WORKER, "w999/output"))
        for blocks in ([("x",)], [(1, 1, b"bytes, not text")], None, [[None, 1, None]]):
            sock.send(P.encode(P.WorkerOutput(blocks)))
        with sinks() as (out, _):
            daskray.get(polite.remote("still"), timeout=WAIT_SECONDS)
            assert out.wait_for(r"^\(polite pid=\d+\) still on stdout$")
    finally:
        sock.close(0)
        ctx.term()


def test_a_label_is_made_only_when_its_task_prints_a_line(capture):
    from functools import partial

    from daskray.runtime.output import task_label

    made = []

    def label(key):
        made.append(key)
        return task_label(key)

    idle = capture.current
    before = capture.task_started(3, partial(label, ("inc-5f3a9e2c11", 0)))
    assert before == idle and made == []  # naming a task that prints nothing costs nothing
    capture._split(1, b"hello\n")
    assert made == [("inc-5f3a9e2c11", 0)]
    assert capture.pending[-1][2].startswith("(inc pid=") and capture.pending[-1][0] == 3


def test_the_switch_back_to_idle_waits_for_the_next_task_or_settle(capture):
    idle = capture.current
    before = capture.task_started(1, "f")
    capture.task_ended(before, later=True)
    assert capture.current == (1, "f")  # not switched yet: the next task does it
    # the next task switches once, and is told the worker was idle before it
    assert capture.task_started(2, "g") == idle and capture.current == (2, "g")
    capture.task_ended(idle, later=True)
    capture.settle()  # the worker goes idle: its own lines are its own again
    assert capture.current == idle
    capture.settle()
    assert capture.current == idle
    # a nested task switches back to the task it ran on top of at once
    capture.task_started(4, "outer")
    inner_before = capture.task_started(5, "inner")
    capture.task_ended(inner_before)
    assert capture.current == (4, "outer")
