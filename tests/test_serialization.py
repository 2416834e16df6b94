"""Task bodies and their shared function table (runtime/serialization.py), as data."""

from __future__ import annotations

import operator

import numpy as np

from daskray.runtime.serialization import GraphEncoder, decode_table, decode_task


def _make_closure(offset: int):
    def shift(x):
        return x + offset
    return shift


class Local:
    """Stands in for a class made where workers cannot import it."""


def test_functions_go_to_the_table_once_and_plain_data_stays_in_the_body():
    shift = _make_closure(5)
    state = list(range(624))  # a random state: plain ints, no table entry each
    enc = GraphEncoder()
    blobs = [enc.encode_task((shift, i, state, {"op": operator.add}), f"t{i}") for i in range(3)]
    assert enc.table_size == 1  # the closure, whatever the task count (add is a builtin)
    table = decode_table(enc.encode_table())
    for i, blob in enumerate(blobs):
        fn, n, got_state, extra = decode_task(blob, table)
        assert fn(n) == i + 5 and got_state == state and extra["op"](2, 3) == 5
    assert decode_task(blobs[0], table)[0] is decode_task(blobs[1], table)[0]


def test_classes_made_in_a_function_travel_in_the_table_and_arrays_in_the_body():
    made = type("Made", (Local,), {"__qualname__": "f.<locals>.Made"})
    enc = GraphEncoder()
    array = np.arange(10.0)
    blob = enc.encode_task((made, array, Local), "t")
    table = enc._table
    assert made in table and Local not in table  # Local is importable by name; Made is not
    got_made, got_array, got_local = decode_task(blob, decode_table(enc.encode_table()))
    assert got_made.__name__ == "Made" and got_local is Local
    np.testing.assert_array_equal(got_array, array)


def test_a_preloaded_function_is_entry_zero_and_tables_do_not_mix():
    shift, other = _make_closure(1), _make_closure(100)
    first, second = GraphEncoder(preload=[shift]), GraphEncoder(preload=[other])
    blob_a, blob_b = first.encode_task((shift, 1), "a"), second.encode_task((other, 1), "b")
    assert first.table_size == second.table_size == 1
    table_a, table_b = decode_table(first.encode_table()), decode_table(second.encode_table())
    fn, x = decode_task(blob_a, table_a)
    assert fn(x) == 2
    fn, x = decode_task(blob_b, table_b)
    assert fn(x) == 101


class _EqualsAny(type):
    def __eq__(cls, other):  # defines __eq__ without __hash__: its classes are unhashable
        return True


class Unhashable(metaclass=_EqualsAny):
    pass


def test_a_class_whose_name_was_rebound_or_that_is_unhashable_still_travels(monkeypatch):
    import sys

    original = Local
    enc = GraphEncoder()
    enc.encode_task((original,), "first")  # importable by name the first time
    monkeypatch.setattr(sys.modules[original.__module__], "Local", type("Other", (), {}))
    enc = GraphEncoder()
    blob = enc.encode_task((original, Unhashable), "t")  # e.g. after %autoreload
    got, unhashable = decode_task(blob, decode_table(enc.encode_table()))
    assert got.__name__ == "Local" and got.__doc__ == original.__doc__
    assert unhashable is Unhashable
