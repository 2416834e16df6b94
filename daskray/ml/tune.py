"""Hyperparameter search: many trials on the cluster, poor ones stopped early (ASHA).

A trial trains one configuration in a single task per segment -- from its last
state up to the next rung of the scheduler -- with the same single-process
algorithm as :func:`~daskray.ml.trainer.reference_fit`; a tuning run is many small
trainings, so a trial is not worth a graph per step.  The driver keeps up to
``max_concurrent_trials`` segments in flight, waits for whichever finishes first
(``daskray.wait``), and asks the scheduler whether that trial goes on.

Spaces: :func:`uniform`, :func:`loguniform`, :func:`choice`, :func:`randint`,
:func:`grid_search` (every combination of grid values, ``num_samples`` times).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import api
from ..refs import ObjectRef
from .trainer import (
    Checkpoint, Result, _config, _n_outputs, _optimizer, apply_evaluator, evaluate_shard,
    shard_gradients, steps_per_epoch, summarize, update,
)

# ---------------------------------------------------------------------- spaces


class Domain:
    def sample(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class _Uniform(Domain):
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class _LogUniform(Domain):
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclass(frozen=True)
class _Choice(Domain):
    options: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        return self.options[int(rng.integers(len(self.options)))]


@dataclass(frozen=True)
class _RandInt(Domain):
    low: int
    high: int

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high))


@dataclass(frozen=True)
class _Grid:
    values: tuple


def uniform(low: float, high: float) -> Domain:
    return _Uniform(low, high)


def loguniform(low: float, high: float) -> Domain:
    if not 0 < low < high:
        raise ValueError("loguniform needs 0 < low < high")
    return _LogUniform(low, high)


def choice(options: list) -> Domain:
    if not options:
        raise ValueError("choice needs at least one option")
    return _Choice(tuple(options))


def randint(low: int, high: int) -> Domain:
    return _RandInt(low, high)


def grid_search(values: list) -> _Grid:
    return _Grid(tuple(values))


def generate_configs(space: dict, num_samples: int, seed: int) -> list[dict]:
    """Every grid combination, ``num_samples`` times, random entries drawn anew."""
    rng = np.random.default_rng(seed)
    grid_keys = [k for k, v in space.items() if isinstance(v, _Grid)]
    combos = list(itertools.product(*(space[k].values for k in grid_keys))) or [()]
    configs = []
    for _ in range(num_samples):
        for combo in combos:
            config = dict(zip(grid_keys, combo))
            for key, value in space.items():
                if key not in config:
                    config[key] = value.sample(rng) if isinstance(value, Domain) else value
            configs.append(config)
    return configs


# ---------------------------------------------------------------------- scheduler


@dataclass
class ASHAScheduler:
    """Asynchronous successive halving: at each rung (grace_period * reduction_factor^k
    epochs, up to max_t) a trial goes on only if its metric is among the best
    1/reduction_factor of those that reached the rung so far."""

    max_t: int = 27
    grace_period: int = 1
    reduction_factor: int = 3
    _rungs: dict = field(default_factory=dict)

    def milestones(self) -> list[int]:
        out, t = [], self.grace_period
        while t < self.max_t:
            out.append(t)
            t *= self.reduction_factor
        return out + [self.max_t]

    def next_stop(self, epochs_done: int) -> int:
        return next(m for m in self.milestones() if m > epochs_done)

    def decide(self, epochs_done: int, value: float, mode: str) -> bool:
        """Record ``value`` at this rung; whether the trial continues."""
        if epochs_done >= self.max_t:
            return False
        seen = self._rungs.setdefault(epochs_done, [])
        seen.append(value if mode == "min" else -value)
        keep = max(1, len(seen) // self.reduction_factor)
        return (value if mode == "min" else -value) <= sorted(seen)[keep - 1]


@dataclass
class FIFOScheduler:
    """No early stopping: every trial runs all its epochs."""

    max_t: int | None = None

    def next_stop(self, epochs_done: int) -> int:
        return self.max_t or 0

    def decide(self, epochs_done: int, value: float, mode: str) -> bool:
        return False


@dataclass
class TuneConfig:
    metric: str = "loss"
    mode: str = "min"
    num_samples: int = 10
    search_alg: str = "random"
    scheduler: Any = None
    max_concurrent_trials: int | None = None
    seed: int = 0


class ResultGrid:
    """Every trial's Result, in the order trials were generated."""

    def __init__(self, results: list[Result], metric: str, mode: str) -> None:
        self.results = results
        self._metric, self._mode = metric, mode

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> Result:
        return self.results[i]

    @property
    def errors(self) -> list[BaseException]:
        return [r.error for r in self.results if r.error is not None]

    def get_best_result(self, metric: str | None = None, mode: str | None = None) -> Result:
        metric, mode = metric or self._metric, mode or self._mode
        ok = [r for r in self.results if r.error is None and metric in r.metrics]
        if not ok:
            raise RuntimeError(f"no trial reported {metric!r}")
        key = (lambda r: r.metrics[metric]) if mode == "min" else (lambda r: -r.metrics[metric])
        return min(ok, key=key)

    def get_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{**{f"config/{k}": v for k, v in r.config.items()}, **r.metrics,
                              "error": repr(r.error) if r.error else None}
                             for r in self.results])


# ---------------------------------------------------------------------- trials


