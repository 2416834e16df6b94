"""``Dataset``: labelled rows cut into logical shards that live in the object store.

The shards are fixed by the data and a seed, never by the number of workers, so
training on one worker or on two sees the same shards and, with the trainer's
fixed reduction order, computes bit-identical parameters.  Every shard is a
``(X, y)`` pair of float64 features and labels, stored once with
``daskray.put`` (shared memory: tasks read it in place); splitting and
standardizing run as tasks next to the shards, not in the driver.

Arrow data (``from_arrow``, ``read_parquet``) becomes the same float64 shards as
the same rows given as a pandas DataFrame: a model trained on either is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

import daskray


def _as_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
    if X.ndim == 1:
        X = X[:, None]
    y = np.ascontiguousarray(np.asarray(y))
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"expected X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
    return X, y


def _split_shard(shard: tuple, test_size: float, seed: int) -> tuple[tuple, tuple]:
    X, y = shard
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_size))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (X[train], y[train]), (X[test], y[test])


def _shard_sums(shard: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    X, _ = shard
    return len(X), X.sum(axis=0), (X * X).sum(axis=0)


def _standardize_shard(shard: tuple, mean: np.ndarray, scale: np.ndarray) -> tuple:
    X, y = shard
    return (X - mean) / scale, y


def _shard_of_frame(part: Any, label: str) -> tuple:
    return _as_xy(part.drop(columns=[label]).to_numpy(dtype=np.float64), part[label].to_numpy())


def _shard_of_blocks(x: np.ndarray, y: np.ndarray) -> tuple:
    return _as_xy(x, y)


@dataclass
class Standardization:
    """Feature means and scales, from training data, to apply to other data too."""

    mean: np.ndarray
    scale: np.ndarray


class Dataset:
    """Shards of ``(X, y)`` in the cluster; see the module docstring."""

    def __init__(self, shards: Sequence[daskray.ObjectRef], sizes: Sequence[int],
                 n_features: int, classes: np.ndarray | None = None) -> None:
        self.shards = list(shards)
        self.sizes = list(sizes)
        self.n_features = n_features
        #: the labels seen, for classification (None: a regression target)
        self.classes = classes

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"Dataset({self.num_rows} rows, {self.n_features} features, {self.num_shards} shards)"

    # ---------------------------------------------------------------- making one

    @classmethod
    def from_numpy(cls, X: Any, y: Any, num_shards: int = 8, seed: int = 0,
                   shuffle: bool = True) -> "Dataset":
        """Rows shuffled by ``seed`` (unless ``shuffle=False``), cut into ``num_shards``."""
        X, y = _as_xy(X, y)
        if num_shards < 1 or num_shards > len(y):
            raise ValueError(f"num_shards must be between 1 and the number of rows, got {num_shards}")
        order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
        parts = np.array_split(order, num_shards)
        shards = [daskray.put((np.ascontiguousarray(X[p]), np.ascontiguousarray(y[p])))
                  for p in parts]
        return cls(shards, [len(p) for p in parts], X.shape[1], _classes(y))

    @classmethod
    def from_pandas(cls, df: Any, label: str, num_shards: int = 8, seed: int = 0,
                    shuffle: bool = True) -> "Dataset":
        """Every column but ``label`` is a feature (they must be numeric)."""
        if label not in df.columns:
            raise KeyError(f"label column {label!r} is not in the DataFrame")
        X = df.drop(columns=[label]).to_numpy(dtype=np.float64)
        return cls.from_numpy(X, df[label].to_numpy(), num_shards, seed, shuffle)

    @classmethod
    def from_arrow(cls, data: Any, label: str, num_shards: int = 8, seed: int = 0,
                   shuffle: bool = True) -> "Dataset":
        """From a ``pyarrow.Table``, a ``RecordBatch``, a ``RecordBatchReader`` or an
        iterable of batches or tables (one schema), as :meth:`from_pandas` would from
        the same rows: every column but ``label`` is a numeric feature (integer,
        floating, boolean or decimal; nulls become NaN).  The rows are shuffled and
        cut in the driver, as in :meth:`from_numpy`."""
        table = _as_table(data)
        X, y = _arrow_xy(table, label)
        return cls.from_numpy(X, y, num_shards, seed, shuffle)

    @classmethod
    def read_parquet(cls, path_or_paths: Any, label: str, columns: Sequence[str] | None = None,
                     num_shards: int = 8, seed: int = 0, shuffle: bool = True,
                     filters: Any = None, filesystem: Any = None) -> "Dataset":
        """Rows of Parquet files -- one path, a directory of files, or a list of paths,
        read in that order -- as :meth:`from_arrow`.  ``columns`` chooses the
        features (the ``label`` column is read whether named there or not);
        ``filters`` and ``filesystem`` are ``pyarrow.parquet.read_table``'s.  The
        files are read by the driver: for data larger than its memory use
        ``from_dask(dask.dataframe.read_parquet(...), label=...)``."""
        import pyarrow.parquet as pq

        if columns is not None:
            columns = list(columns) + ([label] if label not in columns else [])
        table = pq.read_table(path_or_paths, columns=columns, filters=filters,
                              filesystem=filesystem)
        return cls.from_arrow(table, label, num_shards, seed, shuffle)

    @classmethod
    def from_dask(cls, data: Any, y: Any = None, label: str | None = None) -> "Dataset":
        """Shards are the chunks of a dask array (with labels ``y``, chunked alike) or
        the partitions of a dask DataFrame (labels in column ``label``); they are
        computed on the cluster and stay there."""
        import dask

        if label is not None:
            parts = data.to_delayed()
            pieces = [dask.delayed(_shard_of_frame)(p, label) for p in parts]
        else:
            if y is None:
                raise ValueError("from_dask of an array needs the labels y (a dask array)")
            data = data.rechunk({1: data.shape[1]})
            y = y.rechunk((data.chunks[0],))
            pieces = [dask.delayed(_shard_of_blocks)(xb, yb) for xb, yb in
                      zip(data.to_delayed().ravel(), y.to_delayed().ravel())]
        persisted = dask.persist(*pieces, scheduler=daskray.get)
        shards = [next(iter(dict(p.dask).values())) for p in persisted]
        sizes, n_features, classes = _describe(shards)
        return cls(shards, sizes, n_features, classes)

    # ---------------------------------------------------------------- deriving

    def train_test_split(self, test_size: float = 0.2, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Each shard split by a seeded draw: (train, test), shard for shard."""
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size must be between 0 and 1, got {test_size}")
        split = daskray.remote(num_returns=2)(_split_shard)
        pairs = [split.remote(s, test_size, seed * 1_000_003 + i) for i, s in enumerate(self.shards)]
        n_test = [int(round(n * test_size)) for n in self.sizes]
        train = Dataset([p[0] for p in pairs], [n - t for n, t in zip(self.sizes, n_test)],
                        self.n_features, self.classes)
        test = Dataset([p[1] for p in pairs], n_test, self.n_features, self.classes)
        return train, test

    def standardize(self, stats: Standardization | None = None
                    ) -> tuple["Dataset", Standardization]:
        """Features centred and scaled; by this data's own statistics unless ``stats``
        (from the training data) are given.  Returns the new dataset and the stats."""
        if stats is None:
            sums = daskray.get([daskray.remote(_shard_sums).remote(s) for s in self.shards])
            n = sum(s[0] for s in sums)
            total = np.sum([s[1] for s in sums], axis=0)
            squares = np.sum([s[2] for s in sums], axis=0)
            mean = total / n
            var = np.maximum(squares / n - mean * mean, 0.0)
            scale = np.sqrt(var)
            scale[scale == 0] = 1.0
            stats = Standardization(mean, scale)
        task = daskray.remote(_standardize_shard)
        shards = [task.remote(s, stats.mean, stats.scale) for s in self.shards]
        return Dataset(shards, self.sizes, self.n_features, self.classes), stats

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows in the driver, shard after shard (for checks and small data)."""
        parts = daskray.get(self.shards)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _as_table(data: Any) -> Any:
    """One ``pyarrow.Table`` of whatever Arrow data :meth:`Dataset.from_arrow` takes."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        parts = list(data)
        if parts and all(isinstance(p, pa.RecordBatch) for p in parts):
            return pa.Table.from_batches(parts)
        if parts and all(isinstance(p, pa.Table) for p in parts):
            return pa.concat_tables(parts)
        if not parts:
            raise ValueError("from_arrow got no batches: give at least one RecordBatch or Table")
    raise TypeError(
        f"from_arrow takes a pyarrow Table, RecordBatch, RecordBatchReader or a list of "
        f"RecordBatches or of Tables, got {type(data).__qualname__}; for pandas data use "
        "Dataset.from_pandas")


