"""daskray.ml on a real cluster: exactness against the single-process algorithm,
against plain numpy, and accuracy on real data (scikit-learn's digits)."""

from __future__ import annotations

import numpy as np
import pytest

import daskray
import daskray.ml
from daskray.ml import Dataset, RunConfig, ScalingConfig, Trainer, models, reference_fit
from daskray.ml.trainer import Checkpoint
from helpers import digits_split

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(120)]


def _blobs(n=600, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


def test_parameters_are_bit_identical_for_1_and_2_workers_and_reference(backend):
    X, y = _blobs()
    ds = Dataset.from_numpy(X, y, num_shards=6, seed=1)
    config = {"optimizer": "adam", "lr": 0.05, "batch_size": 128, "epochs": 3, "l2": 1e-3}
    fitted = {}
    for workers in (1, 2):
        result = Trainer(model=models.SoftmaxRegression(), train_config=config,
                         scaling_config=ScalingConfig(num_workers=workers)).fit(ds)
        fitted[workers] = result.checkpoint.params
    reference = reference_fit(models.SoftmaxRegression(), daskray.get(ds.shards), config,
                              classes=ds.classes)
    for key in reference:
        assert np.array_equal(fitted[1][key], reference[key]), key
        assert np.array_equal(fitted[2][key], reference[key]), key


def test_full_batch_gradient_descent_matches_plain_numpy(backend):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.25 + rng.normal(0, 0.1, 400)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0, shuffle=False)
    config = {"optimizer": "sgd", "lr": 0.1, "batch_size": 400, "epochs": 50}
    params = Trainer(model=models.LinearRegression(), train_config=config).fit(ds).checkpoint.params
    # the same algorithm written plainly: full-batch mean gradient of 0.5*(Xw+b-y)^2
    init = models.LinearRegression().init_params(4, 1, np.random.default_rng(0))
    w, b = init["w"].copy(), init["b"].copy()
    for _ in range(50):
        r = X @ w.reshape(-1) + b.reshape(-1) - y if w.ndim > 1 else X @ w + b - y
        gw = (X.T @ r / len(y)).reshape(w.shape)
        gb = np.reshape(r.sum() / len(y), b.shape)
        w, b = w - 0.1 * gw, b - 0.1 * gb
    np.testing.assert_allclose(params["w"], w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(params["b"], b, rtol=1e-12, atol=1e-12)


def test_softmax_regression_on_digits_reaches_95_percent(backend):
    train, test = digits_split()
    result = Trainer(model=models.SoftmaxRegression(),
                     train_config={"optimizer": "adam", "lr": 0.01, "batch_size": 64,
                                   "epochs": 20, "l2": 1e-3}).fit(train, valid=test)
    assert result.metrics["valid_accuracy"] >= 0.95, result.metrics
    assert list(result.metrics_dataframe["epoch"]) == list(range(20))


def test_mlp_on_digits_reaches_97_percent(backend):
    train, test = digits_split()
    result = Trainer(model=models.MLP(hidden=(64,)),
                     train_config={"optimizer": "adam", "lr": 0.01, "batch_size": 64,
                                   "epochs": 25, "seed": 0}).fit(train, valid=test)
    assert result.metrics["valid_accuracy"] >= 0.97, result.metrics


def test_checkpoint_round_trip_and_resume_gives_the_same_parameters(backend, tmp_path):
    X, y = _blobs(seed=5)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    config = {"optimizer": "adam", "lr": 0.05, "batch_size": 100, "epochs": 4}
    full = Trainer(model=models.SoftmaxRegression(), train_config=config).fit(ds)
    half = Trainer(model=models.SoftmaxRegression(), train_config={**config, "epochs": 2},
                   run_config=RunConfig(storage_path=str(tmp_path / "ckpt"))).fit(ds)
    loaded = Checkpoint.from_directory(str(tmp_path / "ckpt"))
    assert loaded.epoch == 1
    resumed = Trainer(model=models.SoftmaxRegression(), train_config=config,
                      resume_from_checkpoint=loaded).fit(ds)
    for key in full.checkpoint.params:
        assert np.array_equal(resumed.checkpoint.params[key], full.checkpoint.params[key])
    assert half.checkpoint.epoch == 1


def test_stop_condition_ends_training_early(backend):
    X, y = _blobs(seed=7)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    result = Trainer(model=models.SoftmaxRegression(),
                     train_config={"lr": 0.5, "batch_size": 64, "epochs": 50},
                     run_config=RunConfig(stop={"train_accuracy": 0.9})).fit(ds)
    assert result.metrics["train_accuracy"] >= 0.9
    assert len(result.metrics_dataframe) < 50


def test_dataset_from_pandas_and_from_dask_hold_the_same_rows():
    import dask.array as da
    import pandas as pd

    X, y = _blobs(n=200, seed=2)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])]).assign(label=y)
    a = Dataset.from_pandas(df, label="label", num_shards=4, seed=0, shuffle=False)
    Xa, ya = a.to_numpy()
    np.testing.assert_array_equal(Xa, X)
    np.testing.assert_array_equal(ya, y)
    b = Dataset.from_dask(da.from_array(X, chunks=(50, 5)), da.from_array(y, chunks=50))
    assert b.num_shards == 4 and b.sizes == [50] * 4
    Xb, yb = b.to_numpy()
    np.testing.assert_array_equal(Xb, X)
    np.testing.assert_array_equal(yb, y)


