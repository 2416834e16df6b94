"""The route of actor calls between the driver and the head (issue 13): a burst
of calls leaves the driver in a few messages, and their results come back in a
few, not one message (and one wake-up of each process) per call."""

from __future__ import annotations

import os

import pytest

import daskray
from daskray.runtime import client as client_module
from daskray.runtime import protocol as P
from helpers import mark_started, wait_for_path, wait_until

pytestmark = pytest.mark.timeout(120)

#: calls submitted in one burst
BURST = 500


@daskray.remote
class Gate:
    """An actor whose first call holds up the calls queued behind it until a
    file appears."""

    def hold(self, started: str, release: str, timeout: float) -> bool:
        mark_started(started)
        return wait_until(lambda: os.path.exists(release), timeout)

    def small(self) -> int:
        return 0


# ---------------------------------------------------------------- the Batch message


def test_messages_go_as_one_batch_in_order():
    msgs = [P.SubscribeRefs([(b"c", i, 0)]) for i in range(5)]
    frames = P.batches([P.encode(m) for m in msgs])
    assert len(frames) == 1
    batch = P.decode(frames[0])
    assert type(batch) is P.Batch
    assert [P.decode_batched(d) for d in P.batch_items(batch)] == msgs


def test_a_single_message_is_not_wrapped():
    data = P.encode(P.SubscribeRefs([(b"c", 1, 0)]))
    assert P.batches([data]) == [data]
    assert P.batches([]) == []


def test_batches_stay_under_their_byte_limit_and_keep_the_order(monkeypatch):
    monkeypatch.setattr(P, "BATCH_BYTES", 1000)
    msgs = [P.PutObject(i, f"put-{i}", b"x" * 300, None, 300, None, None) for i in range(10)]
    big = P.PutObject(99, "put-99", b"y" * 5000, None, 5000, None, None)
    frames = P.batches([P.encode(m) for m in msgs[:5]] + [P.encode(big)]
                       + [P.encode(m) for m in msgs[5:]])
    assert all(len(f) <= 1000 or P.decode(f) == big for f in frames)
    out = []
    for frame in frames:
        msg = P.decode(frame)
        out.extend([P.decode_batched(d) for d in P.batch_items(msg)]
                   if type(msg) is P.Batch else [msg])
    assert out == msgs[:5] + [big] + msgs[5:]


def test_a_batch_inside_a_batch_is_refused():
    inner = P.encode(P.Batch((P.encode(P.Stop()),)))
    with pytest.raises(P.ProtocolError, match="may not hold a Batch"):
        P.decode_batched(inner)


def test_a_batch_of_anything_but_encoded_messages_is_refused():
    with pytest.raises(P.ProtocolError, match="encoded messages"):
        P.batch_items(P.decode(P.encode(P.Batch(([1, 2],)))))
    with pytest.raises(P.ProtocolError):
        P.decode_batched(b"not a message")


# ---------------------------------------------------------------- on a cluster


def _held_gate(tmp_path):
    """An actor busy with a call that ends when the returned path is created."""
    gate = Gate.remote()
    started, release = tmp_path / "started", tmp_path / "release"
    held = gate.hold.remote(str(started), str(release), 60.0)
    wait_for_path(started)
    return gate, held, release


def test_a_burst_of_calls_reaches_the_head_in_a_few_messages(cluster, tmp_path, monkeypatch):
    """Calls queued while the driver's I/O thread is busy leave together, as one
    message, and each still runs once, in order."""
    gate, held, release = _held_gate(tmp_path)
    sent = []
    send = client_module.transport.send_message

    def counted(sock, data, prefix=()):
        sent.append(len(data))
        return send(sock, data, prefix)

    monkeypatch.setattr(client_module.transport, "send_message", counted)
    refs = [gate.small.remote() for _ in range(BURST)]
    release.touch()
    assert daskray.get(held, timeout=60) is True
    assert daskray.get(refs, timeout=60) == [0] * BURST
    monkeypatch.undo()
    assert len(sent) < BURST // 2, f"{BURST} calls left the driver in {len(sent)} messages"


def test_results_ready_together_reach_the_driver_in_a_few_messages(
        cluster, tmp_path, monkeypatch):
    """The results of calls that end in one loop turn of the head travel to the
    driver as one message, not one each."""
    gate, held, release = _held_gate(tmp_path)
    refs = [gate.small.remote() for _ in range(BURST)]
    frames = []
    deliver = client_module.Client._deliver

    def counted(self, frame):
        frames.append(1)
        return deliver(self, frame)

    monkeypatch.setattr(client_module.Client, "_deliver", counted)
    release.touch()
    assert daskray.get(held, timeout=60) is True
    assert daskray.get(refs, timeout=60) == [0] * BURST
    monkeypatch.undo()
    assert len(frames) < BURST // 10, (
        f"{BURST} results reached the driver in {len(frames)} messages")
