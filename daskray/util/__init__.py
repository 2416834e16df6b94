"""Ray's ``ray.util`` names on daskray: integrations built on the public API only.

* :mod:`daskray.util.joblib` -- ``register_daskray()`` / ``register_ray()``: a joblib
  parallel backend, so scikit-learn's ``n_jobs`` work runs on the cluster;
* :mod:`daskray.util.multiprocessing` -- ``Pool``, the standard library's
  ``multiprocessing.Pool`` with the cluster's processes;
* :class:`ActorPool` -- ``daskray.ActorPool`` under Ray's path;
* :func:`list_named_actors` -- the named actors of this driver's namespace (or all).

The submodules are imported on first use only: ``import daskray`` never imports
joblib (an optional dependency, which comes with scikit-learn).
"""

from typing import Any

import daskray

__all__ = ["ActorPool", "list_named_actors"]


def list_named_actors(all_namespaces: bool = False) -> list:
    """Ray's ``ray.util.list_named_actors``: the names of the live named actors in
    this driver's namespace, or with ``all_namespaces=True`` a ``{"name": ...,
    "namespace": ...}`` dict for every one in the cluster."""
    return daskray.list_named_actors(all_namespaces)


def __getattr__(name: str) -> Any:
    # loaded on first use, as daskray's own public names are
    if name == "ActorPool":
        return daskray.ActorPool
    raise AttributeError(f"module 'daskray.util' has no attribute {name!r}")
