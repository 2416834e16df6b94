"""The direct exchange of gradient sums between an epoch's training tasks
(daskray.ml.collective), alone and inside Trainer.fit: exact bytes, the
authentication of every connection, a peer that dies or never comes, and the
trainer's redo and fallback paths."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

import daskray
from daskray.ml import (
    Dataset, FailureConfig, ScalingConfig, Trainer, collective, models, reference_fit,
)
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def _blobs(n=1200, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


# ---------------------------------------------------------------------- the mesh alone


def _join_all(spec, tag, ranks, body):
    """Run ``body(mesh)`` for each rank in a thread of its own; {rank: result or exception}."""
    results = {}

    def run(rank):
        try:
            with collective.Mesh.join(spec, tag, rank) as mesh:
                results[rank] = body(mesh)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return results


def _listening(name: str) -> list[str]:
    with open("/proc/net/unix") as f:
        return [line for line in f if f"@daskray-ml-{name}" in line]


def test_sums_pack_and_unpack_to_the_same_bits():
    rng = np.random.default_rng(0)
    sums = [({"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}, 17),
            ({"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}, 16),
            ({"s": np.float64(rng.normal()), "i": np.arange(4, dtype=np.int32),
              "e": np.zeros((0, 2)), "f": np.asfortranarray(rng.normal(size=(3, 4)))}, 1)]
    for _ in range(2):  # the second time from the cached layouts
        back = collective.unpack_sums(collective.pack_sums(sums))
        assert [rows for _, rows in back] == [17, 16, 1]
        for (got, _), (want, _) in zip(back, sums):
            assert list(got) == list(want)
            for key in want:
                expected = np.asarray(want[key])
                assert got[key].dtype == expected.dtype and got[key].shape == expected.shape
                assert got[key].tobytes() == np.ascontiguousarray(expected).tobytes()
    with pytest.raises(TypeError, match="dtype object"):
        collective.pack_sums([({"w": np.array([object()])}, 1)])
    with pytest.raises(collective.CollectiveError, match="too many"):
        collective.unpack_sums(collective.pack_sums(sums) + b"x")


def test_three_ranks_exchange_messages_larger_than_socket_buffers():
    spec = collective.new_spec(3, timeout=30)
    big = {r: os.urandom(3 << 20) + bytes([r]) for r in range(3)}  # 3 MiB each way

    def body(mesh):
        small = mesh.exchange(bytes([mesh.rank]) * 10)
        large = mesh.exchange(big[mesh.rank])
        return ({r: bytes(v) for r, v in small.items()}, {r: bytes(v) for r, v in large.items()})

    results = _join_all(spec, "t", range(3), body)
    for rank in range(3):
        small, large = results[rank]
        others = [r for r in range(3) if r != rank]
        assert small == {r: bytes([r]) * 10 for r in others}
        assert large == {r: big[r] for r in others}
    assert _listening(spec[1]) == []  # every socket closed, no name left bound


def test_a_connection_without_the_key_is_dropped_and_the_real_peer_still_joins():
    import socket

    spec = collective.new_spec(2, timeout=30)
    intruder_done = threading.Event()
    seen = []

    def intruder():
        # waits for rank 0 to listen, then says hello with a nonce but cannot prove the key
        assert wait_until(lambda: _listening(spec[1]), 20)
        address = "\0" + _listening(spec[1])[0].split()[-1][1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        sock.sendall(np.array([1, 0], dtype="<i4").tobytes() + os.urandom(32))
        reply = sock.recv(64)
        sock.sendall(b"\0" * 32)  # a wrong proof
        seen.append((len(reply), sock.recv(1)))  # closed by rank 0: b""
        sock.close()
        intruder_done.set()

    thread = threading.Thread(target=intruder)
    thread.start()
    rank0 = {}

    def run0():
        with collective.Mesh.join(spec, "t", 0) as mesh:
            rank0["got"] = bytes(mesh.exchange(b"zero")[1])

    t0 = threading.Thread(target=run0)
    t0.start()
    assert intruder_done.wait(30)
    with collective.Mesh.join(spec, "t", 1) as mesh:
        assert bytes(mesh.exchange(b"one")[0]) == b"zero"
    t0.join(30)
    thread.join(30)
    assert rank0["got"] == b"one"
    assert seen == [(64, b"")]
    # a rank with the wrong key never joins: it times out
    wrong = (os.urandom(32), *spec[1:3], 0.5)
    results = _join_all(spec[:3] + (0.5,), "u", [0], lambda mesh: None)
    assert isinstance(results[0], collective.RendezvousTimeout)
    both = {}

    def run(rank, s):
        try:
            with collective.Mesh.join(s, "v", rank):
                both[rank] = "joined"
        except collective.RendezvousTimeout as exc:
            both[rank] = exc

    threads = [threading.Thread(target=run, args=(0, spec[:3] + (1.0,))),
               threading.Thread(target=run, args=(1, wrong[:3] + (1.0,)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(v, collective.RendezvousTimeout) for v in both.values()), both


def test_a_peer_that_closes_mid_epoch_is_reported_at_once():
    spec = collective.new_spec(2, timeout=30)

    def body(mesh):
        mesh.exchange(b"step 0")
        if mesh.rank == 1:
            return "left"  # closes its sockets
        return mesh.exchange(b"step 1")

    results = _join_all(spec, "t", range(2), body)
    assert results[1] == "left"
    assert isinstance(results[0], collective.PeerLost)


def test_a_rank_alone_times_out_and_leaves_nothing_bound():
    spec = collective.new_spec(2, timeout=0.3)
    for rank in (0, 1):
        results = _join_all(spec, f"alone{rank}", [rank], lambda mesh: None)
        assert isinstance(results[rank], collective.RendezvousTimeout)
        assert "did not" in str(results[rank])
    assert _listening(spec[1]) == []
    with pytest.raises(ValueError, match="at least 2"):
        collective.new_spec(1)


# ---------------------------------------------------------------------- inside Trainer.fit


CONFIG = {"optimizer": "adam", "lr": 0.05, "batch_size": 96, "epochs": 3, "l2": 1e-3}


@pytest.fixture
def blobs(cluster, monkeypatch):
    """A dataset of 6 shards in two groups of 3, every fit, whichever workers the
    driver's shards were located on (after a worker was replaced they may all
    seem to be on one), and the parameters reference_fit computes.  The shards
    are put by the driver and small: no worker holds them, so the scheduler may
    run each group's task on any worker, as the forced groups assume."""
    from daskray.ml import trainer

    here = trainer._where()

    def two_groups(data, n_groups):
        if n_groups == 1 or data.num_shards < 2:
            return [list(range(data.num_shards))], [None]
        groups = [list(range(0, data.num_shards, 2)), list(range(1, data.num_shards, 2))]
        return groups, [(*here[:2], 1), (*here[:2], 2)]

    monkeypatch.setattr(Trainer, "_groups", staticmethod(two_groups))
    # a worker an earlier test killed is replaced: both must be up for the mesh
    assert wait_until(lambda: daskray.cluster_resources()["CPU"] >= 2, 60)
    X, y = _blobs()
    ds = Dataset.from_numpy(X, y, num_shards=6, seed=1)
    reference = reference_fit(models.SoftmaxRegression(), daskray.get(ds.shards), CONFIG,
                              classes=ds.classes)
    return ds, reference


