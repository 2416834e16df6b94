"""Dask graphs on the dask.distributed backend (``daskray.get``, ``persist``)."""

from __future__ import annotations

from typing import Any

from ..errors import ClusterError


def get(session: Any, dsk: Any, keys: Any, **kwargs: Any) -> Any:
    raise ClusterError("dask graphs on the dask.distributed backend: not built yet")


def persist(session: Any, collections: list, optimize_graph: bool = True, **kwargs: Any) -> list:
    raise ClusterError("dask graphs on the dask.distributed backend: not built yet")
