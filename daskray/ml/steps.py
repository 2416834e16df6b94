"""The pieces of one training run that the Trainer and the search share.

The train config with its defaults, the targets a model is trained on, one
optimizer step from per-shard gradient sums (added in a fixed tree), and the
evaluation of a shard with its summary metrics.  :mod:`daskray.ml.trainer` runs
them as task graphs, :mod:`daskray.ml.search` inside a trial's task; both import
them from here, so neither imports the other's private names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .models import Model
from .optimizers import get_optimizer

DEFAULT_TRAIN_CONFIG = {
    "optimizer": "sgd", "lr": 0.1, "batch_size": 1024, "epochs": 10, "l2": 0.0, "seed": 0,
}


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Steps of an epoch over ``num_rows`` rows: at least one."""
    return max(1, math.ceil(num_rows / batch_size))


def model_targets(model: Model, y: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """``y`` as the model trains on it: float values, or indices into ``classes``."""
    if model.task == "regression" or classes is None:
        return y.astype(np.float64)
    return np.searchsorted(classes, y)


def tree_sum(items: list) -> dict:
    """Add gradient dicts pairwise in a fixed tree: ((g0+g1)+(g2+g3))+..."""
    while len(items) > 1:
        paired = [{k: a[k] + b[k] for k in a} for a, b in zip(items[0::2], items[1::2])]
        if len(items) % 2:
            paired.append(items[-1])
        items = paired
    return items[0]


def update(params: dict, opt_state: dict, model: Model, optimizer: Any, l2: float,
           *groups: list) -> tuple[dict, dict]:
    """One optimizer step from the per-shard gradient sums of every group."""
    per_shard = [g for group in groups for g in group]
    rows = sum(n for _, n in per_shard)
    total = tree_sum([g for g, _ in per_shard])
    weights = set(model.weight_keys())
    grads = {k: total[k] / rows + (l2 * params[k] if k in weights and l2 else 0.0) for k in total}
    return optimizer.step(params, grads, opt_state)


def evaluate_shard(params: dict, model: Model, classes: Any, shard: tuple,
                   with_predictions: bool = False) -> tuple:
    """(loss sum, correct predictions, rows, predictions, labels) of one shard; the
    last two only ``with_predictions`` (for an evaluator), else None."""
    X, y = shard
    target = model_targets(model, y, classes)
    wanted = model.task != "regression" or with_predictions
    both = getattr(model, "loss_and_predict", None) if wanted else None
    if both is not None:  # the built-ins: one pass over X for both
        loss, predicted = both(params, X, target)
        loss = float(loss)
    else:
        loss = float(model.loss(params, X, target))
        predicted = model.predict(params, X) if wanted else None
    correct = int(np.sum(predicted == target)) if model.task != "regression" else 0
    if not with_predictions:
        return loss, correct, len(y), None, None
    if classes is not None and model.task != "regression":
        return loss, correct, len(y), classes[predicted], y
    return loss, correct, len(y), predicted, y


def apply_evaluator(evaluator: Any, parts: list) -> dict:
    """Run ``evaluator`` on the predictions of evaluated shards; metrics to add."""
    if evaluator is None or not parts:
        return {}
    evaluate = evaluator() if isinstance(evaluator, type) else evaluator
    value = evaluate(np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts]))
    return dict(value) if isinstance(value, dict) else {"score": float(value)}


def summarize(parts: list, prefix: str, task: str) -> dict:
    """``{prefix}_loss`` (mean) and, for classifiers, ``{prefix}_accuracy``."""
    n = sum(p[2] for p in parts)
    row = {f"{prefix}_loss": sum(p[0] for p in parts) / n}
    if task != "regression":
        row[f"{prefix}_accuracy"] = sum(p[1] for p in parts) / n
    return row


def full_config(train_config: dict | None) -> dict:
    """``train_config`` with the defaults filled in; unknown keys are an error."""
    config = {**DEFAULT_TRAIN_CONFIG, **(train_config or {})}
    unknown = set(config) - set(DEFAULT_TRAIN_CONFIG) - {"momentum", "beta1", "beta2", "eps"}
    if unknown:
        raise ValueError(f"unknown train_config keys {sorted(unknown)}; known: "
                         f"{sorted(DEFAULT_TRAIN_CONFIG)} and optimizer settings")
    return config


def make_optimizer(config: dict) -> Any:
    """The optimizer a full train config names, with its settings."""
    extra = {k: config[k] for k in ("momentum", "beta1", "beta2", "eps") if k in config}
    return get_optimizer(config["optimizer"], config["lr"], **extra)


def output_count(model: Model, classes: Any) -> int:
    """Outputs of the model: one per class for multiclass, else one."""
    return len(classes) if model.task == "multiclass" and classes is not None else 1
