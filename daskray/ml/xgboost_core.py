"""The parts of xgboost training that the distributed trainer
(:mod:`daskray.ml.xgboost_trainer`) and its search (:mod:`daskray.ml.xgboost_tune`)
share: default params, building matrices from dataset shards, running rounds, and
results (checkpoints holding a booster, prediction)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import daskray

from .checkpoints import Checkpoint, Result
from .dataset import Dataset

__all__ = ["DEFAULT_PARAMS", "XGBoostResult", "build_matrices", "get_model", "new_booster",
           "predict", "require_xgboost", "shard_parts", "train_rounds"]

#: defaults every training gets unless the params say otherwise: the hist method
#: (the only one xgboost distributes on the CPU) and a per-round seed, so a run
#: resumed from a checkpoint draws what an uninterrupted one would
DEFAULT_PARAMS = {"tree_method": "hist", "seed_per_iteration": True}

def require_xgboost() -> Any:
    """The ``xgboost`` module, or an ImportError naming the extra that installs it."""
    try:
        import xgboost
    except ImportError as error:
        raise ImportError(
            "daskray.ml.XGBoostTrainer needs xgboost, which is not installed. Install the "
            "CPU build with `pip install 'daskray[xgboost]'` (the `xgboost` extra, the "
            "xgboost-cpu wheel) or `pip install xgboost-cpu`.") from error
    return xgboost


# ---------------------------------------------------------------------- data and rounds


def _shard_iterator(shards: Sequence[tuple]) -> Any:
    """An ``xgboost.DataIter`` over ``(X, y)`` shards: xgboost reads each shard's
    arrays as they are (shared memory included) into its quantized matrix."""
    xgboost = require_xgboost()

    class ShardIter(xgboost.DataIter):
        def __init__(self) -> None:
            self.position = 0
            super().__init__()

        def next(self, input_data: Any) -> bool:
            if self.position == len(shards):
                return False
            X, y = shards[self.position]
            input_data(data=X, label=y)
            self.position += 1
            return True

        def reset(self) -> None:
            self.position = 0

    return ShardIter()


def build_matrices(params: dict, train: Sequence[tuple],
                   valid: Sequence[tuple] | None) -> list[tuple[Any, str]]:
    """``[(train matrix, "train"), (valid matrix, "valid")]`` from shards; the
    validation matrix uses the training matrix's bin boundaries (``ref``)."""
    xgboost = require_xgboost()
    max_bin = int(params.get("max_bin", 256))
    dtrain = xgboost.QuantileDMatrix(_shard_iterator(train), max_bin=max_bin,
                                     nthread=params.get("nthread"))
    evals = [(dtrain, "train")]
    if valid is not None and not valid:  # this worker holds no validation shard
        valid = [(np.empty((0, train[0][0].shape[1])), np.empty(0))]
    if valid is not None:
        evals.append((xgboost.QuantileDMatrix(_shard_iterator(valid), max_bin=max_bin,
                                              ref=dtrain, nthread=params.get("nthread")),
                       "valid"))
    return evals


def parse_evaluation(text: str) -> dict:
    """``"[3]\\ttrain-logloss:0.41\\tvalid-logloss:0.45"`` -> ``{"train-logloss": 0.41, ...}``."""
    metrics = {}
    for item in text.split("\t")[1:]:
        name, _, value = item.rpartition(":")
        metrics[name] = float(value)
    return metrics


def train_rounds(booster: Any, evals: list, first: int, last: int) -> list[dict]:
    """Rounds ``first .. last - 1`` on ``booster``; each round's metrics, with
    ``training_iteration`` (rounds done) and ``loss`` (the first validation metric,
    else the first training one)."""
    dtrain = evals[0][0]
    rows = []
    for iteration in range(first, last):
        booster.update(dtrain, iteration)
        metrics = parse_evaluation(booster.eval_set(evals, iteration))
        row = {"round": iteration, "training_iteration": iteration + 1, **metrics}
        named = [v for k, v in metrics.items() if k.startswith("valid-")] or list(metrics.values())
        if named:
            row["loss"] = named[0]
        rows.append(row)
    return rows


def new_booster(params: dict, evals: list, model: bytes | None) -> Any:
    """A booster for ``params`` caching ``evals``' matrices, from ``model`` (raw
    bytes of a checkpoint) when resuming."""
    xgboost = require_xgboost()
    return xgboost.Booster(params, [d for d, _ in evals],
                           model_file=bytearray(model) if model is not None else None)



def shard_parts(num_shards: int, num_workers: int) -> list[list[int]]:
    """Shards dealt to at most ``num_workers`` workers in contiguous runs (shard
    order kept): ``shard_parts(5, 2) == [[0, 1, 2], [3, 4]]``."""
    n = min(num_shards, num_workers)
    return [list(part) for part in np.array_split(np.arange(num_shards), n)]


# ---------------------------------------------------------------------- results


def get_model(checkpoint: Checkpoint) -> Any:
    """The ``xgboost.Booster`` kept in a checkpoint of :class:`XGBoostTrainer`."""
    xgboost = require_xgboost()
    if "booster" not in checkpoint.params:
        raise ValueError("this checkpoint holds no xgboost booster (it is not from "
                         "XGBoostTrainer): its params are " + ", ".join(checkpoint.params))
    booster = xgboost.Booster()
    booster.load_model(bytearray(np.asarray(checkpoint.params["booster"]).tobytes()))
    return booster


def _checkpoint(model: bytes, rounds: int, params: dict) -> Checkpoint:
    """A checkpoint of a booster after ``rounds`` rounds (``epoch``: the last round)."""
    return Checkpoint({"booster": np.frombuffer(model, dtype=np.uint8).copy()}, rounds - 1,
                      {}, dict(params))


def _predict_shard(model: bytes, shard: tuple, margin: bool) -> np.ndarray:
    xgboost = require_xgboost()
    booster = xgboost.Booster()
    booster.load_model(bytearray(model))
    return booster.inplace_predict(shard[0], predict_type="margin" if margin else "value")


def predict(booster: Any, data: Any, output_margin: bool = False) -> np.ndarray:
    """Predictions of ``booster`` (or a checkpoint) for a ``Dataset`` -- one task per
    shard, next to it, in shard order -- or for an array / DataFrame in this process."""
    if isinstance(booster, Checkpoint):
        booster = get_model(booster)
    if isinstance(data, Dataset):
        model = daskray.put(bytes(booster.save_raw("ubj")))
        task = daskray.remote(_predict_shard)
        parts = daskray.get([task.remote(model, shard, output_margin) for shard in data.shards])
        return np.concatenate(parts) if parts else np.empty(0)
    return booster.inplace_predict(data, predict_type="margin" if output_margin else "value")


class XGBoostResult(Result):
    """A :class:`~daskray.ml.Result` with the booster at hand."""

    @property
    def booster(self) -> Any:
        """The trained ``xgboost.Booster`` (from the checkpoint)."""
        return get_model(self.checkpoint)

    def predict(self, data: Any, output_margin: bool = False) -> np.ndarray:
        """:func:`predict` with this result's booster."""
        return predict(self.booster, data, output_margin)