def _same(params, reference):
    for key in reference:
        assert np.array_equal(params[key], reference[key]), key


def _no_mesh_sockets():
    with open("/proc/net/unix") as f:
        return [line for line in f if "@daskray-ml-" in line]


def test_two_workers_exchange_directly_and_match_the_reference(blobs):
    ds, reference = blobs
    # put by the driver (as ds is), not split by tasks: the groups the fixture forces
    # then agree with where the scheduler runs their tasks (no worker holds a shard)
    X, y = _blobs(seed=5)
    train = Dataset.from_numpy(X[:900], y[:900], num_shards=6, seed=2)
    valid = Dataset.from_numpy(X[900:], y[900:], num_shards=2, seed=2)
    trainer = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2))
    result = trainer.fit(ds)
    assert trainer.epoch_paths == {0: "mesh", 1: "mesh", 2: "mesh"}, trainer.fallback_reason
    _same(result.checkpoint.params, reference)
    # with validation and an evaluator, as the graph path computes them
    graph = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                    scaling_config=ScalingConfig(num_workers=2), evaluator=_Accuracy())
    graph._mesh_spec = lambda layout: (None, "the test asks for the graph path")
    mesh = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                   scaling_config=ScalingConfig(num_workers=2), evaluator=_Accuracy())
    by_graph, by_mesh = graph.fit(train, valid=valid), mesh.fit(train, valid=valid)
    assert set(graph.epoch_paths.values()) == {"graph"}
    assert set(mesh.epoch_paths.values()) == {"mesh"}
    assert by_graph.metrics_dataframe.equals(by_mesh.metrics_dataframe)
    assert "score" in by_mesh.metrics_dataframe
    _same(by_mesh.checkpoint.params, by_graph.checkpoint.params)
    assert wait_until(lambda: not _no_mesh_sockets(), 10), _no_mesh_sockets()


