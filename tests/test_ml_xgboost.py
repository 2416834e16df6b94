"""daskray.ml.XGBoostTrainer: xgboost trained by actors joined through xgboost's own
collective -- accuracy against single-process xgboost, the same model from 1 and 2
workers, a worker SIGKILLed mid-training, tuning, datasets and both backends."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

import daskray
from daskray.ml import (
    ASHAScheduler, Checkpoint, Dataset, FailureConfig, RunConfig, ScalingConfig, TuneConfig,
    tune,
)

xgboost = pytest.importorskip("xgboost")

from daskray.ml import XGBoostTrainer, xgboost_trainer  # noqa: E402

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(120)]

@pytest.fixture(scope="module", autouse=True)
def _no_idle_training_actors_after_this_module():
    """The trainer keeps its actors between fits; the other test modules see none."""
    yield
    xgboost_trainer.release_workers()


PARAMS = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.3, "nthread": 1,
          "eval_metric": ["logloss", "error"], "seed": 0}


def _problem(n: int, d: int = 26, seed: int = 0, decimals: int | None = None):
    """A synthetic binary problem like the issue's (a noisy linear rule with an interaction)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if decimals is not None:  # few distinct values per feature: exact bin boundaries
        X = np.round(X, decimals) + 0.0  # no -0.0: the dumps would print "<-0" or "<0"
    w = rng.normal(size=d)
    y = (X @ w + 2.0 * X[:, 0] * X[:, 1] + rng.normal(scale=1.0, size=n) > 0).astype(np.int64)
    return X, y


def _single_process(X, y, params, rounds):
    """xgboost in this process on the same rows, as a user would train it."""
    booster = xgboost.train({**xgboost_trainer.DEFAULT_PARAMS, **params},
                            xgboost.QuantileDMatrix(X, y), rounds)
    return booster


def _same_model(first, second) -> None:
    """The same trees (every split equal), with leaf values and predictions equal up to
    float32 rounding: xgboost's intercept and gradient sums are added in another order
    by one worker than by two (see the module docstring of daskray.ml.xgboost_trainer)."""
    import re

    leaf = re.compile(r"leaf=(\S+)")
    dumps = [booster.get_dump() for booster in (first, second)]
    assert [leaf.sub("leaf", tree) for tree in dumps[0]] == \
        [leaf.sub("leaf", tree) for tree in dumps[1]]
    values = [np.array([float(v) for tree in dump for v in leaf.findall(tree)]) for dump in dumps]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6, atol=1e-7)
    base = [_base_score(booster) for booster in (first, second)]
    np.testing.assert_allclose(base[0], base[1], rtol=1e-6)


def _base_score(booster) -> np.ndarray:
    """The intercept xgboost estimated, e.g. ``"[4.9725E-1]"`` -> ``[0.49725]``."""
    import json

    text = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    return np.array([float(v) for v in text.strip("[]").split(",")])


def test_accuracy_is_within_0_2_points_of_single_process_xgboost():
    X, y = _problem(60_000)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    train, test = ds.train_test_split(test_size=0.2, seed=0)
    result = XGBoostTrainer(params=PARAMS, num_boost_round=30,
                            scaling_config=ScalingConfig(num_workers=2)).fit(train, valid=test)
    X_train, y_train = train.to_numpy()
    X_test, y_test = test.to_numpy()
    ours = float(np.mean((result.predict(test) > 0.5) == y_test))
    theirs = float(np.mean((_single_process(X_train, y_train, PARAMS, 30).inplace_predict(X_test)
                            > 0.5) == y_test))
    assert ours > 0.8, ours  # it learned the rule (the noise caps it near 0.85)
    assert abs(ours - theirs) <= 0.002, (ours, theirs)
    frame = result.metrics_dataframe
    assert list(frame["training_iteration"]) == list(range(1, 31))
    assert {"train-logloss", "valid-logloss", "valid-error", "loss"} <= set(frame.columns)
    assert frame["train-logloss"].iloc[-1] < frame["train-logloss"].iloc[0]
    # the validation error the workers allreduced is the error of the final model
    assert result.metrics["valid-error"] == pytest.approx(1 - ours, abs=1e-6)