def build_model(model: Any, config: dict) -> Any:
    """A model instance: ``model`` itself, or the class built from matching config keys."""
    if not isinstance(model, type):
        return model
    params = inspect.signature(model.__init__).parameters
    return model(**{k: v for k, v in config.items() if k in params})


def train_segment(model_spec: Any, config: dict, classes: Any, train: list, valid: list,
                  state: tuple | None, stop_epoch: int, evaluator: Any = None) -> tuple:
    """Train one trial in this process up to ``stop_epoch``; (state, metrics rows)."""
    if train and isinstance(train[0], ObjectRef):  # shards arrive as refs: read them
        train = api.get(list(train))
    if valid and isinstance(valid[0], ObjectRef):
        valid = api.get(list(valid))
    model = build_model(model_spec, config)
    train_config = _config({k: v for k, v in config.items() if k in _TRAIN_KEYS})
    optimizer = _optimizer(train_config)
    if state is None:
        params = model.init_params(train[0][0].shape[1], _n_outputs(model, classes),
                                   np.random.default_rng(train_config["seed"]))
        state = (params, optimizer.init_state(params), 0)
    params, opt_state, epoch = state
    steps = steps_per_epoch(sum(len(s[1]) for s in train), train_config["batch_size"])
    rows = []
    while epoch < stop_epoch:
        for step in range(steps):
            grads = shard_gradients(params, model, classes, epoch, step, steps,
                                    train_config["seed"], 0, *train)
            params, opt_state = update(params, opt_state, model, optimizer,
                                       train_config["l2"], grads)
        epoch += 1
        row = {"epoch": epoch - 1, "training_iteration": epoch}
        judged: list = []
        for name, shards in (("train", train), ("valid", valid)):
            if shards:
                last = name == "valid" or not valid
                judged = [evaluate_shard(params, model, classes, s, evaluator is not None and last)
                          for s in shards]
                row.update(summarize(judged, name, model.task))
        row["loss"] = row.get("valid_loss", row["train_loss"])
        row.update(apply_evaluator(evaluator, judged))
        rows.append(row)
        if not np.isfinite(row["loss"]):
            break
    return (params, opt_state, epoch), rows


_TRAIN_KEYS = {"optimizer", "lr", "batch_size", "epochs", "l2", "seed", "momentum", "beta1",
               "beta2", "eps"}


def run_search(model: Any, base_config: dict, space: dict, tune_config: TuneConfig,
               train: Any, valid: Any, evaluator: Any = None) -> ResultGrid:
    """Run every trial of the search on the cluster; see the module docstring.
    Trials differ by seed too, unless the space sets one."""
    configs = [{**base_config, "seed": base_config.get("seed", 0) * 100_003 + i, **c}
               for i, c in enumerate(generate_configs(space, tune_config.num_samples,
                                                      tune_config.seed))]
    scheduler = tune_config.scheduler or FIFOScheduler()
    if isinstance(scheduler, FIFOScheduler) and scheduler.max_t is None:
        scheduler.max_t = int(base_config.get("epochs", 10))
    classes = train.classes
    task = api.remote(max_retries=1)(train_segment)
    limit = tune_config.max_concurrent_trials or max(1, 4 * _num_workers())
    states: dict[int, Any] = {}
    history: dict[int, list] = {i: [] for i in range(len(configs))}
    errors: dict[int, BaseException] = {}
    running: dict[Any, int] = {}
    waiting = list(range(len(configs)))[::-1]
    train_refs, valid_refs = train.shards, (valid.shards if valid is not None else [])

    def submit(i: int) -> None:
        done = states[i][2] if states.get(i) else 0
        stop = min(scheduler.next_stop(done), int(configs[i].get("epochs", 10))) \
            if isinstance(scheduler, ASHAScheduler) else scheduler.next_stop(done)
        ref = task.options(num_returns=2).remote(model, configs[i], classes, train_refs,
                                                 valid_refs, states.get(i), stop, evaluator)
        running[ref[0]] = (i, ref[1])

    while waiting or running:
        while waiting and len(running) < limit:
            submit(waiting.pop())
        ready, _ = api.wait(list(running), num_returns=1)
        i, rows_ref = running.pop(ready[0])
        try:
            states[i], rows = api.get([ready[0], rows_ref])
        except Exception as exc:  # the trial failed: recorded, the search goes on
            errors[i] = exc
            continue
        history[i].extend(rows)
        if not rows:
            continue
        last = rows[-1]
        epochs_done = states[i][2]
        finished = epochs_done >= int(configs[i].get("epochs", 10)) or not np.isfinite(last["loss"])
        value = last.get(tune_config.metric, last["loss"])
        if not finished and scheduler.decide(epochs_done, value, tune_config.mode):
            submit(i)
        # else: stopped early, or done

    results = []
    for i, config in enumerate(configs):
        rows = history[i]
        checkpoint = None
        if states.get(i) is not None:
            params, opt_state, epochs = states[i]
            checkpoint = Checkpoint(params, epochs - 1, opt_state, config)
        import pandas as pd

        results.append(Result(rows[-1] if rows else {}, pd.DataFrame(rows), checkpoint,
                              errors.get(i), [checkpoint] if checkpoint else [], config))
    return ResultGrid(results, tune_config.metric, tune_config.mode)


def _num_workers() -> int:
    runtime = api._runtime
    if runtime is None or runtime.cluster is None:
        return 1
    return max(1, len(runtime.cluster.client.workers))
