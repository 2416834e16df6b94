"""A peer without the session token, or one that sends garbage with it, can
neither take a process down, nor take an identity another process needs, nor make
a process buffer much, nor flood its log, nor get a byte of its payload unpickled.

Every test attacks a real cluster and then checks that it still computes.
"""

from __future__ import annotations

import os
import pickle
import random
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import zmq

import daskray
import daskray.api
from helpers import NUM_WORKERS, start_cluster, wait_until
from daskray.runtime import protocol as P
from daskray.runtime import transport

#: more connections than the common 1,024 open-files limit
FLOOD = 1100


@daskray.remote
def _double(x):
    return 2 * x


@pytest.fixture
def own_cluster(restart_cluster):
    """A cluster of its own for one test (the attack may leave it worse for wear)."""
    daskray.shutdown()
    start_cluster()
    yield daskray.api._runtime.cluster
    daskray.shutdown()


@pytest.fixture
def attacker():
    """A ZeroMQ context with room for a flood of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * FLOOD:
        pytest.skip(f"this process may open only {hard} files; the flood needs {4 * FLOOD}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    ctx.set(zmq.MAX_SOCKETS, 4 * FLOOD)
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def worker_processes(cluster) -> list[psutil.Process]:
    head = psutil.Process(cluster.head.pid)
    return [p for p in head.children() if "start_worker" in " ".join(p.cmdline())]


def assert_still_serving(cluster, workers: set[int]) -> None:
    """The head and the same workers run, and the cluster computes."""
    assert cluster.head.poll() is None, "the head process died"
    assert {p.pid for p in worker_processes(cluster)} == workers, "a worker process died"
    assert daskray.get({"x": (sum, [1, 2]), "y": (max, "x", 1)}, "y") == 3
    assert daskray.get(_double.remote(np.arange(300_000)), timeout=30).sum() == \
        2 * np.arange(300_000).sum()


def tokenless_dealer(ctx, address, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return sock


def try_send(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send if the socket has a connection to send on (one that failed the
    handshake has none, and a DEALER would block)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def wrong_token_dealer(ctx, address) -> zmq.Socket:
    return transport.dealer(ctx, address, os.urandom(32))


def flood(ctx, address: str, count: int) -> list[zmq.Socket]:
    """``count`` connections without the token (most with no credentials, some
    with a wrong one), each sending a frame."""
    socks = []
    for i in range(count):
        sock = wrong_token_dealer(ctx, address) if i % 10 == 0 else tokenless_dealer(ctx, address)
        try_send(sock, [b"x" * 100])
        socks.append(sock)
    return socks


def limit_open_files(pid: int, limit: int = 1024) -> None:
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------------ connection floods


@pytest.mark.timeout(120)
def test_a_flood_of_tokenless_connections_does_not_abort_the_head(own_cluster, attacker):
    workers = {p.pid for p in worker_processes(own_cluster)}
    limit_open_files(own_cluster.head.pid)
    socks = flood(attacker, own_cluster.head_address, FLOOD)
    # every one is dropped at the handshake: the head's descriptors stay few
    # while all of them keep trying to reconnect
    assert wait_until(lambda: open_files(own_cluster.head.pid) < 200, 30)
    assert_still_serving(own_cluster, workers)
    for sock in socks:
        sock.close(0)
    assert_still_serving(own_cluster, workers)


@pytest.mark.timeout(120)
def test_a_flood_of_tokenless_connections_does_not_abort_a_worker(own_cluster, attacker):
    workers = worker_processes(own_cluster)
    for proc in workers:
        limit_open_files(proc.pid)
    socks = []
    for address in own_cluster.client.workers.values():
        socks += flood(attacker, address, FLOOD)
    assert wait_until(lambda: all(open_files(p.pid) < 200 for p in workers), 30)
    assert_still_serving(own_cluster, {p.pid for p in workers})
    for sock in socks:
        sock.close(0)


def test_processes_raise_their_open_files_limit_to_the_hard_limit(own_cluster):
    for pid in [own_cluster.head.pid] + [p.pid for p in worker_processes(own_cluster)]:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        assert soft == hard, (pid, soft, hard)


# ------------------------------------------------------------------ identities


@pytest.mark.timeout(120)
def test_tokenless_peers_cannot_take_the_identities_of_replacements(own_cluster, attacker):
    """Worker ids are w1, w2, ...: squatters on the next ids must not keep the
    replacement of a dead worker from joining."""
    workers = worker_processes(own_cluster)
    squatters = []
    for n in range(1, 30):
        for identity in (f"w{n}".encode(), f"a{n}".encode()):
            sock = tokenless_dealer(attacker, own_cluster.head_address, identity)
            try_send(sock, P.hello_frames(b"x" * 32, P.ROLE_WORKER, identity.decode()))
            squatters.append(sock)
    old = set(own_cluster.client.workers)
    workers[0].kill()
    workers[0].wait(10)
    assert wait_until(lambda: len(set(own_cluster.client.workers) - old) == 1
                      and len(own_cluster.client.workers) == NUM_WORKERS, 60), \
        own_cluster.client.workers
    assert_still_serving(own_cluster, {p.pid for p in worker_processes(own_cluster)})


# ------------------------------------------------------------------ buffering


def zmtp_greeting(mechanism: bytes) -> bytes:
    """ZMTP 3.0's 64-byte greeting, as a client."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\x00") + \
        b"\x00" + b"\x00" * 31


