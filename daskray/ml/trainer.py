"""Data-parallel training where every step is a task graph.

One step of ``Trainer.fit``::

    shards (in the object store) ──> one task per group of shards: the gradient
        SUM of each shard's slice of the global batch, shard by shard
      ──> one update task: the per-shard sums added in a fixed pairwise tree
          (shard order), divided by the batch's rows, plus L2; the optimizer step
      ──> the new parameters: an ObjectRef the next step's tasks read

The driver submits whole epochs of steps without waiting for any of them: each
step's tasks take the previous step's parameters as an ObjectRef argument.  Which
rows a step reads depends only on the seed, the epoch, the step and the shard, and
the reduction order only on the shards -- never on the workers -- so training on
one worker, on two, or in one process with :func:`reference_fit` gives
bit-identical parameters.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import api
from .dataset import Dataset
from .models import Model
from .optimizers import get_optimizer

DEFAULT_TRAIN_CONFIG = {
    "optimizer": "sgd", "lr": 0.1, "batch_size": 1024, "epochs": 10, "l2": 0.0, "seed": 0,
}


# ---------------------------------------------------------------------- configs


@dataclass
class ScalingConfig:
    """How many workers share the shards (tasks per step = num_workers)."""

    num_workers: int = 2


@dataclass
class RunConfig:
    """``stop``: end early when a metric reaches a value, e.g. ``{"valid_loss": 0.3}``
    (for metrics with "acc" in their name: at or above; else at or below)."""

    name: str | None = None
    stop: dict | None = None
    storage_path: str | None = None


@dataclass
class FailureConfig:
    """``max_failures``: times a step's task is re-run after its worker died; the
    run then resumes from the last completed step (its parameters are an object
    the head keeps)."""

    max_failures: int = 3


@dataclass
class Checkpoint:
    """Parameters (and the optimizer state) after some epoch."""

    params: dict
    epoch: int
    opt_state: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_directory(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        np.savez(os.path.join(path, "params.npz"), **self.params)
        np.savez(os.path.join(path, "opt_state.npz"), **_flatten_state(self.opt_state))
        with open(os.path.join(path, "checkpoint.json"), "w") as f:
            json.dump({"epoch": self.epoch, "config": self.config}, f, default=str)
        return path

    @classmethod
    def from_directory(cls, path: str) -> "Checkpoint":
        with np.load(os.path.join(path, "params.npz")) as data:
            params = {k: data[k] for k in data.files}
        with np.load(os.path.join(path, "opt_state.npz")) as data:
            state = _unflatten_state({k: data[k] for k in data.files})
        with open(os.path.join(path, "checkpoint.json")) as f:
            meta = json.load(f)
        return cls(params, meta["epoch"], state, meta.get("config", {}))


@dataclass
class Result:
    metrics: dict
    metrics_dataframe: Any
    checkpoint: Checkpoint | None
    error: BaseException | None = None
    best_checkpoints: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    #: for a search: every trial (a ResultGrid)
    grid: Any = None


def _flatten_state(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_state(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def _unflatten_state(flat: dict) -> dict:
    state: dict = {}
    for name, value in flat.items():
        parts = name.split("/")
        node = state
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value if value.shape else value.item()
    return state


# ---------------------------------------------------------------------- the algorithm


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(num_rows / batch_size))


def batch_rows(n: int, epoch: int, step: int, steps: int, seed: int, shard: int) -> np.ndarray:
    """Rows of a shard of ``n`` rows that step ``step`` of ``epoch`` reads: an equal
    share of a per-epoch permutation fixed by (seed, epoch, shard)."""
    order = np.random.default_rng([seed, epoch, shard]).permutation(n)
    return order[step * n // steps:(step + 1) * n // steps]


def _targets(model: Model, y: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    if model.task == "regression" or classes is None:
        return y.astype(np.float64)
    return np.searchsorted(classes, y)


def shard_gradients(params: dict, model: Model, classes: Any, epoch: int, step: int,
                    steps: int, seed: int, first_shard: int, *shards: tuple) -> list:
    """Gradient sums of consecutive shards for one step: [(grads, rows), ...]."""
    out = []
    for i, (X, y) in enumerate(shards):
        rows = batch_rows(len(y), epoch, step, steps, seed, first_shard + i)
        out.append((model.gradient(params, X[rows], _targets(model, y[rows], classes)), len(rows)))
    return out


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
    target = _targets(model, y, classes)
    loss = float(model.loss(params, X, target))
    predicted = model.predict(params, X) if model.task != "regression" or with_predictions else None
    correct = int(np.sum(predicted == target)) if model.task != "regression" else 0
    if not with_predictions:
        return loss, correct, len(y), None, None
    if classes is not None and model.task != "regression":
        return loss, correct, len(y), classes[predicted], y
    return loss, correct, len(y), predicted, y


class Evaluation:
    """The seed's evaluator: called with predictions and labels (numpy arrays, in
    the data's own label values), it returns a number (reported as ``score``) or a
    dict of named numbers, added to each epoch's metrics."""

    def __call__(self, predictions: np.ndarray, labels: np.ndarray) -> float | dict:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(predictions, labels)")


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


