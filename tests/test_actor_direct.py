"""Actor calls sent straight from the driver to the actor's process (and replied
to straight), the head told one-way: their order, refs that escape, failures,
calls from tasks and actors, the direct socket's guard, cleanup."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import zlib

import pytest
import daskray
from daskray.runtime import protocol as P
from daskray.runtime.direct_link import frame
from helpers import mark_started, start_cluster, wait_for_path, wait_until

pytestmark = pytest.mark.timeout(120)


@daskray.remote
class Log:
    """Keeps the order its calls ran in."""

    def __init__(self) -> None:
        self.seen: list = []

    def add(self, x, *rest) -> int:
        self.seen.append(x)
        return x

    def seen_list(self) -> list:
        return list(self.seen)

    def pid(self) -> int:
        return os.getpid()

    def slow(self, x, started: str | None = None, seconds: float = 30.0) -> int:
        mark_started(started)
        time.sleep(seconds)
        return x

    def holder(self) -> list:
        return [daskray.put(123)]

    def boom(self) -> None:
        raise KeyError("boom in a direct call")

    def big(self) -> bytes:
        return b"z" * 1_000_000


@daskray.remote
def plus_one(x):
    return x + 1


@daskray.remote
def first_of(values):
    return daskray.get(values[0])


@daskray.remote
def call_actor_from_task(handle, n):
    return daskray.get([handle.add.remote(i) for i in range(n)])


@daskray.remote
class Caller:
    def call(self, handle, n):
        return daskray.get([handle.add.remote(i) for i in range(n)])

    def read(self, values):
        return daskray.get(values[0])


def session():
    return daskray.api._session()


def channel_of(handle):
    return session()._channels.get(handle._actor_id)


def open_channel(handle):
    """Make calls until the way straight to the actor is open; its channel."""
    assert wait_until(lambda: daskray.get(handle.pid.remote()) > 0
                      and channel_of(handle) is not None
                      and session()._open(channel_of(handle), handle), 30)
    return channel_of(handle)


@pytest.fixture
def counted(cluster, monkeypatch):
    """How many calls left this driver straight for an actor's process."""
    conn = session().conn
    sent = []
    original = conn.send_direct

    def send_direct(address, msg, then=None):
        sent.append(msg)
        return original(address, msg, then)

    monkeypatch.setattr(conn, "send_direct", send_direct)
    return sent


def test_calls_keep_their_order_across_the_switch_to_direct(counted):
    log = Log.remote()
    expected = []
    refs = []
    n = 0
    for round_ in range(40):  # calls right after creation, then with and without gets
        for _ in range(25):
            refs.append(log.add.remote(n))
            expected.append(n)
            n += 1
        if round_ % 3 == 0:  # an argument that is a ref: this call goes through the head
            refs.append(log.add.remote(n, plus_one.remote(1)))
            expected.append(n)
            n += 1
        if round_ % 4 == 0:
            daskray.get(refs[-1])
        if round_ % 5 == 0:
            refs = refs[-3:]  # dropped before their ends were seen, some of them
    assert daskray.get(refs) == expected[-len(refs):]
    assert daskray.get(log.seen_list.remote()) == expected
    assert len(counted) > 100  # most went straight


def test_outcomes_of_direct_calls_values_errors_and_large_results(counted):
    log = Log.remote()
    open_channel(log)
    before = len(counted)
    assert daskray.get(log.add.remote(5)) == 5
    with pytest.raises(KeyError, match="boom in a direct call"):
        daskray.get(log.boom.remote())
    assert daskray.get(log.big.remote()) == b"z" * 1_000_000
    inner = daskray.get(log.holder.remote())  # a result holding a ref
    assert daskray.get(inner[0]) == 123
    assert len(counted) - before == 4


def test_refs_of_direct_calls_that_escape_work_everywhere(counted):
    log = Log.remote()
    other = Caller.remote()
    open_channel(log)
    before = len(counted)
    r = log.add.remote(41)
    s = log.slow.remote(9, None, 0.5)
    assert len(counted) - before == 2
    assert daskray.get(plus_one.remote(r)) == 42  # an argument of a task
    assert daskray.get(first_of.remote([s])) == 9  # inside an argument, still running
    assert daskray.get(daskray.get(daskray.put([r]))[0]) == 41  # inside a put
    assert daskray.get(other.read.remote([log.add.remote(7)])) == 7  # to another actor
    ready, _ = daskray.wait([log.add.remote(1)], timeout=30)
    assert len(ready) == 1


def test_a_sigkilled_actor_fails_its_pending_direct_calls(counted, tmp_path):
    log = Log.remote()
    channel = open_channel(log)
    pid = daskray.get(log.pid.remote())
    before = len(counted)
    running = log.slow.remote(1, str(tmp_path / "started"))
    queued = [log.add.remote(i) for i in range(5)]
    assert len(counted) - before == 6
    wait_for_path(tmp_path / "started")
    os.kill(pid, signal.SIGKILL)
    for ref in [running, *queued]:
        with pytest.raises(daskray.ActorDiedError):
            daskray.get(ref, timeout=30)
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(log.add.remote(0), timeout=30)
    assert channel.address is None or not os.path.exists(channel.address)