class _Accuracy:
    def __call__(self, predictions, labels):
        return float(np.mean(predictions == labels))


class _KillOnce(models.SoftmaxRegression):
    """SoftmaxRegression whose gradient kills its own process, once (a file marks
    it), from its ``call``-th call on: mid-epoch when that is inside the first epoch."""

    def __init__(self, marker: str, call: int) -> None:
        self.marker, self.at = marker, (0, call)
        self.calls = 0

    def gradient(self, params, X, y):
        self.calls += 1
        if self.calls >= 1 + self.at[1]:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().gradient(params, X, y)


@pytest.mark.parametrize("replaced", [True, False], ids=["replacement-up", "still-down"])
def test_a_worker_killed_mid_epoch_redoes_the_epoch_with_the_same_bits(blobs, tmp_path,
                                                                      monkeypatch, replaced):
    ds, _ = blobs
    config = {**CONFIG, "epochs": 5}
    reference = reference_fit(models.SoftmaxRegression(), daskray.get(ds.shards), config,
                              classes=ds.classes)
    # 1200 rows / 96 = 13 steps of 3 gradient calls per group: the worker dies at
    # step 5 of the first epoch
    marker = str(tmp_path / "killed")
    model = _KillOnce(marker, 5 * 3)
    workers_back = Trainer._workers_back

    def after_the_kill(layout):
        """Before the kill, the truth; after it, the replacement is awaited (it is then
        up when the epoch is redone) or taken as not up yet, whatever the timing."""
        if not os.path.exists(marker):
            return workers_back(layout)
        return replaced and wait_until(lambda: workers_back(layout), 60)

    monkeypatch.setattr(Trainer, "_workers_back", staticmethod(after_the_kill))
    trainer = Trainer(model=model, train_config=config,
                      scaling_config=ScalingConfig(num_workers=2),
                      failure_config=FailureConfig(max_failures=2))
    result = trainer.fit(ds)
    assert os.path.exists(marker)  # a worker did die
    assert [epoch for epoch, _ in trainer.redone] == [0], trainer.redone
    assert len(result.metrics_dataframe) == config["epochs"]
    _same(result.checkpoint.params, reference)
    # the task graph trains while a worker is missing; with both up, the mesh
    paths = [trainer.epoch_paths[e] for e in range(config["epochs"])]
    assert paths == ["mesh" if replaced else "graph"] * config["epochs"]
    assert wait_until(lambda: not _no_mesh_sockets(), 10), _no_mesh_sockets()


