"""How the Trainer search runs its segments: each rung decides in trial order
whichever rung's outcome the search takes first, several segments share a task
(continuations from later rungs first), and a trial's DataFrame is made when read."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

import daskray
from daskray.ml import ASHAScheduler, Trainer, TuneConfig, models, search, tune
from daskray.ml.search import (
    _PACK_MAX_STEPS, _PACK_MIN_STEPS, FIFOScheduler, _Search, _SegmentRunner, _TrialResult,
)

pytestmark = pytest.mark.timeout(120)


def _loss(trial: int, epoch: int) -> float:
    """A made-up validation loss: the same for a trial and epoch whatever the order."""
    return float(np.random.default_rng([trial, epoch]).random())


class _InstantRunner:
    """A runner whose segments are done at once, with made-up losses; ``pick``
    chooses which of the outcomes the search waits on comes in first."""

    def __init__(self, pick) -> None:
        self.pick, self.needed, self.taken = pick, [], []

    def need(self, job: tuple) -> None:
        self.needed.append(job[0])

    def first_done(self, jobs: list) -> tuple:
        return self.pick(jobs)

    def take(self, job: tuple):
        self.taken.append(job[0])
        (trial, start), _, _, stop = job
        rows = [{"training_iteration": e, "loss": _loss(trial, e)} for e in range(start + 1, stop + 1)]
        return (None, None, stop, 0.0), rows, False

    def result(self, job: tuple):
        return self.take(job)


def _sequential(n: int, scheduler: ASHAScheduler, epochs: int) -> list[int]:
    """Epochs each trial runs when trials run one after another."""
    out = []
    for trial in range(n):
        done = 0
        while True:
            done = min(scheduler.next_stop(done), epochs)
            if done >= epochs or not scheduler.decide(done, _loss(trial, done), "min"):
                break
        out.append(done)
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("order", ["lowest rung first", "highest rung first", "random"])
def test_each_rung_decides_in_trial_order_whichever_rung_comes_in_first(order, window):
    rng = np.random.default_rng(5)
    pick = {"lowest rung first": lambda jobs: jobs[0],
            "highest rung first": lambda jobs: jobs[-1],
            "random": lambda jobs: jobs[int(rng.integers(len(jobs)))]}[order]
    configs = [{"epochs": 27} for _ in range(200)]
    found = _Search(configs, ASHAScheduler(max_t=27), TuneConfig(max_concurrent_trials=window), 0)
    runner = _InstantRunner(pick)
    found.run(runner)
    expected = _sequential(200, ASHAScheduler(max_t=27), 27)
    assert [found.states[i][2] for i in range(200)] == expected
    assert sorted(set(expected)) == [1, 3, 9, 27]  # every rung stopped some trials
    for trial, history in found.history.items():
        assert [r["training_iteration"] for r in history] == list(range(1, expected[trial] + 1))
    # each segment was taken once; every continuation was asked for before it was taken
    assert len(runner.taken) == len(set(runner.taken))
    assert set(runner.needed) == {key for key in runner.taken if key[1] > 0}


def _runner(first_steps: list[int], tasks_in_flight: int = 4) -> _SegmentRunner:
    """A runner over first segments of the given costs (nothing is submitted)."""
    ahead = [((i, 0), {"steps": s}, None, 1) for i, s in enumerate(first_steps)]
    return _SegmentRunner(None, [], tasks_in_flight, ahead,
                          lambda job: job[1]["steps"] * (job[3] - job[0][1]))


def test_a_task_takes_continuations_longest_first_then_first_segments_in_trial_order():
    runner = _runner([40] * 800)
    for trial, start, stop in ((7, 1, 3), (2, 3, 9), (5, 1, 3), (4, 9, 27)):
        runner.need(((trial, start), {"steps": 10}, "state", stop))
    pack = runner._pack()
    keys = [job[0] for job in pack]
    assert keys[:4] == [(4, 9), (2, 3), (5, 1), (7, 1)]
    assert keys[4:] == [(i, 0) for i in range(len(keys) - 4)]
    steps = sum(runner._steps_of(job) for job in pack)
    assert _PACK_MAX_STEPS <= steps < _PACK_MAX_STEPS + 40  # much waits: the biggest task
    # the job the search waits for goes first, and is not packed again
    first = ((9, 1), {"steps": 10}, "state", 3)
    runner.need(first)
    pack = runner._pack(first)
    assert pack[0] is first and [job[0] for job in pack].count((9, 1)) == 1


def test_tasks_get_smaller_as_the_work_left_shrinks():
    runner = _runner([10] * 600)  # 6,000 steps: a quarter each for 4 tasks in flight
    sizes = []
    while True:
        pack = runner._pack()
        if not pack:
            break
        runner._submitted.update(job[0] for job in pack)
        sizes.append(sum(runner._steps_of(job) for job in pack))
    assert sizes[0] == 1500 and sizes == sorted(sizes, reverse=True)
    assert min(sizes[:-1]) >= _PACK_MIN_STEPS and sum(sizes) == 6000


def test_a_trials_dataframe_is_made_when_read_and_pickles_either_way():
    rows = [{"training_iteration": 1, "loss": 0.5}, {"training_iteration": 2, "loss": 0.25}]
    result = _TrialResult(rows[-1], rows, None, None, [], {"lr": 0.1})
    assert "_frame" not in vars(result)
    copy = pickle.loads(pickle.dumps(result))  # before the frame is made
    assert result.metrics_dataframe.equals(pd.DataFrame(rows))
    assert copy.metrics_dataframe.equals(pd.DataFrame(rows))
    assert pickle.loads(pickle.dumps(result)).metrics_dataframe.equals(pd.DataFrame(rows))
    assert result.metrics_dataframe is result.metrics_dataframe  # made once
    assert isinstance(result, search.Result) and result.config == {"lr": 0.1}
    result.metrics_dataframe = pd.DataFrame({"loss": [1.0]})
    assert list(result.metrics_dataframe["loss"]) == [1.0]
    assert _TrialResult({}, [], None).metrics_dataframe.empty


def test_a_search_runs_far_fewer_tasks_than_segments(cluster, monkeypatch):
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = daskray.ml.Dataset.from_numpy(digits.data, digits.target, num_shards=4, seed=0)
    train, valid = data.train_test_split(test_size=0.2, seed=0)
    train, stats = train.standardize()
    tasks = []
    submit = _SegmentRunner._submit
    monkeypatch.setattr(_SegmentRunner, "_submit",
                        lambda self, jobs: (tasks.append(len(jobs)), submit(self, jobs)))
    grid = Trainer(config=TuneConfig(num_samples=150, seed=2, scheduler=ASHAScheduler(max_t=9)),
                   model=models.SoftmaxRegression, train_config={"epochs": 9},
                   param_space={"lr": tune.loguniform(1e-3, 1.0),
                                "batch_size": tune.choice([32, 128, 512])},
                   ).fit(train, valid=valid.standardize(stats)[0]).grid
    # a segment per trial and rung it went on from: 1, 3 and 9 epochs
    segments = sum(1 + (n > 1) + (n > 3) for n in
                   (r.metrics["training_iteration"] for r in grid))
    assert sum(tasks) == segments and grid.num_errors == 0
    assert len(tasks) * 3 <= segments, (len(tasks), segments)


def test_fifo_search_takes_each_trial_in_one_segment():
    configs = [{"epochs": 5} for _ in range(10)]
    found = _Search(configs, FIFOScheduler(), TuneConfig(), 0)
    runner = _InstantRunner(lambda jobs: jobs[0])
    found.run(runner)
    assert runner.taken == [(i, 0) for i in range(10)] and runner.needed == []
    assert all(found.states[i][2] == 5 for i in range(10))


class _FlakyRunner(_InstantRunner):
    """Segment (3, 1) raises once, trial 5's first segment always."""

    def __init__(self) -> None:
        super().__init__(lambda jobs: jobs[-1])
        self.retried: list = []

    def retry(self, job: tuple) -> None:
        self.retried.append(job[0])

    def take(self, job: tuple):
        outcome = super().take(job)
        if job[0] == (5, 0) or (job[0] == (3, 1) and (3, 1) not in self.retried):
            return RuntimeError(f"segment {job[0]} failed")
        return outcome


