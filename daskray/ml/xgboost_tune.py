"""Hyperparameter search for :class:`~daskray.ml.XGBoostTrainer`.

``XGBoostTrainer(params=..., tune_config=TuneConfig(...), param_space={...}).fit(train,
valid)`` runs the search of :class:`~daskray.ml.Tuner` over a function trainable,
:class:`XGBoostTrial`: each trial is one task that trains with one worker and one
thread (trials run in parallel instead), builds its matrices from the dataset's
shards as the distributed trainer does, and reports every round -- so ASHA's rungs
and ``max_t`` count boosting rounds, and a stopped trial stops growing trees.  The
trial checkpoints its booster every ``checkpoint_frequency`` rounds; a trial whose
worker died resumes from there (``FailureConfig``).  ``param_space`` keys are
xgboost params, plus ``num_boost_round``.
"""

from __future__ import annotations

from typing import Any

import daskray

from .dataset import Dataset
from .tuner import Tuner, get_checkpoint, report
from .xgboost_core import (
    DEFAULT_PARAMS, XGBoostResult, _checkpoint, build_matrices, get_model, new_booster,
    train_rounds,
)

__all__ = ["XGBoostTrial", "search"]


class XGBoostTrial:
    """One trial's training, given its config: see the module docstring."""

    def __init__(self, params: dict, num_boost_round: int, checkpoint_frequency: int,
                 train: list, valid: list | None) -> None:
        # the shards' refs are attributes, so they travel as refs and are read in the trial
        self.params, self.num_boost_round = params, num_boost_round
        self.checkpoint_frequency = checkpoint_frequency
        self.train, self.valid = train, valid
        self.__name__ = "xgboost_trial"

    def __call__(self, config: dict) -> None:
        config = dict(config)
        rounds = int(config.pop("num_boost_round", self.num_boost_round))
        params = {**DEFAULT_PARAMS, "nthread": 1, **self.params, **config}
        resume = get_checkpoint()
        start = resume.epoch + 1 if resume is not None else 0
        model = bytes(get_model(resume).save_raw("ubj")) if resume is not None else None
        evals = build_matrices(params, daskray.get(list(self.train)),
                               daskray.get(list(self.valid)) if self.valid is not None else None)
        booster = new_booster(params, evals, model)
        for iteration in range(start, rounds):
            row = train_rounds(booster, evals, iteration, iteration + 1)[0]
            done = iteration + 1
            checkpoint = None
            if done % self.checkpoint_frequency == 0 or done == rounds:
                checkpoint = _checkpoint(bytes(booster.save_raw("ubj")), done, params)
            report(row, checkpoint=checkpoint)


def search(trainer: Any, train: Dataset, valid: Dataset | None) -> XGBoostResult:
    """The best trial's result (an :class:`XGBoostResult`), its ``grid`` every trial's;
    ``trainer`` is the :class:`~daskray.ml.XGBoostTrainer` whose settings the trials use."""
    trial = XGBoostTrial(trainer.params, trainer.num_boost_round, trainer.checkpoint_frequency,
                         list(train.shards), list(valid.shards) if valid is not None else None)
    grid = Tuner(trial, param_space=trainer.param_space, tune_config=trainer.tune_config,
                 run_config=trainer.run_config, failure_config=trainer.failure).fit()
    best = grid.get_best_result()
    result = XGBoostResult(best.metrics, best.metrics_dataframe, best.checkpoint, best.error,
                           best.best_checkpoints, best.config)
    result.grid = grid
    return result
