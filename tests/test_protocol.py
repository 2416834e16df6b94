"""The wire protocol's typed records, as plain data: no process is started.

A worker's reports and the tasks of a ``Run`` travel as NamedTuples of the
protocol; the decoder lets exactly these classes through (see protocol.py).
"""

from __future__ import annotations

import pickle
import zlib
from typing import NamedTuple

import pytest

from daskray.runtime import protocol as P
from daskray.runtime import records as R
from daskray.scheduler import events as E


def _framed(payload: bytes) -> bytes:
    """``payload`` with the checksum a message frame starts with."""
    return zlib.crc32(payload).to_bytes(4, "little") + payload


REPORTS = [
    R.FinishedReport(task=7, nbytes=8, inline=b"v", duration=0.5, contained=((b"c", 1, 0),)),
    R.ErredReport(task=8, error=b"pickled exception"),
    R.StartedReport(task=9),
    R.ReleasedReport(task=10),
    R.RefsReport(added=[(b"c", 1, 0)], dropped=[]),
    R.BlockedReport(blocked=True, task=11, awaits=((b"c", 2, 0),), nest=False),
    R.BlockedReport(blocked=False, task=11),
]


def test_reports_travel_as_their_record_types():
    decoded = P.decode(P.encode(P.Reports(REPORTS)))
    assert decoded.items == REPORTS
    assert [type(r) for r in decoded.items] == [type(r) for r in REPORTS]
    assert decoded.items[0].contained == ((b"c", 1, 0),)


def test_run_tasks_travel_as_records():
    task = R.RunTask(task=3, table_id=b"t" * 16, body=b"body", deps=((1, ("local",)),),
                     notify=False, parent=None, depth=1)
    decoded = P.decode(P.encode(P.Run([task], {b"t" * 16: b"table"})))
    assert decoded.tasks == [task] and type(decoded.tasks[0]) is R.RunTask
    assert decoded.tasks[0].deps == ((1, ("local",)),)


class _Impostor:
    """Pickles as a call of ``target`` with ``args``."""

    def __init__(self, target, args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


def test_only_the_protocols_records_may_be_named():
    """A function of the protocol module itself is no record: refused."""
    payload = pickle.dumps((P.Reports.TAG, [_Impostor(P.encode, (P.Stop(),))]), protocol=5)
    with pytest.raises(P.ProtocolError, match="may not refer to daskray.runtime.protocol.encode"):
        P.decode(_framed(payload))


class FinishedReport(NamedTuple):  # a record's name, in another module
    task: int


def test_a_class_named_like_a_record_elsewhere_is_refused():
    payload = pickle.dumps((P.Reports.TAG, [FinishedReport(1)]), protocol=5)
    with pytest.raises(P.ProtocolError, match=f"may not refer to {__name__}.FinishedReport"):
        P.decode(_framed(payload))


def test_a_record_with_the_wrong_number_of_fields_is_refused():
    payload = pickle.dumps((P.Reports.TAG, [_Impostor(R.FinishedReport, (1, 2))]), protocol=5)
    with pytest.raises(P.ProtocolError, match="undecodable"):
        P.decode(_framed(payload))


def test_only_a_namedtuple_can_be_made_a_record():
    with pytest.raises(TypeError, match="NamedTuple"):
        R.record(type("Loose", (), {}))


def test_a_graph_event_takes_all_but_its_core_fields_by_name():
    """Past ``wanted`` (groups, fail_fast, ...) a value means nothing by its place."""
    core = ((b"c", 1), ["t"], [()], [0], [b"body"], {}, [0])
    assert E.GraphSubmitted(*core, groups=["g"]).groups == ["g"]
    with pytest.raises(TypeError):
        E.GraphSubmitted(*core, ["g"])