def _config(train_config: dict | None) -> dict:
    config = {**DEFAULT_TRAIN_CONFIG, **(train_config or {})}
    unknown = set(config) - set(DEFAULT_TRAIN_CONFIG) - {"momentum", "beta1", "beta2", "eps"}
    if unknown:
        raise ValueError(f"unknown train_config keys {sorted(unknown)}; known: "
                         f"{sorted(DEFAULT_TRAIN_CONFIG)} and optimizer settings")
    return config


def _optimizer(config: dict) -> Any:
    extra = {k: config[k] for k in ("momentum", "beta1", "beta2", "eps") if k in config}
    return get_optimizer(config["optimizer"], config["lr"], **extra)


def _n_outputs(model: Model, classes: Any) -> int:
    return len(classes) if model.task == "multiclass" and classes is not None else 1


def reference_fit(model: Model, shards: Sequence[tuple], train_config: dict | None = None,
                  classes: Any = None) -> dict:
    """The trainer's algorithm in this process, on ``[(X, y), ...]`` shards: the
    parameters ``Trainer.fit`` computes, bit for bit."""
    config = _config(train_config)
    optimizer = _optimizer(config)
    n_features = shards[0][0].shape[1]
    params = model.init_params(n_features, _n_outputs(model, classes),
                               np.random.default_rng(config["seed"]))
    state = optimizer.init_state(params)
    steps = steps_per_epoch(sum(len(s[1]) for s in shards), config["batch_size"])
    for epoch in range(config["epochs"]):
        for step in range(steps):
            groups = shard_gradients(params, model, classes, epoch, step, steps,
                                     config["seed"], 0, *shards)
            params, state = update(params, state, model, optimizer, config["l2"], groups)
    return params


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """``Trainer(model=..., train_config=..., scaling_config=...).fit(train, valid=...)``."""

    def __init__(self, model: Model | type | None = None, train_config: dict | None = None,
                 scaling_config: ScalingConfig | None = None, run_config: RunConfig | None = None,
                 resume_from_checkpoint: Checkpoint | None = None, config: Any = None,
                 param_space: dict | None = None,
                 failure_config: FailureConfig | None = None, evaluator: Any = None) -> None:
        """With ``config`` (a ``TuneConfig``) it searches ``param_space`` instead:
        ``model`` may then be a class, built for each trial from its config."""
        if model is None:
            raise ValueError("Trainer needs a model")
        self.model = model
        self.tune_config = config
        self.param_space = param_space or {}
        self.config = _config({k: v for k, v in (train_config or {}).items()})
        if config is None and isinstance(model, type):
            raise ValueError("a model class needs a search (config=TuneConfig(...)); "
                             "pass a model instance to train one model")
        self.scaling = scaling_config or ScalingConfig()
        self.run_config = run_config or RunConfig()
        self.resume = resume_from_checkpoint
        self.failure = failure_config or FailureConfig()
        self.evaluator = evaluator

    def fit(self, train: Dataset, valid: Dataset | None = None) -> Result:
        """Train; the Result has per-epoch metrics and the final checkpoint.  With a
        search, the best trial's Result, whose ``grid`` holds every trial."""
        import pandas as pd

        if self.tune_config is not None:
            from .tune import run_search

            grid = run_search(self.model, self.config, self.param_space, self.tune_config,
                              train, valid, self.evaluator)
            best = grid.get_best_result()
            best.grid = grid
            return best

        model, config = self.model, self.config
        optimizer = _optimizer(config)
        classes = train.classes if model.task != "regression" else None
        if self.resume is not None:
            params, state, start = self.resume.params, self.resume.opt_state, self.resume.epoch + 1
        else:
            params = model.init_params(train.n_features, _n_outputs(model, classes),
                                       np.random.default_rng(config["seed"]))
            state, start = optimizer.init_state(params), 0
        steps = steps_per_epoch(train.num_rows, config["batch_size"])
        groups = [[int(i) for i in g] for g in np.array_split(
            np.arange(train.num_shards), min(self.scaling.num_workers, train.num_shards))]
        retries = self.failure.max_failures
        grad_task = api.remote(max_retries=retries)(shard_gradients)
        update_task = api.remote(num_returns=2, max_retries=retries)(update)
        eval_task = api.remote(evaluate_shard)
        model_ref = api.put(model)
        params_ref, state_ref = api.put(params), api.put(state)
        history: list[dict] = []
        pending: list[tuple] = []  # epochs submitted, metrics not read yet
        final = (params_ref, state_ref)
        for epoch in range(start, config["epochs"]):
            for step in range(steps):
                partial = [
                    grad_task.remote(params_ref, model_ref, classes, epoch, step, steps,
                                     config["seed"], g[0], *[train.shards[i] for i in g])
                    for g in groups
                ]
                params_ref, state_ref = update_task.remote(
                    params_ref, state_ref, model_ref, optimizer, config["l2"], *partial)
            judged = self.evaluator is not None
            evals = [eval_task.remote(params_ref, model_ref, classes, s, judged and valid is None)
                     for s in train.shards]
            valid_evals = ([eval_task.remote(params_ref, model_ref, classes, s, judged)
                            for s in valid.shards] if valid is not None else [])
            pending.append((epoch, evals, valid_evals, params_ref, state_ref))
            final = (params_ref, state_ref)
            # read the previous epoch's metrics while this one computes
            if len(pending) > 1 and self._record(pending.pop(0), history):
                final = history[-1].pop("_refs")
                pending = []
                break
        for entry in pending:
            if self._record(entry, history):
                final = history[-1].pop("_refs")
                break
        for row in history:
            row.pop("_refs", None)
        params_ref, state_ref = final
        params, state = api.get([params_ref, state_ref])
        frame = pd.DataFrame(history)
        last_epoch = history[-1]["epoch"] if history else start - 1
        checkpoint = Checkpoint(params, last_epoch, state, dict(config))
        if self.run_config.storage_path:
            checkpoint.to_directory(self.run_config.storage_path)
        return Result(history[-1] if history else {}, frame, checkpoint, None, [checkpoint],
                      dict(config))

    def _record(self, entry: tuple, history: list) -> bool:
        """Add an epoch's metrics to ``history``; whether training should stop there."""
        epoch, evals, valid_evals, params_ref, state_ref = entry
        row = self._metrics(epoch, evals, valid_evals)
        row["_refs"] = (params_ref, state_ref)
        history.append(row)
        return self._should_stop(row)

    def _metrics(self, epoch: int, evals: list, valid_evals: list) -> dict:
        row: dict = {"epoch": epoch}
        judged: list = []
        for name, refs in (("train", evals), ("valid", valid_evals)):
            if refs:
                parts = api.get(refs)
                row.update(summarize(parts, name, self.model.task))
                judged = parts
        row["loss"] = row.get("valid_loss", row["train_loss"])
        row.update(apply_evaluator(self.evaluator, judged))
        return row

    def _should_stop(self, row: dict) -> bool:
        for metric, target in (self.run_config.stop or {}).items():
            if metric == "epochs" and row["epoch"] + 1 >= target:
                return True
            value = row.get(metric)
            if value is None:
                continue
            if ("acc" in metric and value >= target) or ("acc" not in metric and value <= target):
                return True
        return False
