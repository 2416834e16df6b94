"""Objects that earlier versions of daskray.ml pickled keep loading.

Users keep checkpoints, results and search spaces on disk; a pickle names each
class by the module it lived in then.  The literals below were pickled (protocol
4) by the version where ``Checkpoint`` and ``Result`` lived in
``daskray.ml.trainer``, the search in ``daskray.ml.tune`` and ``Model`` in
``daskray.ml.models``; the classes have moved since, and the old names must
still lead to them.
"""

import pickle

import pytest

from daskray.ml import Checkpoint, Result, ResultGrid, models, tune

#: Checkpoint({"w": [0.5, -1.0]}, 3, {"t": 1}, {"lr": 0.1})
OLD_CHECKPOINT = (
    b"\x80\x04\x95\x8c\x00\x00\x00\x00\x00\x00\x00\x8c\x12daskray.ml.trainer\x94\x8c\n"
    b"Checkpoint\x94\x93\x94)\x81\x94}\x94(\x8c\x06params\x94}\x94\x8c\x01w\x94]\x94(G?\xe0"
    b"\x00\x00\x00\x00\x00\x00G\xbf\xf0\x00\x00\x00\x00\x00\x00es\x8c\x05epoch\x94K\x03\x8c"
    b"\topt_state\x94}\x94\x8c\x01t\x94K\x01s\x8c\x06config\x94}\x94\x8c\x02lr\x94G?\xb9"
    b"\x99\x99\x99\x99\x99\x9asub.")

#: Result({"loss": 0.25}, None, None, config={"lr": 0.1})
OLD_RESULT = (
    b"\x80\x04\x95\xa9\x00\x00\x00\x00\x00\x00\x00\x8c\x12daskray.ml.trainer\x94\x8c\x06"
    b"Result\x94\x93\x94)\x81\x94}\x94(\x8c\x07metrics\x94}\x94\x8c\x04loss\x94G?\xd0\x00"
    b"\x00\x00\x00\x00\x00s\x8c\x11metrics_dataframe\x94N\x8c\ncheckpoint\x94N\x8c\x05error"
    b"\x94N\x8c\x10best_checkpoints\x94]\x94\x8c\x06config\x94}\x94\x8c\x02lr\x94G?\xb9\x99"
    b"\x99\x99\x99\x99\x9as\x8c\x04grid\x94Nub.")

#: tune.ResultGrid([], "loss", "min")
OLD_GRID = (
    b"\x80\x04\x95U\x00\x00\x00\x00\x00\x00\x00\x8c\x0fdaskray.ml.tune\x94\x8c\nResultGrid"
    b"\x94\x93\x94)\x81\x94}\x94(\x8c\x07results\x94]\x94\x8c\x07_metric\x94\x8c\x04loss\x94"
    b"\x8c\x05_mode\x94\x8c\x03min\x94ub.")

#: {"lr": tune.loguniform(1e-3, 1.0), "h": tune.grid_search([1, 2])}
OLD_SPACE = (
    b"\x80\x04\x95y\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x02lr\x94\x8c\x0fdaskray.ml.tune"
    b"\x94\x8c\x0b_LogUniform\x94\x93\x94)\x81\x94}\x94(\x8c\x03low\x94G?PbM\xd2\xf1\xa9\xfc"
    b"\x8c\x04high\x94G?\xf0\x00\x00\x00\x00\x00\x00ub\x8c\x01h\x94h\x02\x8c\x05_Grid\x94"
    b"\x93\x94)\x81\x94}\x94\x8c\x06values\x94K\x01K\x02\x86\x94sbu.")

#: models.Model()
OLD_MODEL = (
    b"\x80\x04\x95\"\x00\x00\x00\x00\x00\x00\x00\x8c\x11daskray.ml.models\x94\x8c\x05"
    b"Model\x94\x93\x94)\x81\x94.")


def test_a_checkpoint_pickled_as_daskray_ml_trainer_checkpoint_loads():
    assert b"daskray.ml.trainer\x94\x8c\nCheckpoint" in OLD_CHECKPOINT
    checkpoint = pickle.loads(OLD_CHECKPOINT)
    assert type(checkpoint) is Checkpoint
    assert checkpoint == Checkpoint({"w": [0.5, -1.0]}, 3, {"t": 1}, {"lr": 0.1})


def test_a_result_pickled_as_daskray_ml_trainer_result_loads():
    result = pickle.loads(OLD_RESULT)
    assert type(result) is Result
    assert result == Result({"loss": 0.25}, None, None, config={"lr": 0.1})


def test_a_result_grid_pickled_from_daskray_ml_tune_loads():
    grid = pickle.loads(OLD_GRID)
    assert type(grid) is ResultGrid and len(grid) == 0


def test_a_search_space_pickled_from_daskray_ml_tune_loads_and_samples_the_same():
    space = pickle.loads(OLD_SPACE)
    fresh = {"lr": tune.loguniform(1e-3, 1.0), "h": tune.grid_search([1, 2])}
    assert type(space["lr"]) is type(fresh["lr"]) and type(space["h"]) is type(fresh["h"])
    assert tune.generate_configs(space, 3, seed=5) == tune.generate_configs(fresh, 3, seed=5)


def test_a_model_pickled_as_daskray_ml_models_model_loads():
    assert type(pickle.loads(OLD_MODEL)) is models.Model


@pytest.mark.parametrize("cls", [Checkpoint, Result, ResultGrid, models.Model])
def test_new_pickles_of_moved_classes_load_too(cls):
    obj = {Checkpoint: lambda: Checkpoint({}, 0), Result: lambda: Result({}, None, None),
           ResultGrid: lambda: ResultGrid([]), models.Model: models.Model}[cls]()
    assert type(pickle.loads(pickle.dumps(obj))) is cls
