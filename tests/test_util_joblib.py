"""daskray.util.joblib: joblib's (and so scikit-learn's) n_jobs work on the
cluster, with results equal to joblib's default backend's; errors, abort and
cancel; on both backends."""

from __future__ import annotations

import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import daskray
from daskray.util.joblib import DaskrayBackend, register_daskray, register_ray
from helpers import NUM_WORKERS, mark_started, wait_for_path, wait_until

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(120)]

GRID = {"C": [1.0, 10.0], "gamma": [1e-3, 1e-4]}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.data, data.target


@pytest.fixture(scope="module")
def default_backend_search(digits):
    """The GridSearchCV of the tests run by joblib's default backend (loky, 2 jobs);
    loky's worker processes are stopped afterwards."""
    from joblib.externals.loky import get_reusable_executor

    try:
        return GridSearchCV(SVC(), GRID, cv=2, n_jobs=2).fit(*digits)
    finally:
        get_reusable_executor().shutdown(wait=True)


@pytest.fixture(autouse=True)
def registered():
    register_daskray()
    register_ray()


def block_until_cancelled(started: str, interrupted: str, release: str) -> str:
    """Say it runs, then wait (at most 60 s) for ``release``; if it is stopped
    meanwhile (cancelled), say so in ``interrupted``."""
    mark_started(started)
    try:
        wait_until(lambda: os.path.exists(release), 60)
    except BaseException:
        mark_started(interrupted)
        raise
    return "not cancelled"


def fail_once_started(started: str) -> None:
    """Raise once ``started`` exists (the other call of the test runs by then)."""
    wait_until(lambda: os.path.exists(started), 60)
    raise ValueError(f"failed on purpose after {os.path.basename(started)}")


def pids_of_nested_calls() -> tuple[int, list]:
    """A joblib call made inside a batch: where its calls run."""
    return os.getpid(), Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(4))


def weighted_sum(values, weights, *, scale):
    return float((values * weights).sum() * scale.mean())


def test_grid_search_scores_equal_the_default_backends(backend, digits, default_backend_search):
    with joblib.parallel_backend("daskray"):
        search = GridSearchCV(SVC(), GRID, cv=2, n_jobs=-1).fit(*digits)
    ours, theirs = search.cv_results_, default_backend_search.cv_results_
    assert ours["params"] == theirs["params"]
    for key in ("split0_test_score", "split1_test_score", "mean_test_score", "rank_test_score"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert search.best_params_ == default_backend_search.best_params_


def test_random_forest_predictions_equal_the_default_backends(backend, digits):
    X, y = digits
    expected = RandomForestClassifier(n_estimators=12, random_state=0).fit(X, y)
    with joblib.parallel_backend("ray"):  # Ray's name for the same backend
        forest = RandomForestClassifier(n_estimators=12, random_state=0, n_jobs=-1).fit(X, y)
    np.testing.assert_array_equal(forest.predict_proba(X), expected.predict_proba(X))
    np.testing.assert_array_equal(forest.predict(X), expected.predict(X))


def test_batches_run_on_the_cluster_with_its_cpus(backend):
    with joblib.parallel_backend("daskray"):
        assert joblib.effective_n_jobs() == int(daskray.cluster_resources()["CPU"]) == NUM_WORKERS
        assert joblib.effective_n_jobs(-2) == NUM_WORKERS - 1
        assert joblib.effective_n_jobs(3) == 3
        pids = Parallel(batch_size=1)(delayed(os.getpid)() for _ in range(12))
    assert len(pids) == 12 and os.getpid() not in pids


def test_joblib_calls_inside_a_batch_run_in_its_task(backend):
    with joblib.parallel_backend("daskray"):
        [(task_pid, nested)] = Parallel(n_jobs=2)(delayed(pids_of_nested_calls)() for _ in [0])
    assert task_pid != os.getpid() and set(nested) == {task_pid}


def test_large_arguments_reach_every_call(backend):
    values, weights = np.arange(50_000.0), np.linspace(0, 1, 50_000)
    scale = np.full(20_000, 2.0)
    calls = [delayed(weighted_sum)(values + i, weights, scale=scale) for i in range(6)]
    expected = Parallel(n_jobs=1)(calls)
    with joblib.parallel_backend("daskray"):
        assert Parallel(batch_size=2)(calls) == expected
        assert Parallel(batch_size=1)(delayed(len)(values) for _ in range(3)) == [50_000] * 3


def test_a_failing_call_raises_its_own_error_and_the_others_are_cancelled(backend, tmp_path):
    started, interrupted = str(tmp_path / "started"), str(tmp_path / "interrupted")
    calls = [delayed(block_until_cancelled)(started, interrupted, str(tmp_path / "release")),
             delayed(fail_once_started)(started)]
    with joblib.parallel_backend("daskray"):
        with pytest.raises(ValueError, match="failed on purpose after started"):
            Parallel(n_jobs=2, batch_size=1)(calls)
    wait_for_path(interrupted, timeout=30)  # cancelled, not left to run its 60 s


def test_the_backend_pickles_without_its_thread():
    import pickle

    backend = DaskrayBackend(remote_args={"num_cpus": 1})
    assert pickle.loads(pickle.dumps(backend)).remote_args == {"num_cpus": 1}


def test_import_daskray_does_not_import_joblib():
    code = ("import sys, daskray, daskray.util, daskray.util.multiprocessing; "
            "assert 'joblib' not in sys.modules, 'joblib was imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