def test_direct_calls_run_again_on_the_restarted_actor_where_retries_allow(counted, tmp_path):
    log = Log.options(max_restarts=1, max_task_retries=1).remote()
    first = open_channel(log).address
    pid = daskray.get(log.pid.remote())
    running = log.slow.remote(1, str(tmp_path / "started"), 0.2)
    queued = [log.add.remote(i) for i in range(5)]
    wait_for_path(tmp_path / "started")
    os.kill(pid, signal.SIGKILL)
    assert daskray.get([running, *queued], timeout=60) == [1, 0, 1, 2, 3, 4]
    assert daskray.get(log.pid.remote()) != pid
    # the new process takes calls straight too
    assert open_channel(log).address != first
    before = len(counted)
    assert daskray.get(log.add.remote(8)) == 8
    assert len(counted) == before + 1


def test_cancel_of_direct_calls_queued_and_running(counted, tmp_path):
    log = Log.remote()
    open_channel(log)
    running = log.slow.remote(1, str(tmp_path / "started"), 60)
    queued = log.add.remote(2)
    wait_for_path(tmp_path / "started")
    daskray.cancel(queued)
    with pytest.raises(daskray.TaskCancelledError):
        daskray.get(queued, timeout=30)
    daskray.cancel(running)
    with pytest.raises(daskray.TaskCancelledError):
        daskray.get(running, timeout=30)
    assert daskray.get(log.add.remote(3), timeout=30) == 3


def test_calls_more_than_the_socket_holds_wait_in_the_caller_and_all_arrive(counted, tmp_path):
    # the actor is busy: the calls' bytes (about 25 MB, far more than a socket
    # buffer) wait in the driver, .remote() does not block, and all arrive in order
    log = Log.remote()
    open_channel(log)
    before = len(counted)
    running = log.slow.remote(-1, str(tmp_path / "started"), 1.0)
    wait_for_path(tmp_path / "started")
    start = time.monotonic()
    refs = [log.add.remote(i, b"p" * 100_000) for i in range(250)]
    assert time.monotonic() - start < 5  # sending did not wait for the actor
    assert len(counted) - before == 251
    assert daskray.get(refs, timeout=60) == list(range(250))
    assert daskray.get(running, timeout=30) == -1
    assert daskray.get(log.seen_list.remote(), timeout=30)[-250:] == list(range(250))


def test_calls_from_a_task_and_from_another_actor(counted):
    log = Log.remote()
    open_channel(log)
    assert daskray.get(call_actor_from_task.remote(log, 20)) == list(range(20))
    caller = Caller.remote()
    assert daskray.get(caller.call.remote(log, 20)) == list(range(20))


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other end closed ``sock`` within ``within`` seconds (it sent nothing)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_the_direct_socket_drops_what_is_malformed_or_unauthenticated(cluster, tmp_path):
    log = Log.remote()
    address = open_channel(log).address
    token = session().conn.token
    marker = tmp_path / "unpickled"
    call = P.encode(P.DirectCall((b"x" * 8, 1, 0), b"t", b"", b""))
    # a stranger without the session token: closed, nothing of it decoded
    stranger = _connect(address)
    stranger.sendall(frame(os.urandom(len(token))) + frame(call))
    assert _closed_by_peer(stranger, 10)
    # a first message longer than the token: closed at its length header
    greedy = _connect(address)
    greedy.sendall((1 << 30).to_bytes(4, "little") + b"x" * 1000)
    assert _closed_by_peer(greedy, 10)
    # with the token, but a pickle that would run code: refused by the decoder;
    # then garbage, wrong fields, not calls, not a direct call: each dropped
    payload = pickle.dumps(_Trap(str(marker)))
    insider = _connect(address)
    insider.sendall(frame(token) + frame(zlib.crc32(payload).to_bytes(4, "little") + payload)
                    + frame(b"garbage")
                    + frame(P.encode(P.DirectCall("not a ref", b"t", None, b"")))
                    + frame(P.encode(P.DirectCalls([("a", "b"), 3])))
                    + frame(P.encode(P.Welcome({}, ""))))
    assert not _closed_by_peer(insider, 0.5)  # nothing came back, and it is still open
    # many that connect and never speak: the oldest are closed, calls still come in
    silent = [_connect(address) for _ in range(100)]
    assert _closed_by_peer(silent[0], 10)
    for sock in (stranger, greedy, insider, *silent):
        sock.close()
    assert not marker.exists()
    assert daskray.get(log.add.remote(1), timeout=30) == 1  # the process took no harm


class _Trap:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_head_forgets_direct_calls_and_the_actor_once_all_is_dropped(restart_cluster):
    daskray.shutdown()  # a cluster of its own: nothing of other tests is left in it
    start_cluster()
    sizes = ("tasks", "graphs", "refs", "ref holders", "actors", "processing",
             "held objects", "early direct outcomes")
    now = lambda: {k: v for k, v in session().state_sizes().items() if k in sizes}  # noqa: E731
    assert set(now().values()) == {0}
    log = Log.remote()
    open_channel(log)
    sent = []
    conn = session().conn
    original = conn.send_direct
    conn.send_direct = lambda address, msg, then=None: (sent.append(msg),
                                                        original(address, msg, then))
    refs = [log.add.remote(i) for i in range(100)]
    assert daskray.get(refs) == list(range(100))
    assert len(sent) == 100
    del refs, log
    assert wait_until(lambda: set(now().values()) == {0}, 30), now()


def test_nothing_is_left_after_shutdown(restart_cluster):
    log = Log.remote()
    channel = open_channel(log)
    pid = daskray.get(log.pid.remote())
    assert daskray.get([log.add.remote(i) for i in range(50)]) == list(range(50))
    socket_path = channel.address
    assert os.path.exists(socket_path)
    session_dir = os.path.dirname(socket_path)
    daskray.shutdown()
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    assert not os.path.exists(session_dir)
