"""A short tour on a local cluster: ``python -m daskray.demo``.

Runs a dask array, a DataFrame groupby and a delayed graph on daskray, checks each
against dask's serial scheduler, and prints the times.
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

import daskray


def _inc(x: int) -> int:
    return x + 1


def main() -> None:
    t0 = time.perf_counter()
    daskray.init()
    print(f"daskray.init(): {time.perf_counter() - t0:.2f} s")
    try:
        x = da.random.RandomState(0).random_sample((4000, 4000), chunks=1000)
        pdf = pd.DataFrame({"k": np.arange(400_000) % 100, "v": np.arange(400_000.0)})
        df = dd.from_pandas(pdf, npartitions=8)
        leaves = [dask.delayed(_inc)(i) for i in range(2000)]
        work = {
            "array (x + x.T).mean(axis=0).sum()": (x + x.T).mean(axis=0).sum(),
            "DataFrame groupby('k').v.mean().sum()": df.groupby("k").v.mean().sum(),
            "2,000 delayed tasks, summed": dask.delayed(sum)(leaves),
        }
        for name, obj in work.items():
            t = time.perf_counter()
            (value,) = dask.compute(obj)  # daskray is the default scheduler now
            elapsed = time.perf_counter() - t
            (expected,) = dask.compute(obj, scheduler="sync")
            ok = "ok" if np.isclose(value, expected) else f"MISMATCH (sync: {expected})"
            print(f"{name:40s} = {value:<20.6g} {elapsed:6.3f} s  {ok}")
    finally:
        daskray.shutdown()


if __name__ == "__main__":
    main()