def send_huge_command(path: str, mechanism: bytes, size: int) -> int:
    """Speak ZMTP to the ipc socket at ``path`` without the token: a greeting,
    then a command frame announced as ``size`` bytes, streamed until the peer
    hangs up; the bytes sent."""
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(path)
        try:
            sock.sendall(zmtp_greeting(mechanism))
            sock.sendall(bytes([0x06]) + struct.pack(">Q", size))
            chunk = b"\x00" * (1 << 20)
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
    return sent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mechanism", [b"NULL", b"PLAIN"])
def test_a_tokenless_peer_cannot_make_the_head_buffer_a_gigabyte(own_cluster, mechanism):
    head = psutil.Process(own_cluster.head.pid)
    workers = {p.pid for p in worker_processes(own_cluster)}
    before = head.memory_info().rss
    sent = send_huge_command(own_cluster.head_address[len("ipc://"):], mechanism, 1 << 30)
    grown = head.memory_info().rss - before
    assert grown < 50 << 20, f"the head grew by {grown / 2**20:.0f} MiB ({sent >> 20} MiB sent)"
    assert sent < 1 << 30, "the head read a whole gigabyte from a peer without the token"
    assert_still_serving(own_cluster, workers)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_large_messages_from_real_peers_still_arrive(cluster_without_checks):
    """Messages past the bound on one frame are split by the sender: a graph with
    a large inline argument and a large put reach their destination whole.  (Its
    200,000-task graph would take minutes with the core's invariant checks on.)"""
    big = np.random.default_rng(0).random(3 * transport.MAX_FRAME_BYTES // 8 + 7)
    assert daskray.get(_double.remote(daskray.put(big)), timeout=60).sum() == 2 * big.sum()
    graph = {("x", i): (float, i) for i in range(200_000)}
    graph["total"] = (sum, list(graph))
    assert daskray.get(graph, "total") == sum(range(200_000))


def test_split_buffers_come_back_as_they_were():
    bufs = [b"", b"a" * 10, bytes(range(256)) * (transport.MAX_FRAME_BYTES // 100)]
    layout, pieces = transport.split_buffers(bufs)
    assert len(pieces) > len(bufs)
    assert all(len(p) <= transport.MAX_FRAME_BYTES for p in pieces)
    frames = [zmq.Frame(bytes(p)) for p in pieces]
    assert [bytes(b) for b in transport.join_buffers(layout, frames)] == bufs
    with pytest.raises(ValueError):
        transport.join_buffers(layout, frames[:-1])


# ------------------------------------------------------------------ the log


LOG_FLOOD_SCRIPT = textwrap.dedent("""
    import sys, zmq
    import daskray, daskray.api
    from daskray.runtime import protocol as P, transport
    daskray.init(num_workers=1)
    cluster = daskray.api._runtime.cluster
    ctx = zmq.Context()
    sock = transport.dealer(ctx, cluster.head_address, cluster.token)
    sock.send_multipart(P.hello_frames(cluster.token, P.ROLE_CLIENT, "clumsy"))
    assert sock.poll(10_000) and type(P.decode(sock.recv())) is P.Welcome
    for i in range({n}):
        sock.send(b"garbage %d" % i)
    for i in range({n}):  # every one is answered: the head has seen them all
        assert sock.poll(30_000), i
        assert type(P.decode(sock.recv())) is P.Rejected
    strangers = [ctx.socket(zmq.DEALER) for _ in range(200)]
    for s in strangers:
        s.connect(cluster.head_address)
        s.send_multipart(P.hello_frames(b"x" * 32, P.ROLE_CLIENT, "stranger"))
    for s in strangers:
        wrong = transport.dealer(ctx, cluster.head_address, b"y" * 32)
        wrong.send(b"x")
    assert daskray.get({{"x": (sum, [1, 2])}}, "x") == 3
    ctx.destroy(linger=0)
    daskray.shutdown()
    print("done")
""")


@pytest.mark.timeout(120)
def test_refused_messages_do_not_flood_the_log(tmp_path):
    script = tmp_path / "flood_log.py"
    script.write_text(LOG_FLOOD_SCRIPT.format(n=3000))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=100, cwd=os.getcwd())
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("daskray")]
    assert 1 <= len(lines) <= 10, "\n".join(lines[:20])


def test_a_throttled_log_says_how_many_lines_it_held_back(capsys):
    log = transport.ThrottledLog(interval=3600, prefix="test")
    assert log.write("a peer misbehaved", "first")
    assert not any(log.write("a peer misbehaved", f"again {i}") for i in range(500))
    log._last["a peer misbehaved"] -= 7200  # as if an hour had passed
    assert log.write("a peer misbehaved", "later")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["test: a peer misbehaved: first",
                     "test: a peer misbehaved: later (500 more like it in the last 3600 s)"]


# ------------------------------------------------------------------ fuzz


def _is_reply(frames: list[bytes], request: int) -> bool:
    try:
        msg = P.decode(frames[0])
    except P.ProtocolError:
        return False
    return type(msg) is P.ResourcesReply and msg.request == request


class _Canary:
    """Unpickling it creates a file: proof that bytes were unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _valid_messages(cluster) -> list[bytes]:
    """Real encoded messages a client sends, to mutate."""
    client = cluster.client
    sent = []
    client.send = sent.append  # capture real submissions instead of sending them
    try:
        _double.remote(np.arange(10))
        daskray.put(np.arange(20))
    finally:
        del client.send
    return [P.encode(m) for m in sent] + [
        P.encode(P.RefsUpdate(["r1"], ["r2"])), P.encode(P.SubscribeRefs(["r9"])),
        P.encode(P.CancelRefs(["r7"])), P.encode(P.CancelGraph(10**6)),
        P.encode(P.ReleaseGraph(10**6)), P.encode(P.KillActorRequest("nobody")),
        P.encode(P.GetResources(5)), P.encode(P.StopCluster())]


def _read_until(sock: zmq.Socket, done) -> None:
    """Read replies until ``done(frames)``: the peer has handled all sent before."""
    while True:
        assert sock.poll(60_000), "no answer within a minute"
        if done(sock.recv_multipart()):
            return


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del data[at:at + rng.randint(1, 16)]
        elif kind == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            data = data[:at]
    return bytes(data)


def _fuzz_frames(rng: random.Random, valid: list[bytes], count: int) -> list[list[bytes]]:
    messages = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            messages.append([rng.randbytes(rng.randint(0, 2000))])
        elif kind == 1:
            messages.append([_mutate(rng, rng.choice(valid))])
        else:
            messages.append([_mutate(rng, rng.choice(valid)) for _ in range(rng.randint(2, 4))])
    return messages


@pytest.mark.timeout(240)
def test_fuzzed_frames_to_the_head_and_a_data_server(own_cluster, tmp_path):
    rng = random.Random(int(os.environ.get("DASKRAY_FUZZ_SEED", "1234")))
    cluster = own_cluster
    workers = worker_processes(cluster)
    processes = [psutil.Process(cluster.head.pid)] + workers
    rss_before = {p.pid: p.memory_info().rss for p in processes}
    canary = str(tmp_path / "unpickled")
    evil = pickle.dumps(_Canary(canary))
    valid = _valid_messages(cluster)
    ctx = zmq.Context()
    try:
        # without the token at the handshake: nothing of it is read at all
        stranger = tokenless_dealer(ctx, cluster.head_address)
        try_send(stranger, P.hello_frames(cluster.token, P.ROLE_CLIENT, "stranger"))
        for frames in _fuzz_frames(rng, valid + [evil], 2000):
            try_send(stranger, frames)
        try_send(stranger, [evil])
        # the token at the handshake, but no hello: ignored, not unpickled
        rude = transport.dealer(ctx, cluster.head_address, cluster.token)
        rude.send(evil)
        for frames in _fuzz_frames(rng, valid + [evil], 1000):
            rude.send_multipart(frames)
        # the token and a hello: every frame is decoded and refused or carried out
        fuzzer = transport.dealer(ctx, cluster.head_address, cluster.token)
        fuzzer.send_multipart(P.hello_frames(cluster.token, P.ROLE_CLIENT, "fuzzer"))
        assert fuzzer.poll(10_000) and type(P.decode(fuzzer.recv())) is P.Welcome
        for frames in _fuzz_frames(rng, valid, 5000):
            fuzzer.send_multipart(frames)
        # a worker's data socket, without and with the token
        address = next(iter(cluster.client.workers.values()))
        data_stranger = tokenless_dealer(ctx, address)
        data_peer = transport.dealer(ctx, address, cluster.token)
        verbs = [P.GET, P.GETSHM, P.PUT, P.PING, P.PEER_LOST, P.INTERRUPT, b"nonsense"]
        for i in range(2000):
            token = cluster.token if i % 2 else rng.randbytes(32)
            frames = [token, rng.choice(verbs), rng.randbytes(rng.randint(0, 40))]
            frames += [rng.randbytes(rng.randint(0, 500)) for _ in range(rng.randint(0, 3))]
            if i % 3:
                data_peer.send_multipart(frames)
            else:
                try_send(data_stranger, frames)
        try_send(data_stranger, [cluster.token, P.GET, evil])
        # each answers a last request only after it has handled all of the above
        # (a hello first: a mutated frame may have been a goodbye)
        fuzzer.send_multipart(P.hello_frames(cluster.token, P.ROLE_CLIENT, "fuzzer"))
        fuzzer.send(P.encode(P.GetResources(10**9)))
        _read_until(fuzzer, lambda f: _is_reply(f, 10**9))
        data_peer.send_multipart([cluster.token, P.PING, b""])
        _read_until(data_peer, lambda f: f[0] == P.PONG)
        assert daskray.get({"x": (sum, [1, 2])}, "x") == 3
        assert daskray.get(_double.remote(np.arange(300_000)), timeout=60).sum() == \
            2 * np.arange(300_000).sum()
    finally:
        ctx.destroy(linger=0)
    assert not os.path.exists(canary), "bytes from a peer without the token were unpickled"
    assert cluster.head.poll() is None
    for p in processes:
        assert p.is_running() and p.status() != psutil.STATUS_ZOMBIE, p
        grown = p.memory_info().rss - rss_before[p.pid]
        assert grown < 50 << 20, f"pid {p.pid} grew by {grown / 2**20:.0f} MiB"
    assert_still_serving(cluster, {p.pid for p in workers})
