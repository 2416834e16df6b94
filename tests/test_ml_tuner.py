"""daskray.ml's Tuner on a real cluster: function trainables that report, early
stopping that really stops them, stop conditions, errors and retries from
checkpoints; the Trainer search (exact against the single-process algorithm,
the same trials on any number of workers); and a digits search against
scikit-learn's RandomizedSearchCV."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import daskray
from daskray import ml
from daskray.ml import (
    ASHAScheduler, Checkpoint, Dataset, FailureConfig, RunConfig, Trainer, TuneConfig, Tuner,
    models, reference_fit, tune,
)
from daskray.ml.search import _SearchSpec, _Shards, _linear_fast_path, generate_configs, train_trial
from daskray.ml.steps import full_config

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(120)]


# ---------------------------------------------------------------------- function trainables


def curve(config):
    """A made-up training curve: the loss falls faster for a larger lr."""
    for i in range(config.get("iterations", 5)):
        ml.report({"loss": 1.0 / (1.0 + config["lr"] * (i + 1)), "executed": i + 1})


def test_reports_add_iteration_time_and_config_and_every_report_is_kept(backend):
    grid = Tuner(curve, param_space={"lr": tune.grid_search([0.1, 1.0, 10.0])},
                 tune_config=TuneConfig(metric="loss", mode="min")).fit()
    assert len(grid) == 3 and grid.num_terminated == 3 and grid.num_errors == 0
    for result, lr in zip(grid, (0.1, 1.0, 10.0)):
        frame = result.metrics_dataframe
        assert list(frame["training_iteration"]) == [1, 2, 3, 4, 5]
        assert list(frame["executed"]) == [1, 2, 3, 4, 5]
        assert frame["time_total_s"].is_monotonic_increasing and frame["time_total_s"].iloc[0] >= 0
        assert (frame["config/lr"] == lr).all()
        assert result.metrics["config"] == {"lr": lr} and result.config == {"lr": lr}
        assert result.metrics["loss"] == pytest.approx(1 / (1 + lr * 5))
    table = grid.get_dataframe()
    assert list(table["config/lr"]) == [0.1, 1.0, 10.0] and list(table["trial_id"]) == [0, 1, 2]
    assert grid.get_best_result().config["lr"] == 10.0
    assert grid.get_best_result("loss", "max").config["lr"] == 0.1


def uses_data(config, data, offset):
    ml.report({"loss": float(data.sum()) + offset + config["x"]})


def test_with_parameters_passes_large_arguments_to_every_trial(backend):
    data = np.arange(100_000, dtype=np.float64)
    grid = Tuner(tune.with_parameters(uses_data, data=data, offset=1.0),
                 param_space={"x": tune.grid_search([0.0, 1.0])}).fit()
    assert [r.metrics["loss"] for r in grid] == [data.sum() + 1.0, data.sum() + 2.0]
    with pytest.raises(TypeError, match="cannot be called as trainable"):
        tune.with_parameters(uses_data, data=data)  # offset is missing


def up_then_down(config):
    """Loss 1, 2, 3 then a last report: 'all' and 'last' scopes disagree."""
    for value in config["path"]:
        ml.report({"loss": value})


def test_best_result_by_last_or_by_all_reports(backend):
    grid = Tuner(up_then_down, param_space={"path": tune.grid_search([(0.1, 5.0), (1.0, 2.0)])},
                 tune_config=TuneConfig(metric="loss", mode="min")).fit()
    assert grid.get_best_result(scope="last").config["path"] == (1.0, 2.0)
    assert grid.get_best_result(scope="all").config["path"] == (0.1, 5.0)
    best_rows = grid.get_dataframe(filter_metric="loss", filter_mode="min")
    assert list(best_rows["loss"]) == [0.1, 1.0]


def counted(config):
    """Writes one line per iteration it really runs, then reports."""
    path = os.path.join(config["dir"], f"{config['lr']!r}.log")
    for i in range(40):
        with open(path, "a") as f:
            f.write(f"{i}\n")
        ml.report({"loss": 1.0 / (1.0 + config["lr"] * (i + 1)), "executed": i + 1})


def test_asha_stops_poor_trials_and_their_functions_stop_running(backend, tmp_path):
    grid = Tuner(counted, param_space={"lr": tune.loguniform(1e-3, 10), "dir": str(tmp_path)},
                 tune_config=TuneConfig(metric="loss", mode="min", num_samples=16, seed=3,
                                        max_concurrent_trials=2,
                                        scheduler=ASHAScheduler(max_t=9, grace_period=1,
                                                                reduction_factor=3))).fit()
    iterations = [r.metrics["training_iteration"] for r in grid]
    assert set(iterations) <= {1, 3, 9}, iterations  # stopped at rungs or at max_t
    assert sum(i < 9 for i in iterations) >= 8  # most trials were stopped early
    for result in grid:  # ... and ran no further than they reported
        lines = (tmp_path / f"{result.config['lr']!r}.log").read_text().split()
        assert len(lines) == result.metrics["training_iteration"] == result.metrics["executed"]
    best = max(grid, key=lambda r: r.config["lr"])  # the largest lr is best at every rung
    assert best.metrics["training_iteration"] == 9 and grid.get_best_result() is best


def test_stop_conditions_end_trials():
    space = {"lr": tune.grid_search([0.5, 4.0]), "iterations": 20}
    by_iteration = Tuner(curve, param_space=space,
                         run_config=RunConfig(stop={"training_iteration": 4})).fit()
    assert [r.metrics["executed"] for r in by_iteration] == [4, 4]
    by_metric = Tuner(curve, param_space=space, run_config=RunConfig(stop={"loss": 0.2})).fit()
    # 1/(1+lr*i) <= 0.2 first at i=8 for lr=0.5, at i=1 for lr=4; mode "min": at or below
    assert [r.metrics["executed"] for r in by_metric] == [8, 1]
    by_function = Tuner(curve, param_space=space, run_config=RunConfig(
        stop=lambda trial_id, result: result["executed"] == 3 + trial_id)).fit()
    assert [r.metrics["executed"] for r in by_function] == [3, 4]


def fails_for_large_lr(config):
    for i in range(3):
        if config["lr"] > 1 and i == 2:
            raise ValueError(f"lr {config['lr']} diverged")
        ml.report({"loss": config["lr"] * (i + 1)})


def test_a_trial_that_raises_has_its_error_and_the_search_goes_on(backend):
    grid = Tuner(fails_for_large_lr, param_space={"lr": tune.grid_search([0.5, 2.0, 0.25])}).fit()
    assert grid.num_errors == 1 and grid.num_terminated == 2
    failed = grid[1]
    assert isinstance(failed.error, ValueError) and "lr 2.0 diverged" in str(failed.error)
    assert "fails_for_large_lr" in "".join(getattr(failed.error, "__notes__", []))  # its traceback
    assert list(failed.metrics_dataframe["training_iteration"]) == [1, 2]  # what it reported
    assert grid.errors == [failed.error]
    assert grid.get_best_result().config["lr"] == 0.25  # errored trials are not ranked


def flaky(config):
    """Checkpoints every other iteration; the first run fails at iteration 6."""
    checkpoint = ml.get_checkpoint()
    start = checkpoint.epoch + 1 if checkpoint else 0
    marker = os.path.join(config["dir"], f"failed-{config['how']}")
    for i in range(start, 8):
        if i == 5 and not os.path.exists(marker):
            open(marker, "w").close()
            if config["how"] == "kill":
                os._exit(1)  # the worker dies
            raise RuntimeError("transient failure")
        ml.report({"loss": 8.0 - i, "resumed_at": start},
                  checkpoint=Checkpoint({"w": np.full(2, i)}, i) if i % 2 == 0 else None)


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failed_trial_resumes_from_its_last_checkpoint(tmp_path, how):
    grid = Tuner(flaky, param_space={"dir": str(tmp_path), "how": how},
                 failure_config=FailureConfig(max_failures=1)).fit()
    result = grid[0]
    assert result.error is None, result.error
    frame = result.metrics_dataframe
    assert list(frame["training_iteration"]) == list(range(1, 9))  # each iteration once
    assert list(frame["resumed_at"]) == [0] * 5 + [5] * 3  # the checkpoint of iteration 5
    assert result.checkpoint.epoch == 6 and (result.checkpoint.params["w"] == 6).all()
    # without retries the failure is the trial's error
    (tmp_path / f"failed-{how}").unlink()
    if how == "raise":
        failed = Tuner(flaky, param_space={"dir": str(tmp_path), "how": how}).fit()[0]
        assert isinstance(failed.error, RuntimeError)
        assert list(failed.metrics_dataframe["training_iteration"]) == [1, 2, 3, 4, 5]


def test_param_space_sampling_is_reproducible_with_a_seed():
    space = {"lr": tune.loguniform(1e-4, 1), "batch": tune.choice([16, 32]),
             "depth": tune.randint(1, 4), "act": tune.grid_search(["relu", "tanh"]), "k": 7}
    first, again = generate_configs(space, 5, seed=1), generate_configs(space, 5, seed=1)
    assert first == again and len(first) == 10
    assert first != generate_configs(space, 5, seed=2)
    assert [c["act"] for c in first[:4]] == ["relu", "tanh", "relu", "tanh"]
    assert all(1e-4 <= c["lr"] <= 1 and c["batch"] in (16, 32) and 1 <= c["depth"] < 4
               and c["k"] == 7 for c in first)
    grid = generate_configs({"batch": tune.choice([16, 32]), "depth": tune.randint(1, 4)}, 1, 0,
                            "grid")
    assert sorted((c["batch"], c["depth"]) for c in grid) == [
        (b, d) for b in (16, 32) for d in (1, 2, 3)]
    seen = Tuner(curve, param_space={"lr": tune.uniform(0.1, 2)},
                 tune_config=TuneConfig(num_samples=4, seed=5)).fit()
    assert [r.config for r in seen] == generate_configs({"lr": tune.uniform(0.1, 2)}, 4, 5)


def test_bad_arguments_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(TypeError, match="function train_fn"):
        Tuner(42)
    with pytest.raises(TypeError, match="one argument, the trial's config"):
        Tuner(lambda: None)
    with pytest.raises(TypeError, match="tune_config must be a TuneConfig"):
        Tuner(curve, tune_config={"metric": "loss"})
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        TuneConfig(mode="best")
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        TuneConfig(num_samples=0)
    with pytest.raises(ValueError, match="unknown search_alg 'bayes'"):
        TuneConfig(search_alg="bayes")
    with pytest.raises(TypeError, match=r"ASHAScheduler\(...\) or FIFOScheduler\(...\) instance"):
        TuneConfig(scheduler=ASHAScheduler)
    with pytest.raises(ValueError, match="needs a finite space, but 'lr' is LogUniform"):
        generate_configs({"lr": tune.loguniform(1e-3, 1)}, 1, 0, "grid")
    with pytest.raises(ValueError, match="0 < low < high"):
        tune.loguniform(0, 1)
    with pytest.raises(ValueError, match="reduction_factor must be an int >= 2"):
        ASHAScheduler(reduction_factor=1)
    with pytest.raises(TypeError, match="stop must be a dict"):
        Tuner(curve, run_config=RunConfig(stop="loss"))
    with pytest.raises(RuntimeError, match="outside a trial"):
        ml.report({"loss": 1.0})
    assert ml.get_checkpoint() is None
    with pytest.raises(TypeError, match="takes datasets only for a Trainer"):
        Tuner(curve, param_space={"lr": 1.0}).fit(object())
    grid = Tuner(curve, param_space={"lr": 1.0}).fit()
    with pytest.raises(ValueError, match="unknown scope 'median'"):
        grid.get_best_result(scope="median")
    with pytest.raises(RuntimeError, match="no trial reported 'accuracy'"):
        grid.get_best_result("accuracy", "max")


def reports_wrongly(config):
    ml.report(config["what"])


def test_mistakes_inside_a_trial_become_its_error():
    grid = Tuner(reports_wrongly, param_space={"what": tune.grid_search([3.0, {"acc": 1.0}])},
                 tune_config=TuneConfig(metric="loss", scheduler=ASHAScheduler(max_t=4))).fit()
    assert isinstance(grid[0].error, TypeError) and "dict of metrics" in str(grid[0].error)
    assert isinstance(grid[1].error, ValueError)
    assert "ranks trials by 'loss'" in str(grid[1].error)  # ASHA needs the metric at a rung
    unknown = Tuner(curve, param_space={"lr": 1.0},
                    run_config=RunConfig(stop={"accuracy": 0.9})).fit()[0]
    assert isinstance(unknown.error, ValueError) and "did not report" in str(unknown.error)


# ---------------------------------------------------------------------- the Trainer search


def _blobs(n=300, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


@pytest.mark.parametrize("model", [models.SoftmaxRegression(), models.LogisticRegression(),
                                   models.LinearRegression(), models.MLP(hidden=(6,))],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("cuts", [(61, 98, 178), (50, 100, 150)], ids=["unequal", "equal"])
def test_a_trial_trains_bit_for_bit_as_reference_fit(model, cuts):
    X, y = _blobs(n=200, seed=4)
    if model.task == "binary":
        y = (y > 0).astype(int)
    # batch 5: 40 steps, some shards' share of a step is empty (unequal) or 1 or 2
    # rows; batch 200 on equal shards: every step has equal shares
    shards = [(X[r], y[r]) for r in np.split(np.random.default_rng(1).permutation(200), cuts)]
    classes = None if model.task == "regression" else np.unique(y)
    data = _Shards(shards, shards[:1], classes)
    spec = _SearchSpec(model, classes, None, len(shards), None, "loss", "min")
    for config in ({"optimizer": "sgd", "lr": 0.05, "batch_size": 5, "l2": 1e-3, "seed": 3},
                   {"optimizer": "momentum", "lr": 0.02, "batch_size": 64, "seed": 1},
                   {"optimizer": "adam", "lr": 0.01, "batch_size": 200, "l2": 0.1, "seed": 2}):
        config = full_config({**config, "epochs": 3})
        state, _, _ = train_trial(spec, data, 0, config, None, 1)  # in two segments
        (params, _, epochs, _), rows, _ = train_trial(spec, data, 0, config, state, 3)
        expected = reference_fit(model, shards, config, classes=classes)
        assert epochs == 3 and [r["training_iteration"] for r in rows] == [2, 3]
        for key in expected:
            assert np.array_equal(params[key], expected[key]), (config, key)
    fast = isinstance(model, (models.SoftmaxRegression, models.LogisticRegression,
                              models.LinearRegression))
    assert _linear_fast_path(model) == fast  # the fast path is the one tested


def _digits(num_shards=4):
    from sklearn.datasets import load_digits

    data = load_digits()
    ds = Dataset.from_numpy(data.data, data.target, num_shards=num_shards, seed=0)
    rest, test = ds.train_test_split(test_size=0.2, seed=0)
    train, valid = rest.train_test_split(test_size=0.25, seed=1)
    train, stats = train.standardize()
    return train, valid.standardize(stats)[0], test.standardize(stats)[0]


def test_tuner_with_a_trainer_searches_it_exactly_with_stop_conditions():
    train, valid, _ = _digits()
    trainer = Trainer(model=models.SoftmaxRegression(),
                      train_config={"optimizer": "sgd", "batch_size": 64, "epochs": 6, "l2": 1e-4})
    grid = Tuner(trainer, param_space={"lr": tune.grid_search([0.01, 0.1, 0.5])},
                 tune_config=TuneConfig(metric="valid_loss", mode="min"),
                 run_config=RunConfig(stop={"training_iteration": 4})).fit(train, valid=valid)
    assert len(grid) == 3 and grid.num_errors == 0
    shards = daskray.get(train.shards)
    for result in grid:
        assert list(result.metrics_dataframe["training_iteration"]) == [1, 2, 3, 4]
        expected = reference_fit(models.SoftmaxRegression(), shards,
                                 {**result.config, "epochs": 4}, classes=train.classes)
        for key in expected:
            assert np.array_equal(result.checkpoint.params[key], expected[key])
    best = grid.get_best_result()
    assert best.metrics["valid_loss"] == min(r.metrics["valid_loss"] for r in grid)
    searching = Trainer(config=TuneConfig(metric="valid_loss", num_samples=2), model=trainer.model,
                        train_config=trainer.config, param_space={"lr": tune.uniform(0.01, 0.1)})
    inherited = Tuner(searching).fit(train, valid=valid)  # the Trainer's own search
    assert len(inherited) == 2 and all(0.01 <= r.config["lr"] <= 0.1 for r in inherited)
    with pytest.raises(ValueError, match=r"param_space keys \['learning_rate'\]"):
        Tuner(trainer, param_space={"learning_rate": 0.1}).fit(train)
    with pytest.raises(TypeError, match="needs the training Dataset"):
        Tuner(trainer).fit()


def _sequential_asha(train, valid, configs, scheduler, metric="loss"):
    """ASHA run trial after trial in this process: each rung sees the trials before."""
    spec = _SearchSpec(models.SoftmaxRegression, train.classes, None, train.num_shards, None,
                       metric, "min")
    data = _Shards(daskray.get(train.shards), daskray.get(valid.shards), train.classes)
    out = []
    for i, config in enumerate(configs):
        state, rows = None, []
        while True:
            done = state[2] if state else 0
            state, new, _ = train_trial(spec, data, i, config, state, scheduler.next_stop(done))
            rows += new
            if not np.isfinite(rows[-1]["loss"]) or not scheduler.decide(state[2], rows[-1][metric],
                                                                          "min"):
                break
        out.append((rows, state[0]))
    return out


def test_a_trainer_search_gives_the_same_trials_as_one_process_whatever_the_window(backend):
    train, valid, _ = _digits()
    space = {"lr": tune.loguniform(1e-3, 1.0), "batch_size": tune.choice([32, 128])}
    grids = [Trainer(config=TuneConfig(num_samples=30, seed=4, max_concurrent_trials=window,
                                       scheduler=ASHAScheduler(max_t=9)),
                     model=models.SoftmaxRegression, train_config={"epochs": 9},
                     param_space=space).fit(train, valid=valid).grid
             for window in (None, 2)]
    configs = [r.config for r in grids[0]]
    expected = _sequential_asha(train, valid, configs, ASHAScheduler(max_t=9))
    assert sum(len(rows) < 9 for rows, _ in expected) >= 15  # ASHA did stop trials
    for grid in grids:
        assert [r.config for r in grid] == configs
        for result, (rows, params) in zip(grid, expected):
            frame = result.metrics_dataframe.drop(columns="time_total_s")
            assert frame.to_dict("records") == [
                {k: v for k, v in row.items() if k != "time_total_s"} for row in rows]
            assert all(np.array_equal(result.checkpoint.params[k], params[k]) for k in params)


def _digits_search(train, valid):
    return Trainer(config=TuneConfig(num_samples=20, seed=7, scheduler=ASHAScheduler(max_t=9)),
                   model=models.SoftmaxRegression, train_config={"epochs": 9},
                   param_space={"lr": tune.loguniform(1e-3, 1.0)}).fit(train, valid=valid).grid


def test_one_process_gives_the_same_search_as_the_cluster(restart_cluster, tmp_path):
    train, valid, _ = _digits()
    on_cluster = _digits_search(train, valid)
    daskray.shutdown()
    daskray.init(local_mode=True)
    train, valid, _ = _digits()
    in_process = _digits_search(train, valid)
    for a, b in zip(on_cluster, in_process):
        assert a.config == b.config
        assert a.metrics_dataframe.drop(columns="time_total_s").equals(
            b.metrics_dataframe.drop(columns="time_total_s"))
        assert all(np.array_equal(a.checkpoint.params[k], b.checkpoint.params[k])
                   for k in a.checkpoint.params)
    # function trainables in one process (the controller is a local object): trials
    # run one after another, so each rung judges them in trial order
    (tmp_path / "asha").mkdir()
    space = {"lr": tune.loguniform(1e-3, 10), "dir": str(tmp_path / "asha")}
    grid = Tuner(counted, param_space=space, tune_config=TuneConfig(
        num_samples=16, seed=3, scheduler=ASHAScheduler(max_t=9))).fit()
    scheduler, expected = ASHAScheduler(max_t=9), []
    for config in generate_configs(space, 16, 3):
        done = scheduler.next_stop(0)
        while scheduler.decide(done, 1.0 / (1.0 + config["lr"] * done), "min"):
            done = scheduler.next_stop(done)
        expected.append(done)
    assert [r.metrics["training_iteration"] for r in grid] == expected
    retried = Tuner(flaky, param_space={"dir": str(tmp_path), "how": "raise"},
                    failure_config=FailureConfig(max_failures=1)).fit()[0]
    assert list(retried.metrics_dataframe["resumed_at"]) == [0] * 5 + [5] * 3


def test_asha_on_digits_is_within_5_percent_of_sklearn_randomized_search():
    """Fair terms: both searches see the same training rows, the same ~100-config
    budget and the same 27-epoch cap; each picks its best without looking at the
    test rows (ASHA ranks by the validation split, RandomizedSearchCV by 3-fold CV
    on training + validation rows, then refits on them); both are scored on the
    held-out test split by the same log loss.  SGDClassifier gets its own kind of
    space (per-row SGD has no batch size; its learning-rate schedules instead)."""
    from scipy.stats import loguniform
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import log_loss
    from sklearn.model_selection import RandomizedSearchCV

    train, valid, test = _digits()
    best = Trainer(
        config=TuneConfig(metric="loss", mode="min", num_samples=100, seed=0,
                          scheduler=ASHAScheduler(max_t=27, grace_period=1, reduction_factor=3)),
        model=models.SoftmaxRegression, train_config={"epochs": 27, "optimizer": "sgd"},
        param_space={"lr": tune.loguniform(1e-3, 1), "batch_size": tune.choice([32, 128, 512]),
                     "l2": tune.loguniform(1e-6, 1e-1)},
    ).fit(train, valid=valid)
    X_test, y_test = test.to_numpy()
    ours = models.SoftmaxRegression().loss(best.checkpoint.params, X_test, y_test) / len(y_test)

    X = np.concatenate([train.to_numpy()[0], valid.to_numpy()[0]])
    y = np.concatenate([train.to_numpy()[1], valid.to_numpy()[1]])
    search = RandomizedSearchCV(
        SGDClassifier(loss="log_loss", max_iter=27, tol=None, random_state=0),
        {"alpha": loguniform(1e-6, 1e-1), "eta0": loguniform(1e-3, 1),
         "learning_rate": ["optimal", "constant", "invscaling", "adaptive"]},
        n_iter=100, cv=3, scoring="neg_log_loss", n_jobs=2, random_state=0,
    ).fit(X, y)
    theirs = log_loss(y_test, search.best_estimator_.predict_proba(X_test))
    print(f"test log loss: daskray ASHA {ours:.4f} (valid {best.metrics['loss']:.4f}, "
          f"{len(best.grid)} configs), sklearn RandomizedSearchCV {theirs:.4f} "
          f"(CV {-search.best_score_:.4f})")
    assert math.isfinite(ours) and ours <= 1.05 * theirs, (ours, theirs)