@pytest.mark.parametrize("window", [None, 2])
def test_a_failed_segment_is_retried_and_a_trial_failing_for_good_has_its_error(window):
    configs = [{"epochs": 27} for _ in range(40)]
    found = _Search(configs, ASHAScheduler(max_t=27), TuneConfig(max_concurrent_trials=window), 1)
    runner = _FlakyRunner()
    found.run(runner)
    assert runner.retried == [(3, 1), (5, 0)]
    assert set(found.errors) == {5} and "segment (5, 0) failed" in str(found.errors[5])
    # trial 5 reached no rung, so the others are judged as if it did not exist
    scheduler, expected = ASHAScheduler(max_t=27), []
    for trial in range(40):
        done = 0
        while trial != 5:
            done = scheduler.next_stop(done)
            if done >= 27 or not scheduler.decide(done, _loss(trial, done), "min"):
                break
        expected.append(done)
    assert [found.states.get(i, (None, None, 0))[2] for i in range(40)] == expected
    grid = found.grid()
    assert grid.num_errors == 1 and grid[5].error is found.errors[5] and grid[5].checkpoint is None


@pytest.mark.parametrize("mode", ["min", "max"])
def test_asha_keeps_the_best_third_of_the_trials_so_far_at_each_rung(mode):
    scheduler, seen = ASHAScheduler(max_t=27), {1: [], 3: []}
    rng = np.random.default_rng(0)
    for rung, value in zip(rng.choice([1, 3], 300), rng.random(300)):
        seen[rung].append(value)
        ranked = sorted(seen[rung], reverse=mode == "max")
        expected = ranked.index(value) < max(1, len(ranked) // 3)
        assert scheduler.decide(int(rung), float(value), mode) == expected
    assert not scheduler.decide(1, float("nan"), mode)  # a NaN stops its trial...
    assert scheduler._rungs[1] == sorted(v if mode == "min" else -v for v in seen[1])  # ...unrecorded
    assert not scheduler.decide(27, 0.0, mode)  # max_t: every trial stops


def _blob_shards(cuts):
    rng = np.random.default_rng(4)
    centers = rng.normal(0, 3, (3, 5))
    y = rng.integers(0, 3, 200)
    X = centers[y] + rng.normal(0, 1, (200, 5))
    return [(X[r], y[r]) for r in np.split(np.random.default_rng(1).permutation(200), cuts)]


@pytest.mark.parametrize("cuts", [(61, 98, 178), (50, 100, 150)], ids=["unequal", "equal"])
@pytest.mark.parametrize("batch", [5, 32, 200])
def test_trials_trained_side_by_side_are_bit_for_bit_those_trained_alone(cuts, batch):
    from daskray.ml.search import _SearchSpec, _Shards, _side_by_side_key, train_side_by_side
    from daskray.ml.search import train_trial

    shards = _blob_shards(cuts)
    classes = np.unique(np.concatenate([y for _, y in shards]))
    data = _Shards(shards, shards[:1], classes)
    rng = np.random.default_rng(batch)
    lrs = [float(v) for v in np.exp(rng.uniform(np.log(1e-3), np.log(3.0), 5))] + [1e4]
    for stop in (None, {"loss": 0.3}):
        spec = _SearchSpec(models.SoftmaxRegression, classes, None, len(shards), stop, "loss", "min")
        for l2 in (1e-3, 0.0):
            configs = [{"optimizer": "sgd", "epochs": 9, "batch_size": batch, "seed": 11 + i,
                        "lr": lr, "l2": l2} for i, lr in enumerate(lrs)]
            with np.errstate(all="ignore"):  # lr 1e4 goes non-finite and stops early
                for start in (0, 2):
                    states = [None if not start else train_trial(spec, data, i, c, None, start)[0]
                              for i, c in enumerate(configs)]
                    jobs = [((i, start), c, s, 5) for i, (c, s) in enumerate(zip(configs, states))
                            if s is None or s[2] == start]  # not those stopped before start
                    assert len({_side_by_side_key(spec, c, s, 5) for _, c, s, _ in jobs}) == 1
                    together = train_side_by_side(spec, data, jobs)
                    for (key, config, state, _), got in zip(jobs, together):
                        alone = train_trial(spec, data, key[0], config, state, 5)
                        assert got[0][2] == alone[0][2] and got[2] == alone[2]
                        for name in ("w", "b"):
                            assert got[0][0][name].tobytes() == alone[0][0][name].tobytes()
                        drop = [{k: v for k, v in r.items() if k != "time_total_s"}
                                for r in got[1]]
                        assert repr(drop) == repr([{k: v for k, v in r.items()
                                                    if k != "time_total_s"} for r in alone[1]])
    # what it does not take: other models, optimizers, momentum
    spec = _SearchSpec(models.MLP, classes, None, len(shards), None, "loss", "min")
    assert _side_by_side_key(spec, {"optimizer": "sgd"}, None, 3) is None
    spec = _SearchSpec(models.SoftmaxRegression, classes, None, len(shards), None, "loss", "min")
    assert _side_by_side_key(spec, {"optimizer": "adam"}, None, 3) is None
    assert _side_by_side_key(spec, {"optimizer": "momentum"}, None, 3) is None
    assert _side_by_side_key(spec, {"optimizer": "sgd", "momentum": 0.5}, None, 3) is None
