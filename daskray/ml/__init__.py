"""daskray.ml: data-parallel training as graph-level gradient aggregation.

``Dataset`` holds labelled rows as shards in the object store; ``Trainer.fit``
runs synchronous data-parallel training where every step is a task graph
(per-shard gradient sums, a fixed pairwise tree, one update), with results equal,
bit for bit, to :func:`reference_fit` in one process.  Built only on daskray's
public API.  ``Tuner(train_fn or trainer, param_space=..., tune_config=...)`` and
``Trainer(config=TuneConfig(...), param_space=...)`` search hyperparameters with
many trials on the cluster, stopping poor ones early (ASHA).
"""

from . import datasets, models, optimizers, tune
from .checkpoints import Checkpoint, Result
from .dataset import Dataset, Standardization
from .models import Model
from .trainer import (
    Evaluation, FailureConfig, RunConfig, ScalingConfig, Trainer, reference_fit,
)
from .tune import ASHAScheduler, FIFOScheduler, ResultGrid, TuneConfig
from .tuner import Tuner, get_checkpoint, report, with_parameters
from .xgboost_trainer import XGBoostResult, XGBoostTrainer  # imports xgboost only when used


def __getattr__(name: str):
    """``TorchModel`` loads on first use: importing daskray.ml does not import torch."""
    if name == "TorchModel":
        from .torch_model import TorchModel

        return TorchModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Dataset", "Standardization", "datasets", "Model", "models", "optimizers", "Trainer",
    "Result", "Checkpoint", "Evaluation", "FailureConfig", "RunConfig", "ScalingConfig",
    "reference_fit", "tune", "TuneConfig", "ASHAScheduler", "FIFOScheduler", "ResultGrid",
    "Tuner", "report", "get_checkpoint", "with_parameters", "TorchModel",
    "XGBoostTrainer", "XGBoostResult",
]
