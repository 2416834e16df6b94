"""daskray.ml: data-parallel training as graph-level gradient aggregation.

``Dataset`` holds labelled rows as shards in the object store; ``Trainer.fit``
runs synchronous data-parallel training where every step is a task graph
(per-shard gradient sums, a fixed pairwise tree, one update), with results equal,
bit for bit, to :func:`reference_fit` in one process.  Built only on daskray's
public API.  (Hyperparameter tuning is not here yet.)
"""

from . import models, optimizers
from .dataset import Dataset, Standardization
from .models import Model
from .trainer import Checkpoint, Result, RunConfig, ScalingConfig, Trainer, reference_fit

__all__ = [
    "Dataset", "Standardization", "Model", "models", "optimizers", "Trainer", "Result",
    "Checkpoint", "RunConfig", "ScalingConfig", "reference_fit",
]