def test_bad_input_is_refused_with_a_clear_message(backend):
    with pytest.raises(ValueError, match="X of shape"):
        Dataset.from_numpy(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="unknown train_config"):
        Trainer(model=models.LinearRegression(), train_config={"learning_rate": 1})
    with pytest.raises(ValueError, match="needs a model"):
        Trainer()


def test_search_with_asha_stops_poor_trials_and_finds_a_good_one(backend):
    from daskray.ml import TuneConfig, tune

    train, test = digits_split()
    best = Trainer(
        config=TuneConfig(metric="loss", mode="min", num_samples=24,
                          scheduler=tune.ASHAScheduler(max_t=9, reduction_factor=3), seed=1),
        model=models.SoftmaxRegression,
        train_config={"epochs": 9},
        param_space={"lr": tune.loguniform(1e-3, 1.0), "batch_size": tune.choice([32, 128]),
                     "l2": tune.loguniform(1e-5, 1e-1)},
    ).fit(train, valid=test)
    frame = best.grid.get_dataframe()
    assert len(frame) == 24 and not best.grid.errors
    iterations = frame["training_iteration"]
    assert iterations.max() == 9 and (iterations < 9).sum() >= 12  # most were stopped early
    assert best.metrics["valid_accuracy"] >= 0.95
    assert best.metrics["loss"] == frame["loss"][frame["training_iteration"] == 9].min()


def test_grid_search_runs_every_combination_and_builds_model_classes(backend):
    from daskray.ml import TuneConfig, tune

    X, y = _blobs(n=300)
    ds = Dataset.from_numpy(X, y, num_shards=3, seed=0)
    grid = Trainer(config=TuneConfig(metric="train_accuracy", mode="max", num_samples=1),
                   model=models.MLP, train_config={"epochs": 2, "optimizer": "adam"},
                   param_space={"hidden": tune.grid_search([(8,), (16,)]),
                                "lr": tune.grid_search([0.01, 0.05])}).fit(ds).grid
    configs = sorted((r.config["hidden"], r.config["lr"]) for r in grid)
    assert configs == [((8,), 0.01), ((8,), 0.05), ((16,), 0.01), ((16,), 0.05)]
    assert all(r.checkpoint.params["w0"].shape[1] == r.config["hidden"][0] for r in grid)


class SeedStyleRegression(daskray.ml.Model):
    """The seed's shape: __init__ makes numpy parameters, forward(X) reads them."""

    def __init__(self):
        self.w = np.zeros(3)
        self.b = np.zeros(1)

    def forward(self, X):
        return X @ self.w + self.b[0]


def test_a_seed_style_model_trains_with_finite_differences():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    y = X @ np.array([2.0, -1.0, 0.5]) + 1.0
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    with pytest.warns(RuntimeWarning, match="finite"):
        model = SeedStyleRegression()
        model.gradient(model.init_params(3, 1, np.random.default_rng(0)), X[:4], y[:4])
    result = Trainer(model=SeedStyleRegression(),
                     train_config={"lr": 0.1, "batch_size": 200, "epochs": 60}).fit(ds)
    np.testing.assert_allclose(result.checkpoint.params["w"], [2.0, -1.0, 0.5], atol=0.05)
    assert result.metrics["train_loss"] < 0.01


