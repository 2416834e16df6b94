"""Objects across hosts (issue 3, scope 5): two stores on one machine that do not
share a namespace.

``init(_store_namespaces=2)`` gives worker 0 (with the driver and the head) one
store and worker 1 another, as if they ran on two hosts: a process maps only
files of its own store, and reads any other object over a socket from the
process that wrote it.  Workers are told apart by custom resources ``h0``/``h1``.
"""

from __future__ import annotations

import glob
import hashlib
import os

import dask.array as da
import numpy as np
import pytest
import zmq

import daskray
from helpers import start_cluster
import daskray.api
from daskray.runtime import protocol as P
from daskray.runtime import shared_memory, store_memory
from daskray.runtime import transport
from daskray.runtime.transport import ipc_address


pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs a writable /dev/shm")


def digest(arr) -> str:
    return hashlib.blake2b(memoryview(arr).cast("B")).hexdigest()


def random_array(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


@daskray.remote
def read(arr):
    """The array's digest, and the daskray files this worker has mapped right now."""
    with open(f"/proc/{os.getpid()}/maps") as f:
        mapped = {line.split()[-1] for line in f if "/dev/shm/daskray" in line}
    return digest(arr), sorted(mapped)


@daskray.remote
def make(n, seed):
    return random_array(n, seed)


@daskray.remote
def total(arr):
    return float(np.sum(arr))


def on(host: str) -> dict:
    return {"resources": {host: 1}}


@pytest.fixture
def two_hosts(cluster):
    daskray.shutdown()
    daskray.init(num_workers=2, resources=[{"h0": 1}, {"h1": 1}], _store_namespaces=2)
    c = daskray.api._runtime.cluster
    try:
        yield {h: store_memory.namespace_prefix(c.shm_prefix, i) for i, h in enumerate(("h0", "h1"))}
    finally:
        daskray.shutdown()
        start_cluster()


@pytest.mark.timeout(90)
def test_a_put_is_mapped_on_its_host_and_sent_to_the_other(two_hosts):
    big = random_array(4_000_000, seed=0)
    ref = daskray.put(big)
    (path,) = glob.glob(two_hosts["h0"] + "*")
    same, mapped_same = daskray.get(read.options(**on("h0")).remote(ref))
    other, mapped_other = daskray.get(read.options(**on("h1")).remote(ref))
    assert same == other == digest(big)
    assert path in mapped_same, "a reader on the object's host maps its file"
    assert not any(m.startswith(two_hosts["h0"]) for m in mapped_other), \
        "a reader on the other host must not map the first host's files"
    assert not glob.glob(two_hosts["h1"] + "*"), "the other host keeps no file of it"


@pytest.mark.timeout(90)
def test_a_worker_result_reaches_the_driver_and_a_worker_of_the_other_host(two_hosts):
    expected = digest(random_array(2_000_000, seed=1))
    ref = make.options(**on("h1")).remote(2_000_000, 1)
    # worker to worker, before the object was ever exported
    assert daskray.get(read.options(**on("h0")).remote(ref))[0] == expected
    # the driver is on h0: the result is exported into h1's store and sent over
    value = daskray.get(ref)
    assert digest(value) == expected
    assert glob.glob(two_hosts["h1"] + "*"), "exported into its own host's store"
    # exported now, and still read from the other host without mapping h1's files
    got, mapped = daskray.get(read.options(**on("h0")).remote(ref))
    assert got == expected
    assert not any(m.startswith(two_hosts["h1"]) for m in mapped)
    del value


@pytest.mark.timeout(90)
def test_a_dask_array_across_two_hosts_computes_like_sync(two_hosts):
    x = da.random.RandomState(0).random_sample((2000, 2000), chunks=(500, 500))
    expr = (x + x.T).mean(axis=0)
    np.testing.assert_array_equal(expr.compute(), expr.compute(scheduler="sync"))
    data = np.random.default_rng(3).random((2000, 2000))
    arr = da.from_array(data, chunks=(500, 2000))  # graph data written by the driver
    assert (arr * 2).sum().compute() == (arr * 2).sum().compute(scheduler="sync")


@pytest.mark.timeout(60)
def test_the_object_server_ignores_strangers_and_paths_outside_its_store(two_hosts, tmp_path):
    cluster = daskray.api._runtime.cluster
    ref = daskray.put(random_array(100_000, seed=4))
    assert daskray.get(total.options(**on("h1")).remote(ref)) > 0
    ctx = zmq.Context.instance()
    address = ipc_address(cluster.session_dir, "driver-objects.sock")
    stranger = ctx.socket(zmq.DEALER)  # no token at the handshake
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(address)
    sock = transport.dealer(ctx, address, cluster.token)
    try:
        secret = tmp_path / "secret"
        secret.write_bytes(b"not for you")
        forged = shared_memory.MARKER + __import__("pickle").dumps(
            (str(secret), None, [(0, 11)], None))
        # no token at the handshake: no answer at all, even with the token inside
        stranger.send_multipart([cluster.token, P.GETSHM, forged])
        assert not stranger.poll(500)
        # a wrong token inside the request: no answer either
        sock.send_multipart([b"x" * 32, P.GETSHM, forged])
        assert not sock.poll(500)
        # the right token, a path outside the store: refused
        sock.send_multipart([cluster.token, P.GETSHM, forged])
        assert sock.poll(5000)
        assert sock.recv_multipart()[0] == P.MISSING
        # garbage instead of a descriptor: refused, and the server keeps serving
        sock.send_multipart([cluster.token, P.GETSHM, b"garbage"])
        assert sock.poll(5000) and sock.recv_multipart()[0] == P.MISSING
    finally:
        sock.close(0)
        stranger.close(0)
    assert daskray.get(total.options(**on("h1")).remote(ref)) > 0