def test_one_and_two_workers_give_the_same_model_when_the_bins_are_exact():
    import pandas as pd

    # at most max_bin distinct values per feature: xgboost's bin boundaries are exact,
    # so the partition of the shards changes no split (only float32 rounding)
    X, y = _problem(8_000, d=8, seed=3, decimals=1)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    boosters, frames = {}, {}
    for workers in (1, 2):
        result = XGBoostTrainer(params=PARAMS, num_boost_round=12,
                                scaling_config=ScalingConfig(num_workers=workers)).fit(ds)
        boosters[workers], frames[workers] = result.booster, result.metrics_dataframe
    _same_model(boosters[1], boosters[2])
    np.testing.assert_allclose(boosters[1].inplace_predict(X), boosters[2].inplace_predict(X),
                               rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(frames[1], frames[2], rtol=1e-5)
    # and both are xgboost's model in one process on the same rows
    _same_model(_single_process(*ds.to_numpy(), PARAMS, 12), boosters[2])


def test_predict_on_a_dataset_an_array_and_a_checkpoint_agree(tmp_path):
    X, y = _problem(4_000, d=6, seed=1)
    ds = Dataset.from_numpy(X, y, num_shards=3, seed=0)
    result = XGBoostTrainer(params=PARAMS, num_boost_round=5,
                            run_config=RunConfig(storage_path=str(tmp_path))).fit(ds)
    X_rows, _ = ds.to_numpy()
    on_dataset = result.predict(ds)
    assert np.array_equal(on_dataset, result.predict(X_rows))
    stored = Checkpoint.from_directory(str(tmp_path))
    assert np.array_equal(xgboost_trainer.predict(stored, X_rows), on_dataset)
    assert stored.epoch == 4 and result.checkpoint.epoch == 4  # the last round's index
    assert isinstance(result.booster, xgboost.Booster)


def test_checkpoints_come_every_k_rounds_and_training_resumes_from_one(monkeypatch):
    X, y = _problem(4_000, d=6, seed=2)
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    seen = []
    monkeypatch.setattr(XGBoostTrainer, "_checkpointed",
                        lambda self, rounds, model: seen.append(rounds))
    whole = XGBoostTrainer(params=PARAMS, num_boost_round=10, checkpoint_frequency=4).fit(ds)
    assert seen == [4, 8, 10]
    first = XGBoostTrainer(params=PARAMS, num_boost_round=4).fit(ds)
    rest = XGBoostTrainer(params=PARAMS, num_boost_round=10,
                          resume_from_checkpoint=first.checkpoint).fit(ds)
    assert list(rest.metrics_dataframe["training_iteration"]) == list(range(5, 11))
    assert rest.booster.get_dump() == whole.booster.get_dump()


def test_a_stop_condition_ends_training_at_the_checkpoint_that_meets_it():
    X, y = _problem(2_000, d=4, seed=9)
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    result = XGBoostTrainer(params=PARAMS, num_boost_round=50, checkpoint_frequency=3,
                            run_config=RunConfig(stop={"train-logloss": 0.35})).fit(ds)
    frame = result.metrics_dataframe
    assert frame["train-logloss"].iloc[-1] <= 0.35 < frame["train-logloss"].iloc[-4]
    assert len(frame) % 3 == 0 and len(frame) < 50
    assert result.checkpoint.epoch == len(frame) - 1 and result.booster.num_boosted_rounds() \
        == len(frame)


def _kill_one_worker_in_chunk(monkeypatch, at_round: int) -> list:
    """Make the group's chunk starting at ``at_round`` SIGKILL its rank-1 actor's
    process right after submitting the chunk's calls; the pids killed."""
    killed: list = []

    def train(self, first, last):
        refs = None
        if first == at_round and not killed:
            pids = daskray.get([a.pid.remote() for a in self.actors], timeout=60)
            refs = [a.train.remote(first, last) for a in self.actors]
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
        refs = refs or [a.train.remote(first, last) for a in self.actors]
        return xgboost_trainer._gather(refs)[0]

    monkeypatch.setattr(xgboost_trainer._Group, "train", train)
    return killed


def test_a_worker_killed_mid_training_resumes_from_its_checkpoint_to_the_same_model(
        monkeypatch):
    X, y = _problem(8_000, d=8, seed=4)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    config = dict(params=PARAMS, num_boost_round=12, checkpoint_frequency=4,
                  scaling_config=ScalingConfig(num_workers=2))
    uninterrupted = XGBoostTrainer(**config).fit(ds)
    killed = _kill_one_worker_in_chunk(monkeypatch, at_round=4)
    result = XGBoostTrainer(**config, failure_config=FailureConfig(max_failures=2)).fit(ds)
    assert len(killed) == 1
    assert list(result.metrics_dataframe["training_iteration"]) == list(range(1, 13))
    assert result.booster.get_dump() == uninterrupted.booster.get_dump()
    assert np.array_equal(result.predict(X), uninterrupted.predict(X))
    assert result.metrics_dataframe.equals(uninterrupted.metrics_dataframe)


def test_a_worker_killed_without_retries_fails_the_fit_saying_so(monkeypatch):
    X, y = _problem(2_000, d=4, seed=5)
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    _kill_one_worker_in_chunk(monkeypatch, at_round=2)
    with pytest.raises(RuntimeError, match="lost a worker 1 times.*max_failures=0"):
        XGBoostTrainer(params=PARAMS, num_boost_round=6, checkpoint_frequency=2,
                       failure_config=FailureConfig(max_failures=0)).fit(ds)


def test_tuning_runs_one_worker_trials_under_asha():
    X, y = _problem(3_000, d=6, seed=6)
    train, valid = Dataset.from_numpy(X, y, num_shards=2, seed=0).train_test_split(0.25)
    best = XGBoostTrainer(
        params={**PARAMS, "eval_metric": "logloss"}, num_boost_round=9,
        tune_config=TuneConfig(metric="valid-logloss", mode="min", num_samples=6, seed=0,
                               scheduler=ASHAScheduler(max_t=9, grace_period=1,
                                                       reduction_factor=3)),
        param_space={"eta": tune.loguniform(0.01, 0.5), "max_depth": tune.choice([2, 4])},
    ).fit(train, valid=valid)
    grid = best.grid
    assert len(grid) == 6 and grid.num_errors == 0
    rounds = [len(r.metrics_dataframe) for r in grid]
    assert max(rounds) == 9 and min(rounds) < 9  # ASHA stopped some trials early
    values = [r.metrics_dataframe["valid-logloss"].min() for r in grid]
    assert best.metrics_dataframe["valid-logloss"].min() == min(values)
    _, y_valid = valid.to_numpy()
    assert np.mean((best.predict(valid) > 0.5) == y_valid) > 0.7


def test_datasets_from_pandas_and_dask_dataframes_train_alike():
    import dask.dataframe as dd
    import pandas as pd

    X, y = _problem(3_000, d=5, seed=7, decimals=1)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)]).assign(label=y)
    from_pandas = Dataset.from_pandas(frame, "label", num_shards=2, seed=0, shuffle=False)
    from_dask = Dataset.from_dask(dd.from_pandas(frame, npartitions=2), label="label")
    dumps = [XGBoostTrainer(params=PARAMS, num_boost_round=4).fit(ds).booster.get_dump()
             for ds in (from_pandas, from_dask)]
    assert dumps[0] == dumps[1]


def test_without_xgboost_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'daskray\[xgboost\]'"):
        XGBoostTrainer(params=PARAMS)


def test_on_the_dask_distributed_backend(on_distributed):
    X, y = _problem(4_000, d=6, seed=8, decimals=1)
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    result = XGBoostTrainer(params=PARAMS, num_boost_round=6,
                            scaling_config=ScalingConfig(num_workers=2)).fit(ds)
    alone = _single_process(*ds.to_numpy(), PARAMS, 6)
    _same_model(result.booster, alone)
    np.testing.assert_allclose(result.predict(ds), alone.inplace_predict(ds.to_numpy()[0]),
                               rtol=1e-5, atol=1e-6)