class _Fails(models.SoftmaxRegression):
    """Raises at its ``after``-th gradient call (in a worker: the model travels to
    each task in a pickle)."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def gradient(self, params, X, y):
        self.calls += 1
        if self.calls == self.after:
            raise ArithmeticError("the model's own error")
        return super().gradient(params, X, y)


def test_an_error_of_the_model_is_raised_as_itself_not_retried(blobs):
    ds, _ = blobs
    trainer = Trainer(model=_Fails(after=7), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2),
                      failure_config=FailureConfig(max_failures=5))
    with pytest.raises(ArithmeticError, match="own error"):
        trainer.fit(ds)
    assert trainer.epoch_paths[0] == "mesh", (trainer.epoch_paths, trainer.fallback_reason)
    assert wait_until(lambda: not _no_mesh_sockets(), 10), _no_mesh_sockets()


def _hold(release: str, shard) -> int:
    """Keep the worker holding ``shard`` busy until ``release`` exists."""
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def test_tasks_that_cannot_run_together_fall_back_to_the_task_graph(blobs, tmp_path,
                                                                    monkeypatch):
    ds, reference = blobs
    release = str(tmp_path / "release")
    holders = []
    mesh_spec = Trainer._mesh_spec

    def spec_then_busy(layout):
        spec, reason = mesh_spec(layout)
        if not holders:  # the worker holding the second group is busy from now on
            holders.append(daskray.remote(_hold).remote(release, layout.shards[1][0]))
        return spec, reason

    monkeypatch.setattr(Trainer, "_mesh_spec", staticmethod(spec_then_busy))
    monkeypatch.setattr(collective, "RENDEZVOUS_SECONDS", 1.0)
    trainer = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2))

    def release_on_fallback():
        wait_until(lambda: trainer.__dict__.get("epoch_paths", {}).get(0) == "graph"
                   or os.path.exists(release), 60)
        open(release, "w").close()

    releaser = threading.Thread(target=release_on_fallback)
    releaser.start()
    try:
        result = trainer.fit(ds)
    finally:
        open(release, "w").close()
        releaser.join(30)
    assert "did not all run at once" in trainer.fallback_reason
    assert set(trainer.epoch_paths.values()) == {"graph"}
    _same(result.checkpoint.params, reference)
    daskray.get(holders)
    assert wait_until(lambda: not _no_mesh_sockets(), 10), _no_mesh_sockets()


def test_the_dask_distributed_backend_trains_by_the_task_graph(backend):
    X, y = _blobs(n=600)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=1)
    trainer = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2))
    params = trainer.fit(ds).checkpoint.params
    reference = reference_fit(models.SoftmaxRegression(), daskray.get(ds.shards), CONFIG,
                              classes=ds.classes)
    _same(params, reference)
    if backend == "distributed":
        assert set(trainer.epoch_paths.values()) == {"graph"}
        # two groups: the reason names the backend; one group has nothing to exchange
        assert trainer.fallback_reason is None or "distributed" in trainer.fallback_reason


def test_a_worker_killed_with_no_failures_allowed_fails_the_fit(blobs, tmp_path):
    ds, _ = blobs
    trainer = Trainer(model=_KillOnce(str(tmp_path / "killed"), 5 * 3), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2),
                      failure_config=FailureConfig(max_failures=0))
    with pytest.raises(daskray.WorkerCrashedError):
        trainer.fit(ds)
    assert trainer.epoch_paths[0] == "mesh"
    assert wait_until(lambda: not _no_mesh_sockets(), 10), _no_mesh_sockets()


def test_more_groups_than_workers_train_by_the_task_graph(blobs, monkeypatch):
    ds, reference = blobs
    from daskray.ml import trainer as module

    here = module._where()
    monkeypatch.setattr(Trainer, "_groups", staticmethod(
        lambda data, n: ([[0, 3], [1, 4], [2, 5]], [(*here[:2], k) for k in range(3)])
        if n > 1 else ([list(range(data.num_shards))], [None])))
    trainer = Trainer(model=models.SoftmaxRegression(), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=3))
    _same(trainer.fit(ds).checkpoint.params, reference)
    assert set(trainer.epoch_paths.values()) == {"graph"}
    assert "fewer workers than the 3 groups" in trainer.fallback_reason


def test_groups_are_evened_out_while_each_keeps_most_of_its_own_shards():
    from daskray.ml.trainer import balance_groups

    assert balance_groups([[0, 2], [1, 3, 4, 5, 6, 7]]) == [[0, 2, 7], [1, 3, 4, 5, 6]]
    assert balance_groups([[0, 1, 2, 3, 4, 5, 6], [7]]) == [[0, 1, 2, 3, 4, 5, 6], [7]]
    assert balance_groups([[0, 2, 4, 6], [1, 3, 5, 7]]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert balance_groups([list(range(10)), [10, 11, 12, 13]]) == \
        [list(range(7)), [7, 8, 9, 10, 11, 12, 13]]
    assert balance_groups([[0, 3, 6, 7, 8], [1, 4], [2, 5]]) == [[0, 3, 6], [1, 4, 8], [2, 5, 7]]
    assert balance_groups([[3]]) == [[3]]


class _SlowOnce(models.SoftmaxRegression):
    """SoftmaxRegression that logs each gradient call's process, and is slow (20 ms
    a call) in the first process that calls it: a process that gets no CPU."""

    def __init__(self, log: str) -> None:
        self.log = log

    def gradient(self, params, X, y):
        import time

        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(self.log) as f:
            if f.readline().strip() == str(os.getpid()):
                time.sleep(0.02)  # the slow process: another's CPU time, not a wait
        return super().gradient(params, X, y)


def test_a_slow_group_has_its_sums_computed_by_the_others_with_the_same_bits(blobs, tmp_path):
    ds, reference = blobs
    log = str(tmp_path / "calls")
    trainer = Trainer(model=_SlowOnce(log), train_config=CONFIG,
                      scaling_config=ScalingConfig(num_workers=2))
    result = trainer.fit(ds)
    assert set(trainer.epoch_paths.values()) == {"mesh"}, trainer.fallback_reason
    _same(result.checkpoint.params, reference)
    with open(log) as f:
        calls = f.read().split()
    slow, counts = calls[0], {pid: calls.count(pid) for pid in set(calls)}
    own = 3 * 13 * CONFIG["epochs"]  # 3 shards a group, 13 steps an epoch
    fast = [n for pid, n in counts.items() if pid != slow]
    assert fast and max(fast) > own, counts  # the fast group computed others' sums too