def test_training_survives_its_workers_killed_mid_run_and_gives_the_same_parameters(monkeypatch):
    import os
    import signal

    import psutil

    X, y = _blobs(n=2000, d=20, k=4, seed=11)
    ds = Dataset.from_numpy(X, y, num_shards=4, seed=0)
    config = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 20}
    head = daskray.api._runtime.cluster.head.pid
    workers = [p for p in psutil.Process(head).children() if "start_worker" in " ".join(p.cmdline())]
    killed_after_epochs = []
    record = Trainer._record

    def record_then_kill(self, entry, *args):
        stop = record(self, entry, *args)
        if not killed_after_epochs:
            # the first epoch's metrics are in and the next epoch is submitted: every
            # worker dies here (whichever holds the shard groups), mid-run by construction
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
            killed_after_epochs.append(entry[0] + 1)
        return stop

    monkeypatch.setattr(Trainer, "_record", record_then_kill)
    from daskray.ml import FailureConfig

    result = Trainer(model=models.SoftmaxRegression(), train_config=config,
                     failure_config=FailureConfig(max_failures=3)).fit(ds)
    assert killed_after_epochs == [1]
    assert len(result.metrics_dataframe) == config["epochs"]
    reference = reference_fit(models.SoftmaxRegression(), daskray.get(ds.shards), config,
                              classes=ds.classes)
    for key in reference:
        assert np.array_equal(result.checkpoint.params[key], reference[key]), key


class SeedStyleClassifier(daskray.ml.Model):
    """A seed-style softmax model: parameters made in __init__, forward(X) only."""

    task = "multiclass"

    def __init__(self):
        self.w = np.zeros((5, 3))
        self.b = np.zeros(3)

    def forward(self, X):
        z = X @ self.w + self.b
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


class BalancedAccuracy(daskray.ml.Evaluation):
    def __call__(self, predictions, labels):
        classes = np.unique(labels)
        return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))


def test_the_seeds_shape_searches_by_seed_with_an_evaluator():
    from daskray.ml import TuneConfig

    X, y = _blobs(n=240, d=5, k=3, seed=9)
    dataset = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    best = Trainer(config=TuneConfig(metric="score", mode="max", num_samples=3),
                   model=SeedStyleClassifier, evaluator=BalancedAccuracy,
                   train_config={"epochs": 3, "batch_size": 240, "lr": 0.5}).fit(dataset)
    seeds = sorted(r.config["seed"] for r in best.grid)
    assert len(set(seeds)) == 3  # without a search space, trials differ by seed
    assert best.metrics["score"] > 0.8
    assert best.metrics["score"] == max(r.metrics["score"] for r in best.grid)


def test_an_evaluator_adds_its_metric_to_every_epoch(backend):
    X, y = _blobs(n=300, seed=4)
    train, valid = Dataset.from_numpy(X, y, num_shards=3, seed=0).train_test_split(0.3, seed=0)
    result = Trainer(model=models.SoftmaxRegression(), evaluator=BalancedAccuracy(),
                     train_config={"epochs": 3, "lr": 0.5, "batch_size": 64}).fit(train, valid)
    assert list(result.metrics_dataframe.columns).count("score") == 1
    assert result.metrics_dataframe["score"].between(0, 1).all()


def test_run_config_stops_at_a_training_iteration_and_carries_the_failure_config():
    from daskray.ml import FailureConfig

    X, y = _blobs(n=400, d=5, k=3, seed=2)
    ds = Dataset.from_numpy(X, y, num_shards=2, seed=0)
    run = RunConfig(stop={"training_iteration": 3}, failure_config=FailureConfig(max_failures=7))
    trainer = Trainer(model=models.SoftmaxRegression(), run_config=run,
                      train_config={"epochs": 20, "batch_size": 100, "lr": 0.1})
    assert trainer.failure.max_failures == 7
    result = trainer.fit(ds)
    assert list(result.metrics_dataframe["training_iteration"]) == [1, 2, 3]
    assert result.metrics["training_iteration"] == 3