def _arrow_xy(table: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (every column but ``label``, as float64) and labels of a table,
    the values ``DataFrame.to_numpy(dtype=float64)`` gives for the same rows."""
    if label not in table.column_names:
        raise KeyError(f"label column {label!r} is not in the table; its columns are "
                       f"{table.column_names}")
    features = [name for name in table.column_names if name != label]
    _check_numeric(table, features)
    X = np.empty((table.num_rows, len(features)), dtype=np.float64)
    for j, name in enumerate(features):
        X[:, j] = np.asarray(table.column(name).to_numpy(), dtype=np.float64)
    y = table.column(label).to_pandas().to_numpy()  # pandas' view of nulls and categories
    return X, y


def _check_numeric(table: Any, features: list[str]) -> None:
    """Refuse feature columns that have no float value, naming them."""
    import pyarrow as pa

    def numeric(kind: Any) -> bool:
        return (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind) or pa.types.is_decimal(kind)
                or pa.types.is_null(kind))

    bad = [f"{name} ({table.schema.field(name).type})" for name in features
           if not numeric(table.schema.field(name).type)]
    if bad:
        raise TypeError(
            f"feature columns must be numeric, these are not: {', '.join(bad)}. Leave them "
            "out (read_parquet(columns=[...]) or table.drop_columns([...])) or encode them "
            "as numbers first")


def _classes(y: np.ndarray) -> np.ndarray | None:
    if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)
                                 and len(np.unique(y)) <= 1000):
        return np.unique(y)
    return None


def _describe_shard(shard: tuple) -> tuple[int, int, np.ndarray]:
    X, y = shard
    return len(y), X.shape[1], np.unique(y) if y.dtype.kind in "iub" else np.array([])


def _describe(shards: list) -> tuple[list[int], int, np.ndarray | None]:
    infos = daskray.get([daskray.remote(_describe_shard).remote(s) for s in shards])
    classes = np.unique(np.concatenate([i[2] for i in infos])) if infos else None
    return [i[0] for i in infos], infos[0][1] if infos else 0, classes if len(classes) else None
