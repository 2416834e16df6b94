"""Hyperparameter search: many trials on the cluster, poor ones stopped early (ASHA).

This module has the search spaces, the schedulers, :class:`TuneConfig`,
:class:`ResultGrid`, and the search behind ``Trainer(config=TuneConfig(...))``
and ``Tuner(trainer)`` (:func:`run_search`).  Function trainables --
``Tuner(train_fn)`` with :func:`report` -- live in :mod:`daskray.ml.tuner`;
:mod:`daskray.ml.tune` gathers the public names of both, as Ray's ``tune``.

How a Trainer search runs
-------------------------
A trial trains one configuration with the single-process algorithm of
:func:`~daskray.ml.trainer.reference_fit` (same rows per step, same per-shard
gradient sums, same reduction tree: the parameters are bit-identical), in
*segments*: from its last state up to the next rung of the scheduler.  A tuning
run is many small trainings, so a trial is not worth a graph per step.

Decisions follow a fixed order, so a search gives the same trials -- and the
same parameters, bit for bit -- in one process and on any number of workers: at
every rung the scheduler sees the trials in trial order, each one judged against
the trials before it that reached that rung (as if trials ran one after another).
The driver keeps one queue of trials per rung, each in trial order, and takes
whichever queue's next outcome comes in first: rungs do not wait for each
other, and each rung still decides in trial order.  The cluster does not wait
for that order either: a continuation runs in one of the next tasks once it is
decided, and every trial's first segment, needed whatever the scheduler says,
runs ahead.  A task holds many segments (about 150 ms of work, less at the
end of the search), as a task's messages and bookkeeping cost about as much as
an epoch of a small model.  So the cluster stays busy while the decisions stay
those of one process.  Within a task, softmax trials trained with plain SGD
that share a batch size and a segment train side by side
(:func:`train_side_by_side`): one numpy call per operation for all of them,
each trial's arithmetic unchanged.

Spaces: :func:`uniform`, :func:`loguniform`, :func:`choice`, :func:`randint`,
:func:`grid_search` (every combination of grid values, ``num_samples`` times).
``TuneConfig(search_alg="grid")`` makes every ``choice``/``randint`` a grid too.
"""

from __future__ import annotations

import bisect
import copy
import functools
import heapq
import inspect
import itertools
import math
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

import daskray

from . import models
from .checkpoints import Checkpoint, Result
from .optimizers import SGD
from .steps import (
    apply_evaluator, evaluate_shard, full_config, make_optimizer, model_targets, output_count,
    steps_per_epoch, summarize, update,
)

# ---------------------------------------------------------------------- spaces


class Domain:
    """A hyperparameter's distribution; ``sample(rng)`` draws one value."""

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
    """A float drawn uniformly from [low, high)."""
    if not low < high:
        raise ValueError(f"uniform needs low < high, got {low!r} and {high!r}")
    return _Uniform(low, high)


def loguniform(low: float, high: float) -> Domain:
    """A float whose logarithm is uniform: for scales such as learning rates."""
    if not 0 < low < high:
        raise ValueError(f"loguniform needs 0 < low < high, got {low!r} and {high!r}")
    return _LogUniform(low, high)


def choice(options: list) -> Domain:
    """One of ``options``, each equally likely."""
    if not options:
        raise ValueError("choice needs at least one option")
    return _Choice(tuple(options))


def randint(low: int, high: int) -> Domain:
    """An int in [low, high) (``high`` excluded, as in Ray)."""
    if not low < high:
        raise ValueError(f"randint needs low < high (high is excluded), got {low!r} and {high!r}")
    return _RandInt(low, high)


def grid_search(values: list) -> _Grid:
    """Every value, in every combination with the other grids."""
    if not values:
        raise ValueError("grid_search needs at least one value")
    return _Grid(tuple(values))


SEARCH_ALGS = ("random", "grid")


def _as_grid(space: dict) -> dict:
    """``space`` with every finite domain turned into a grid (``search_alg="grid"``)."""
    out = {}
    for key, value in space.items():
        if isinstance(value, _Choice):
            value = _Grid(value.options)
        elif isinstance(value, _RandInt):
            value = _Grid(tuple(range(value.low, value.high)))
        elif isinstance(value, Domain):
            raise ValueError(
                f"search_alg='grid' needs a finite space, but {key!r} is {type(value).__name__[1:]}"
                "; give it as grid_search([...]) or choice([...]), or use search_alg='random'")
        out[key] = value
    return out


def generate_configs(space: dict, num_samples: int, seed: int,
                     search_alg: str | None = "random") -> list[dict]:
    """Every grid combination, ``num_samples`` times, random entries drawn anew
    (from ``seed``: the same seed gives the same configs)."""
    if search_alg not in (None, *SEARCH_ALGS):
        raise ValueError(f"unknown search_alg {search_alg!r}; daskray has {SEARCH_ALGS} "
                         "(None means 'random')")
    if search_alg == "grid":
        space = _as_grid(space)
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


# ---------------------------------------------------------------------- schedulers


@dataclass
class ASHAScheduler:
    """Asynchronous successive halving (the stopping variant): at each rung
    (``grace_period * reduction_factor**k`` iterations, below ``max_t``) a trial
    goes on only if its metric is among the best ``1/reduction_factor`` of those
    that reached the rung so far; at ``max_t`` every trial stops.  An iteration
    is an epoch for a Trainer, a ``report`` for a function trainable."""

    max_t: int = 27
    grace_period: int = 1
    reduction_factor: int = 3
    #: Ray's name for what counts iterations; only "training_iteration" here
    time_attr: str = "training_iteration"
    _rungs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.time_attr != "training_iteration":
            raise ValueError(f"ASHAScheduler counts 'training_iteration' only, got "
                             f"time_attr={self.time_attr!r}")
        for name, least in (("max_t", 1), ("grace_period", 1), ("reduction_factor", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"ASHAScheduler {name} must be an int >= {least}, got {value!r}")
        if self.grace_period > self.max_t:
            raise ValueError(f"ASHAScheduler grace_period ({self.grace_period}) must not exceed "
                             f"max_t ({self.max_t})")

    def milestones(self) -> list[int]:
        """The rungs, then ``max_t``."""
        out, t = [], self.grace_period
        while t < self.max_t:
            out.append(t)
            t *= self.reduction_factor
        return out + [self.max_t]

    def next_stop(self, epochs_done: int) -> int:
        return next(m for m in self.milestones() if m > epochs_done)

    def decide(self, epochs_done: int, value: float, mode: str) -> bool:
        """Record ``value`` at this rung; whether the trial continues (a NaN
        does not, and is not recorded: it ranks nowhere)."""
        if epochs_done >= self.max_t or math.isnan(value):
            return False
        seen = self._rungs.setdefault(epochs_done, [])  # kept sorted
        bisect.insort(seen, value if mode == "min" else -value)
        keep = max(1, len(seen) // self.reduction_factor)
        return (value if mode == "min" else -value) <= seen[keep - 1]


@dataclass
class FIFOScheduler:
    """No early stopping: every trial runs all its iterations (at most ``max_t``)."""

    max_t: int | None = None

    def next_stop(self, epochs_done: int) -> int:
        return self.max_t or 0

    def decide(self, epochs_done: int, value: float, mode: str) -> bool:
        return False


@dataclass
class TuneConfig:
    """How to search: ``metric`` and ``mode`` ("min"/"max") rank trials and drive
    the scheduler; ``num_samples`` draws from the space (every grid combination
    that many times); ``search_alg`` "random" (default) or "grid"; ``scheduler``
    an :class:`ASHAScheduler` or :class:`FIFOScheduler` (default: none stops early);
    ``max_concurrent_trials`` trials in progress at once (for a Trainer search it
    changes no result: see the module docstring); ``seed`` fixes the draws."""

    metric: str = "loss"
    mode: str = "min"
    num_samples: int = 1
    search_alg: str | None = "random"
    scheduler: Any = None
    max_concurrent_trials: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"TuneConfig mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"TuneConfig metric must be a metric name, got {self.metric!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"TuneConfig num_samples must be an int >= 1, got "
                             f"{self.num_samples!r}")
        if self.search_alg not in (None, *SEARCH_ALGS):
            raise ValueError(f"unknown search_alg {self.search_alg!r}; daskray has "
                             f"{SEARCH_ALGS} (None means 'random')")
        if self.scheduler is not None and not isinstance(self.scheduler,
                                                         (ASHAScheduler, FIFOScheduler)):
            raise TypeError(f"TuneConfig scheduler must be an ASHAScheduler(...) or "
                            f"FIFOScheduler(...) instance, got {self.scheduler!r}")
        limit = self.max_concurrent_trials
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"TuneConfig max_concurrent_trials must be an int >= 1 or None, "
                             f"got {limit!r}")


# ---------------------------------------------------------------------- stop conditions

#: reported counters: a stop condition on them means "at or above"
_COUNTERS = ("training_iteration", "time_total_s", "epoch")


def stop_reached(stop: Any, trial_id: int, result: dict, metric: str, mode: str) -> bool:
    """Whether ``RunConfig.stop`` ends a trial at ``result``.

    ``stop`` is a callable ``(trial_id, result) -> bool`` or a dict of thresholds:
    counters (``training_iteration``, ``time_total_s``; ``epochs`` means
    iterations) stop at or above theirs; the searched ``metric`` when it reaches
    its value in the search's ``mode``; any other metric as ``RunConfig`` says
    (names with "acc" at or above, others at or below).
    """
    if callable(stop):
        return bool(stop(trial_id, result))
    for key, target in stop.items():
        name = "training_iteration" if key == "epochs" else key
        if name not in result:
            raise ValueError(f"RunConfig(stop=...) names {key!r}, which the trial did not report; "
                             f"it reported {sorted(k for k in result if k != 'config')}")
        value = result[name]
        if name in _COUNTERS:
            higher = True
        elif name == metric:
            higher = mode == "max"
        else:
            higher = "acc" in name
        if (value >= target) if higher else (value <= target):
            return True
    return False


def check_stop(stop: Any) -> Any:
    """``stop`` if it is None, a dict of numbers or a callable; else a TypeError."""
    if stop is None or callable(stop):
        return stop
    if not isinstance(stop, dict) or not all(isinstance(v, (int, float)) for v in stop.values()):
        raise TypeError("RunConfig stop must be a dict of metric -> threshold, e.g. "
                        "{'training_iteration': 10, 'loss': 0.1}, or a function "
                        f"(trial_id, result) -> bool; got {stop!r}")
    return stop or None


# ---------------------------------------------------------------------- results


class ResultGrid:
    """Every trial's Result, in the order trials were generated (Ray's ResultGrid)."""

    def __init__(self, results: list[Result], metric: str | None = None,
                 mode: str | None = None) -> None:
        self.results = results
        self._metric, self._mode = metric, mode

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> Result:
        return self.results[i]

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results)

    def __repr__(self) -> str:
        return (f"ResultGrid({len(self)} trials, {self.num_terminated} terminated, "
                f"{self.num_errors} errors)")

    @property
    def errors(self) -> list[BaseException]:
        """The exceptions of the trials that failed (after their retries)."""
        return [r.error for r in self.results if r.error is not None]

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    @property
    def num_terminated(self) -> int:
        """Trials that ended without an error: finished, or stopped early."""
        return len(self.results) - self.num_errors

    _SCOPES = ("last", "all", "avg", "last-5-avg", "last-10-avg")

    def get_best_result(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last", filter_nan_and_inf: bool = True) -> Result:
        """The trial with the best ``metric``: its last value (``scope="last"``),
        its best value over all its reports (``"all"``), or the mean of all /
        the last 5 / the last 10 reports (``"avg"``, ``"last-5-avg"``,
        ``"last-10-avg"``).  Trials that failed are not ranked."""
        metric, mode = metric or self._metric, mode or self._mode
        if metric is None or mode not in ("min", "max"):
            raise ValueError("get_best_result needs a metric and mode 'min' or 'max' "
                             f"(none were set by the search); got {metric!r}, {mode!r}")
        if scope not in self._SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {self._SCOPES}")
        ranked = []
        for result in self.results:
            value = self._score(result, metric, mode, scope)
            if result.error is None and value is not None and (
                    not filter_nan_and_inf or math.isfinite(value)):
                ranked.append((value if mode == "min" else -value, len(ranked), result))
        if not ranked:
            raise RuntimeError(f"no trial reported {metric!r} (without an error); reported "
                               f"metrics: {sorted(self._metric_names())}")
        return min(ranked)[2]

    @staticmethod
    def _score(result: Result, metric: str, mode: str, scope: str) -> float | None:
        if scope == "last":
            value = result.metrics.get(metric)
            return None if value is None else float(value)
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or not len(frame):
            return None
        values = frame[metric].astype(float)
        if scope == "all":
            return float(values.min() if mode == "min" else values.max())
        tail = {"avg": None, "last-5-avg": 5, "last-10-avg": 10}[scope]
        return float(values.iloc[-tail:].mean() if tail else values.mean())

    def _metric_names(self) -> set:
        return {k for r in self.results for k in r.metrics}

    def get_dataframe(self, filter_metric: str | None = None,
                      filter_mode: str | None = None) -> Any:
        """One row per trial: its last report (or, with ``filter_metric``, its
        best one by ``filter_mode``), ``config/<name>`` columns, ``trial_id``, ``error``."""
        import pandas as pd

        if (filter_metric is None) != (filter_mode is None):
            raise ValueError("get_dataframe needs filter_metric and filter_mode together")
        if filter_mode not in (None, "min", "max"):
            raise ValueError(f"filter_mode must be 'min' or 'max', got {filter_mode!r}")
        records = []
        for trial_id, result in enumerate(self.results):
            metrics = result.metrics
            frame = result.metrics_dataframe
            if filter_metric is not None and frame is not None and filter_metric in frame \
                    and len(frame):
                column = frame[filter_metric].astype(float)
                best = column.idxmin() if filter_mode == "min" else column.idxmax()
                metrics = {k: v for k, v in frame.loc[best].items()
                           if not k.startswith("config/")}
            metrics = {k: v for k, v in metrics.items() if k != "config"}
            records.append({**metrics, **{f"config/{k}": v for k, v in result.config.items()},
                            "trial_id": trial_id,
                            "error": repr(result.error) if result.error is not None else None})
        return pd.DataFrame(records)


# ---------------------------------------------------------------------- one trial's training

#: train_config keys a trial's config may set (the rest build the model)
_TRAIN_KEYS = {"optimizer", "lr", "batch_size", "epochs", "l2", "seed", "momentum", "beta1",
               "beta2", "eps"}


def build_model(model: Any, config: dict) -> Any:
    """A model instance: ``model`` itself, or the class built from matching config keys."""
    if not isinstance(model, type):
        return model
    params = _init_arguments(model)
    return model(**{k: v for k, v in config.items() if k in params})


@functools.lru_cache(maxsize=64)
def _init_arguments(model: type) -> frozenset:
    """The names ``model.__init__`` takes, looked up once per class: a search
    builds its model for every segment, and ``inspect.signature`` of a builtin
    ``__init__`` parses its text signature each time."""
    return frozenset(inspect.signature(model.__init__).parameters)


def check_space(model: Any, space: dict) -> None:
    """Every key of ``space`` sets a train_config entry or a model argument; else a
    ValueError naming the ones that would be ignored."""
    known = set(_TRAIN_KEYS)
    if isinstance(model, type):
        known |= set(inspect.signature(model.__init__).parameters) - {"self"}
    unknown = sorted(set(space) - known)
    if unknown:
        where = f"{model.__name__}(...) arguments" if isinstance(model, type) else \
            "(a model instance takes no arguments: pass its class to search those)"
        raise ValueError(f"param_space keys {unknown} are neither train_config keys "
                         f"{sorted(_TRAIN_KEYS)} nor {where}")


class _Shards:
    """A search's shards as a task sees them: the training rows stacked once, so
    an epoch gathers its rows in one go, and targets per kind of model."""

    def __init__(self, train: list, valid: list, classes: Any) -> None:
        self.train, self.valid, self.classes = train, valid, classes
        self.sizes = [len(y) for _, y in train]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.X = np.concatenate([X for X, _ in train])
        self.n_features = train[0][0].shape[1]
        self._targets: dict = {}  # values or class indices -> stacked training targets
        self._labels: dict = {}
        self._layouts: dict = {}  # steps per epoch -> (gather, cuts): see _step_layout

    def targets(self, model: Any) -> np.ndarray:
        """The stacked training rows' targets for ``model``: values or class indices."""
        values = model.task == "regression" or self.classes is None
        if values not in self._targets:
            self._targets[values] = np.concatenate(
                [model_targets(model, y, self.classes) for _, y in self.train])
        return self._targets[values]

    def labels(self, model: Any, name: str) -> tuple[np.ndarray, list]:
        """Class indices of the ``name`` ("train"/"valid") shards' rows, stacked,
        and where each shard's rows begin and end."""
        if name not in self._labels:
            shards = self.train if name == "train" else self.valid
            parts = [model_targets(model, y, self.classes) for _, y in shards]
            self._labels[name] = (np.concatenate(parts),
                                  np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist())
        return self._labels[name]

    def epoch_order(self, epoch: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows every step of ``epoch`` reads (as in ``batch_rows``), step after
        step and shard after shard within a step, as indices into the stacked
        rows; and ``cuts[step, shard]``, where each shard's part of a step begins."""
        rows = [np.random.default_rng([seed, epoch, s]).permutation(n) + self.offsets[s]
                for s, n in enumerate(self.sizes)]
        gather, cuts = self._step_layout(steps)
        return np.concatenate(rows)[gather], cuts

    def _step_layout(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """For epochs of ``steps`` steps: where each position of the step-by-step
        order takes its row from (in the shards' permutations laid end to end),
        and the cuts.  The same for every epoch and seed, so made once."""
        layout = self._layouts.get(steps)
        if layout is None:
            keys, counts = [], []
            for s, n in enumerate(self.sizes):
                per_step = np.diff(np.arange(steps + 1) * n // steps)
                keys.append(np.repeat(np.arange(steps) * len(self.sizes) + s, per_step))
                counts.append(per_step)
            gather = np.argsort(np.concatenate(keys), kind="stable")
            cuts = np.concatenate([[0], np.cumsum(np.stack(counts, axis=1).ravel())])
            cuts = cuts.reshape(-1)
            gather.flags.writeable = cuts.flags.writeable = False  # shared by every epoch
            layout = self._layouts[steps] = (gather, cuts)
        return layout


def _linear_fast_path(model: Any) -> bool:
    """Whether ``model`` is a built-in linear model whose gradient is the library's
    own (``X.T @ delta`` and ``sum(delta)``, ``delta`` from ``_loss_and_delta``):
    then a step can take the loss derivative of all shards' rows at once."""
    base = getattr(models, "_LinearModel", None)
    if base is None or not isinstance(model, base) or not hasattr(model, "_loss_and_delta"):
        return False
    cls = type(model)
    return all(getattr(cls, name, None) is getattr(base, name, None)
               for name in ("gradient", "loss_and_gradient", "_logits", "loss"))


def _is_softmax(model: Any) -> bool:
    """A SoftmaxRegression with the library's own loss and prediction."""
    cls = type(model)
    return (_linear_fast_path(model) and isinstance(model, models.SoftmaxRegression)
            and all(getattr(cls, name) is getattr(models.SoftmaxRegression, name)
                    for name in ("_loss_and_delta", "predict")))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """``models._log_softmax``, the same operations (``np.add.reduce`` is what
    ``np.sum`` calls), without the wrappers' overhead."""
    shifted = logits - np.maximum.reduce(logits, axis=1, keepdims=True)
    return shifted - np.log(np.add.reduce(np.exp(shifted), axis=1, keepdims=True))


def _pairwise_sum(items: list) -> Any:
    """``tree_sum``'s fixed pairing ((g0+g1)+(g2+g3))+..., on arrays."""
    while len(items) > 1:
        paired = [a + b for a, b in zip(items[0::2], items[1::2])]
        if len(items) % 2:
            paired.append(items[-1])
        items = paired
    return items[0]


def _epoch_linear(model: Any, optimizer: Any, l2: float, params: dict, opt_state: dict,
                  data: _Shards, targets: np.ndarray, epoch: int, steps: int,
                  seed: int) -> tuple[dict, dict]:
    """One epoch of a built-in linear model: the floating-point operations of
    ``shard_gradients`` + ``update``, in the same order, with less Python around
    them.  Each shard's logits are its own matmul (matmul rounding depends on the
    row count); the loss derivative is row by row, so it runs on all the step's
    rows at once; each shard's gradient sum is its own matmul and reduction.
    When the shards give a step equal shares of rows, a stacked matmul makes
    those per-shard calls in one go."""
    index, cuts = data.epoch_order(epoch, steps, seed)
    X, t = data.X[index], targets[index]
    n_shards, n_features = len(data.sizes), X.shape[1]
    # per step: where its rows begin and end, and whether every shard gives it as many
    counts = np.diff(cuts).reshape(steps, n_shards)
    equal_shares = (counts == counts[:, :1]).all(axis=1).tolist()
    cuts = cuts.tolist()  # python ints: cheaper to slice with than numpy's
    softmax = _is_softmax(model)
    l2_w = l2 and "w" in model.weight_keys()
    l2_b = l2 and "b" in model.weight_keys()
    arange = np.arange(int(counts.sum(axis=1).max()))
    plain_sgd = type(optimizer) is SGD and optimizer.momentum == 0.0 and list(params) == ["w", "b"]
    lr = optimizer.lr
    for step in range(steps):
        bounds = cuts[step * n_shards:(step + 1) * n_shards + 1]
        lo, hi = bounds[0], bounds[-1]
        rows, share = hi - lo, (hi - lo) // n_shards
        w, b = params["w"], params["b"]
        logits = np.empty((rows, w.shape[1]))
        equal = equal_shares[step]
        if equal:
            Xs = X[lo:hi].reshape(n_shards, share, n_features)
            np.matmul(Xs, w, out=logits.reshape(n_shards, share, -1))
        else:
            pieces = [(a - lo, z - lo) for a, z in zip(bounds[:-1], bounds[1:])]
            for i, j in pieces:
                np.matmul(X[lo + i:lo + j], w, out=logits[i:j])
        logits += b
        delta = (_softmax_delta_in_place(logits, t[lo:hi], arange[:rows]) if softmax
                 else model._loss_and_delta(logits, t[lo:hi])[1])
        if equal:
            stacked = delta.reshape(n_shards, share, -1)
            gw = _pairwise_sum_stacked(np.matmul(Xs.transpose(0, 2, 1), stacked))
            gb = _pairwise_sum_stacked(np.add.reduce(stacked, axis=1))
        else:
            gw = _pairwise_sum([X[lo + i:lo + j].T @ delta[i:j] for i, j in pieces])
            gb = _pairwise_sum([np.add.reduce(delta[i:j], axis=0) for i, j in pieces])
        gw = gw / rows + (l2 * w if l2_w else 0.0)
        gb = gb / rows + (l2 * b if l2_b else 0.0)
        if plain_sgd:  # SGD.step's own arithmetic, without its dicts and checks
            params = {"w": w - lr * gw, "b": b - lr * gb}
        else:
            params, opt_state = optimizer.step(params, {"w": gw, "b": gb}, opt_state)
    return params, opt_state


def _pairwise_sum_stacked(stacked: np.ndarray) -> np.ndarray:
    """:func:`_pairwise_sum` of ``list(stacked)``: each level's pairs are added in
    one call (an elementwise sum gives the same bits whether made one pair at a
    time or all at once)."""
    while len(stacked) > 1:
        paired = stacked[0:len(stacked) - 1:2] + stacked[1::2]
        if len(stacked) % 2:
            paired = np.concatenate([paired, stacked[-1:]])
        stacked = paired
    return stacked[0]


def _softmax_delta_in_place(logits: np.ndarray, labels: np.ndarray,
                            rows: np.ndarray) -> np.ndarray:
    """d loss / d logits of the softmax cross-entropy, as ``models._softmax_xent``
    computes it (the labels are class indices already, so no check; no loss),
    written into ``logits``, which the caller no longer needs: the same
    operations on the same values, without new arrays.  ``rows`` is
    ``arange(len(labels))``."""
    np.subtract(logits, np.maximum.reduce(logits, axis=1, keepdims=True), out=logits)
    logits -= np.log(np.add.reduce(np.exp(logits), axis=1, keepdims=True))
    np.exp(logits, out=logits)
    logits[rows, labels] -= 1.0
    return logits


def _epoch_generic(model: Any, optimizer: Any, l2: float, params: dict, opt_state: dict,
                   data: _Shards, targets: np.ndarray, epoch: int, steps: int,
                   seed: int) -> tuple[dict, dict]:
    """One epoch of any model: ``model.gradient`` per shard and step, as the trainer."""
    index, cuts = data.epoch_order(epoch, steps, seed)
    X, t = data.X[index], targets[index]
    n_shards = len(data.sizes)
    for step in range(steps):
        bounds = cuts[step * n_shards:(step + 1) * n_shards + 1]
        groups = [(model.gradient(params, X[a:b], t[a:b]), int(b - a))
                  for a, b in zip(bounds[:-1], bounds[1:])]
        params, opt_state = update(params, opt_state, model, optimizer, l2, groups)
    return params, opt_state


def _softmax_evaluation(model: Any, params: dict, data: _Shards, name: str) -> list:
    """``evaluate_shard`` of every ``name`` shard of a softmax model, the same
    numbers with fewer calls: each shard's logits are its own matmul, the rest is
    row by row (so it runs on all rows at once) but for the per-shard sums."""
    shards = data.train if name == "train" else data.valid
    labels, cuts = data.labels(model, name)
    logits = np.empty((len(labels), params["w"].shape[1]))
    for (X, _), a, b in zip(shards, cuts[:-1], cuts[1:]):
        np.matmul(X, params["w"], out=logits[a:b])
    logits += params["b"]
    picked = _log_softmax(logits)[np.arange(len(labels)), labels]
    right = np.argmax(logits, axis=1) == labels
    return [(-float(np.add.reduce(picked[a:b])), int(np.add.reduce(right[a:b])), b - a, None, None)
            for a, b in zip(cuts[:-1], cuts[1:])]


def _epoch_metrics(model: Any, params: dict, data: _Shards, evaluator: Any) -> dict:
    """Loss (and accuracy) on the training and the validation shards, as the trainer."""
    row: dict = {}
    judged: list = []
    softmax = _is_softmax(model)
    for name, shards in (("train", data.train), ("valid", data.valid)):
        if shards:
            predictions = evaluator is not None and (name == "valid" or not data.valid)
            if softmax and not predictions:
                judged = _softmax_evaluation(model, params, data, name)
            else:
                judged = [evaluate_shard(params, model, data.classes, s, predictions)
                          for s in shards]
            row.update(summarize(judged, name, model.task))
    row["loss"] = row.get("valid_loss", row["train_loss"])
    row.update(apply_evaluator(evaluator, judged))
    return row


@dataclass(frozen=True)
class _SearchSpec:
    """What every segment task of one search shares."""

    model: Any
    classes: Any
    evaluator: Any
    n_train: int
    stop: Any
    metric: str
    mode: str


def train_trial(spec: _SearchSpec, data: _Shards, trial_id: int, config: dict,
                state: tuple | None, stop_epoch: int) -> tuple[tuple, list, bool]:
    """Train one trial up to ``stop_epoch``: ``(state, rows, stopped)``.  ``state``
    is ``(params, optimizer state, epochs done, seconds)``; ``stopped`` says a
    ``RunConfig.stop`` condition ended it."""
    model = build_model(spec.model, config)
    train_config = full_config({k: v for k, v in config.items() if k in _TRAIN_KEYS})
    optimizer = make_optimizer(train_config)
    seed = train_config["seed"]
    if state is None:
        params = model.init_params(data.n_features, output_count(model, data.classes),
                                   np.random.default_rng(seed))
        state = (params, optimizer.init_state(params), 0, 0.0)
    params, opt_state, epoch, seconds = state
    targets = data.targets(model)
    steps = steps_per_epoch(len(targets), train_config["batch_size"])
    train_epoch = _epoch_linear if _linear_fast_path(model) else _epoch_generic
    rows, stopped = [], False
    while epoch < stop_epoch:
        started = time.perf_counter()
        params, opt_state = train_epoch(model, optimizer, train_config["l2"], params, opt_state,
                                        data, targets, epoch, steps, seed)
        metrics = _epoch_metrics(model, params, data, spec.evaluator)
        seconds += time.perf_counter() - started
        epoch += 1
        row = {"epoch": epoch - 1, "training_iteration": epoch, **metrics, "time_total_s": seconds}
        rows.append(row)
        if not np.isfinite(row["loss"]):
            break
        if spec.stop is not None and stop_reached(spec.stop, trial_id, row, spec.metric, spec.mode):
            stopped = True
            break
    return (params, opt_state, epoch, seconds), rows, stopped


def _side_by_side_key(spec: _SearchSpec, config: dict, state: tuple | None,
                      stop_epoch: int) -> tuple | None:
    """Which segments :func:`train_side_by_side` may train together (equal keys),
    or None for a segment it does not take: a built-in softmax model (no
    constructor arguments) trained with plain SGD."""
    if not isinstance(spec.model, type) or not issubclass(spec.model, models.SoftmaxRegression):
        return None
    if _init_arguments(spec.model) - {"self", "args", "kwargs"}:
        return None
    train_config = full_config({k: v for k, v in config.items() if k in _TRAIN_KEYS})
    if train_config["optimizer"] != "sgd" or train_config.get("momentum", 0.0) != 0.0:
        return None
    start = state[2] if state is not None else 0
    return (train_config["batch_size"], start, stop_epoch, bool(train_config["l2"]))


def train_side_by_side(spec: _SearchSpec, data: _Shards, jobs: list) -> list:
    """:func:`train_trial` of several softmax / plain-SGD segments with the same
    batch size, start and stop, side by side: each step is one call per numpy
    operation for all the trials instead of one per trial.  Every trial's own
    arithmetic is unchanged (a stacked matmul is a matmul per trial and shard;
    the rest works row by row or elementwise), so its parameters and metrics
    are those of :func:`train_trial`, bit for bit."""
    model = build_model(spec.model, jobs[0][1])
    if not _is_softmax(model):
        return [train_trial(spec, data, key[0], config, state, stop)
                for key, config, state, stop in jobs]
    configs = [full_config({k: v for k, v in c.items() if k in _TRAIN_KEYS}) for _, c, _, _ in jobs]
    states = []
    for config, (_, _, state, _) in zip(configs, jobs):
        if state is None:
            params = model.init_params(data.n_features, output_count(model, data.classes),
                                       np.random.default_rng(config["seed"]))
            state = (params, make_optimizer(config).init_state(params), 0, 0.0)
        states.append(state)
    W = np.stack([state[0]["w"] for state in states])
    B = np.stack([state[0]["b"] for state in states])
    seconds = [state[3] for state in states]
    epoch, stop_epoch = states[0][2], jobs[0][3]
    targets = data.targets(model)
    steps = steps_per_epoch(len(targets), configs[0]["batch_size"])
    alive = list(range(len(jobs)))  # trials still training, in the order of W's rows
    rows: list = [[] for _ in jobs]
    stopped = [False] * len(jobs)
    params_of = [state[0] for state in states]
    while epoch < stop_epoch and alive:
        started = time.perf_counter()
        W, B = _epoch_softmax_side_by_side(
            W, B, [configs[i]["lr"] for i in alive], [configs[i]["l2"] for i in alive],
            [configs[i]["seed"] for i in alive], data, targets, epoch, steps)
        done = []
        for k, i in enumerate(alive):
            params_of[i] = {"w": W[k], "b": B[k]}
        together = (_softmax_metrics_side_by_side(model, W, B, data) if spec.evaluator is None
                    else None)
        for k, i in enumerate(alive):
            metrics = (together[k] if together is not None
                       else _epoch_metrics(model, params_of[i], data, spec.evaluator))
            seconds[i] += (time.perf_counter() - started) / len(alive)
            row = {"epoch": epoch, "training_iteration": epoch + 1, **metrics,
                   "time_total_s": seconds[i]}
            rows[i].append(row)
            if not np.isfinite(row["loss"]):
                done.append(k)
            elif spec.stop is not None and stop_reached(spec.stop, jobs[i][0][0], row,
                                                         spec.metric, spec.mode):
                stopped[i] = True
                done.append(k)
        epoch += 1
        for i, state in enumerate(states):
            if i in alive:
                states[i] = (None, state[1], epoch, 0.0)
        if done:
            keep = [k for k in range(len(alive)) if k not in done]
            for k in done:
                params_of[alive[k]] = {"w": W[k].copy(), "b": B[k].copy()}
            alive = [alive[k] for k in keep]
            W, B = W[keep], B[keep]
    out = []
    for i, state in enumerate(states):
        params = params_of[i]
        if i in alive:
            k = alive.index(i)
            params = {"w": W[k].copy(), "b": B[k].copy()}
        out.append(((params, state[1], state[2], seconds[i]), rows[i], stopped[i]))
    return out


def _softmax_metrics_side_by_side(model: Any, W: np.ndarray, B: np.ndarray,
                                  data: _Shards) -> list[dict]:
    """:func:`_epoch_metrics` (no evaluator) of a softmax model for several trials
    at once, the same operations per trial and shard as
    :func:`_softmax_evaluation`."""
    K = len(W)
    rows: list = [{} for _ in range(K)]
    for name, shards in (("train", data.train), ("valid", data.valid)):
        if not shards:
            continue
        labels, cuts = data.labels(model, name)
        logits = np.empty((K, len(labels), W.shape[2]))
        for (X, _), a, b in zip(shards, cuts[:-1], cuts[1:]):
            np.matmul(X, W, out=logits[:, a:b])
        logits += B[:, None, :]
        picked = _log_softmax(logits.reshape(-1, W.shape[2])).reshape(logits.shape)[
            :, np.arange(len(labels)), labels]
        right = np.argmax(logits, axis=2) == labels
        for k in range(K):
            judged = [(-float(np.add.reduce(picked[k, a:b])), int(np.add.reduce(right[k, a:b])),
                       b - a, None, None) for a, b in zip(cuts[:-1], cuts[1:])]
            rows[k].update(summarize(judged, name, model.task))
    for row in rows:
        row["loss"] = row.get("valid_loss", row["train_loss"])
    return rows


def _epoch_softmax_side_by_side(W: np.ndarray, B: np.ndarray, lrs: list, l2s: list,
                                seeds: list, data: _Shards, targets: np.ndarray, epoch: int,
                                steps: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_epoch_linear` of a softmax model with plain SGD for several trials
    at once: ``W`` (trials, features, classes) and ``B`` (trials, classes)."""
    K = len(seeds)
    orders = [data.epoch_order(epoch, steps, seed) for seed in seeds]
    cuts = orders[0][1]
    index = np.stack([order[0] for order in orders])
    X, t = data.X[index], targets[index]
    n_shards, n_features, n_classes = len(data.sizes), X.shape[2], W.shape[2]
    counts = np.diff(cuts).reshape(steps, n_shards)
    equal_shares = (counts == counts[:, :1]).all(axis=1).tolist()
    cuts = cuts.tolist()
    arange = np.arange(K * int(counts.sum(axis=1).max()))
    lr = np.array(lrs).reshape(K, 1, 1)
    lr_b = lr.reshape(K, 1)
    l2 = np.array(l2s).reshape(K, 1, 1) if l2s[0] else None
    for step in range(steps):
        bounds = cuts[step * n_shards:(step + 1) * n_shards + 1]
        lo, hi = bounds[0], bounds[-1]
        rows, share = hi - lo, (hi - lo) // n_shards
        logits = np.empty((K, rows, n_classes))
        equal = equal_shares[step]
        if equal:
            Xs = X[:, lo:hi].reshape(K, n_shards, share, n_features)
            np.matmul(Xs, W[:, None], out=logits.reshape(K, n_shards, share, n_classes))
        else:
            pieces = [(a - lo, z - lo) for a, z in zip(bounds[:-1], bounds[1:])]
            for i, j in pieces:
                np.matmul(X[:, lo + i:lo + j], W, out=logits[:, i:j])
        logits += B[:, None, :]
        delta = _softmax_delta_in_place(logits.reshape(K * rows, n_classes),
                                        t[:, lo:hi].reshape(-1), arange[:K * rows])
        delta = delta.reshape(K, rows, n_classes)
        if equal:
            stacked = delta.reshape(K, n_shards, share, n_classes)
            gw = _pairwise_sum_stacked(
                np.matmul(Xs.transpose(0, 1, 3, 2), stacked).transpose(1, 0, 2, 3))
            gb = _pairwise_sum_stacked(np.add.reduce(stacked, axis=2).transpose(1, 0, 2))
        else:
            gw = _pairwise_sum([np.matmul(X[:, lo + i:lo + j].transpose(0, 2, 1), delta[:, i:j])
                                for i, j in pieces])
            gb = _pairwise_sum([np.add.reduce(delta[:, i:j], axis=1) for i, j in pieces])
        gw = gw / rows + (l2 * W if l2 is not None else 0.0)
        gb = gb / rows + 0.0
        W = W - lr * gw
        B = B - lr_b * gb
    return W, B


#: the shards of the latest search this process ran segments of (one entry)
_shards_cache: dict = {}


def _shards_of(spec: _SearchSpec, refs: list) -> _Shards:
    """The search's shards, fetched once per process.  The refs come inside a
    list, not as arguments: arguments would make the head place every segment on
    the worker holding most shard bytes (the shards are in shared memory,
    readable from any worker, so that locality buys nothing but a queue)."""
    key = (spec.n_train, *(ref.key for ref in refs))
    data = _shards_cache.get(key)
    if data is None:
        values = daskray.get(list(refs))
        data = _Shards(values[:spec.n_train], values[spec.n_train:], spec.classes)
        _shards_cache.clear()
        _shards_cache[key] = data
    return data


def _run_segments(jobs: list, spec: _SearchSpec, shards: list) -> list:
    """The task: train each job ``(key, config, state, stop_epoch)``; one outcome per
    job -- ``(state, rows, stopped)``, or the exception a job raised (with the
    worker's traceback as a note), so one bad trial does not fail the others."""
    data = _shards_of(spec, shards)
    out: list = [None] * len(jobs)
    groups: dict = {}
    for n, (key, config, state, stop_epoch) in enumerate(jobs):
        try:
            group = _side_by_side_key(spec, config, state, stop_epoch)
        except Exception:  # a bad config: train_trial below says what is wrong
            group = None
        groups.setdefault(("alone", n) if group is None else group, []).append(n)
    for members in groups.values():
        if len(members) > 1:
            try:
                outcomes = train_side_by_side(spec, data, [jobs[n] for n in members])
            except Exception:  # let each trial raise (or not) on its own
                outcomes = [None] * len(members)
            for n, outcome in zip(members, outcomes):
                out[n] = outcome
        for n in members:
            if out[n] is None:
                (trial_id, _), config, state, stop_epoch = jobs[n]
                try:
                    out[n] = train_trial(spec, data, trial_id, config, state, stop_epoch)
                except Exception as exc:
                    exc.add_note(f"in trial {trial_id} ({config}):\n{traceback.format_exc()}")
                    out[n] = exc
    return out


# ---------------------------------------------------------------------- running segments

#: what evaluating an epoch (loss on the training and validation rows) costs, in optimizer steps
_EVAL_STEPS = 6
#: a task holds segments worth at least / at most this many optimizer steps: about 10 ms and
#: 150 ms of work for the digits search -- the cost of a task (its messages, the head's
#: bookkeeping, about 2 ms of CPU across the processes) stays a few percent of what it
#: runs, and trials that train side by side come in large groups
_PACK_MIN_STEPS = 256
_PACK_MAX_STEPS = 4096


class _SegmentRunner:
    """Runs segments as tasks, several to a task, and hands back each one's
    outcome by key ``(trial, start)``.

    Two kinds of segments wait to run: continuations the search decided
    (:meth:`need`), the longest first -- those started at a later rung go
    further, so they go first and the search does not end on one long
    segment --, those of a batch size together (see :func:`train_side_by_side`), then every trial's first segment (``ahead``, in trial order:
    work every order of decisions needs).  While fewer than
    ``tasks_in_flight`` tasks run, the runner submits a task holding a share
    of that work: ``1/tasks_in_flight`` of what waits, between
    ``_PACK_MIN_STEPS`` and ``_PACK_MAX_STEPS`` optimizer steps.  Big tasks
    while much waits, small ones at the end, when the cluster would otherwise
    wait on one late task.  Which task runs a segment changes no result.
    """

    def __init__(self, spec: _SearchSpec, shards: list, tasks_in_flight: int,
                 ahead: list[tuple], steps_of: Callable[[tuple], int]) -> None:
        self._task = daskray.remote(max_retries=1)(_run_segments)
        self._spec, self._shards = spec, shards
        self._limit, self._steps_of = tasks_in_flight, steps_of
        self._ahead = deque(ahead)
        self._ahead_steps = sum(map(steps_of, ahead))
        self._pending: list = []  # heap of (-start, batch size, trial, job): decided, not submitted
        self._pending_steps = 0
        self._inflight: dict[daskray.ObjectRef, list] = {}
        self._submitted: set = set()
        self._done: dict = {}

    def need(self, job: tuple) -> None:
        """The search will want ``job``'s outcome: run it in one of the next tasks."""
        if job[0] not in self._submitted:
            size = job[1].get("batch_size")  # those of a size together: they train side by side
            heapq.heappush(self._pending, (-job[0][1], size if isinstance(size, int) else 0,
                                           job[0][0], job))
            self._pending_steps += self._steps_of(job)

    def retry(self, job: tuple) -> None:
        """Run ``job`` again (its last run raised), on a task of its own, now."""
        self._submitted.discard(job[0])
        self._done.pop(job[0], None)
        self._submit([job])

    def result(self, job: tuple) -> Any:
        """The outcome of ``job``, waiting for it if need be."""
        return self.take(self.first_done([job]))

    def take(self, job: tuple) -> Any:
        """The outcome of ``job``, which :meth:`first_done` said is in."""
        return self._done.pop(job[0])

    def first_done(self, jobs: list[tuple]) -> tuple:
        """One of ``jobs`` whose outcome is in (the first in ``jobs`` order),
        waiting for tasks to end until one is.  Meanwhile the cluster is kept
        busy; if no task holds any of ``jobs``, one is submitted at once."""
        while True:
            for job in jobs:
                if job[0] in self._done:
                    return job
            if not any(job[0] in self._submitted for job in jobs):
                self._submit(self._pack(jobs[0]))
            self._fill()
            ready, _ = daskray.wait(list(self._inflight), num_returns=1)
            self._collect(ready[0])

    def cancel(self) -> None:
        for ref in self._inflight:
            daskray.cancel(ref)
        self._inflight.clear()

    def _submit(self, jobs: list) -> None:
        ref = self._task.remote(jobs, self._spec, self._shards)
        self._inflight[ref] = [job[0] for job in jobs]
        self._submitted.update(job[0] for job in jobs)

    def _fill(self) -> None:
        while len(self._inflight) < self._limit:
            pack = self._pack()
            if not pack:
                return
            self._submit(pack)

    def _next(self) -> tuple | None:
        """The next waiting segment not submitted yet: continuations first."""
        while self._pending:
            job = heapq.heappop(self._pending)[-1]
            self._pending_steps -= self._steps_of(job)
            if job[0] not in self._submitted:
                return job
        while self._ahead:
            job = self._ahead.popleft()
            self._ahead_steps -= self._steps_of(job)
            if job[0] not in self._submitted:
                return job
        return None

    def _pack(self, first: tuple | None = None) -> list:
        """``first`` (if given) and the next waiting segments, up to a task's share."""
        target = min(_PACK_MAX_STEPS, max(_PACK_MIN_STEPS, (
            self._pending_steps + self._ahead_steps) // self._limit))
        pack = [first] if first is not None else []
        keys = {job[0] for job in pack}
        steps = sum(map(self._steps_of, pack))
        while steps < target:
            job = self._next()
            if job is None:
                break
            if job[0] not in keys:
                pack.append(job)
                keys.add(job[0])
                steps += self._steps_of(job)
        return pack

    def _collect(self, ref: daskray.ObjectRef) -> None:
        keys = self._inflight.pop(ref)
        try:
            outcomes = daskray.get(ref)
        except Exception as exc:  # the task itself failed (its worker died twice...)
            outcomes = [exc] * len(keys)
        self._done.update(zip(keys, outcomes))


# ---------------------------------------------------------------------- the search


def trial_configs(base_config: dict, space: dict, tune_config: TuneConfig) -> list[dict]:
    """The trials' configs: the base, a per-trial seed (unless the space sets one),
    the sampled values."""
    samples = generate_configs(space, tune_config.num_samples, tune_config.seed,
                               tune_config.search_alg)
    return [{**base_config, "seed": base_config.get("seed", 0) * 100_003 + i, **c}
            for i, c in enumerate(samples)]


def run_search(model: Any, base_config: dict, space: dict, tune_config: TuneConfig,
               train: Any, valid: Any, evaluator: Any = None, *, stop: Any = None,
               max_failures: int = 0) -> ResultGrid:
    """Run every trial of the search on the cluster (see the module docstring).
    Trials differ by seed too, unless the space sets one.  ``stop`` is
    ``RunConfig.stop``; a trial whose segment raises is re-run from its last
    state up to ``max_failures`` times, then has ``Result.error``."""
    if not isinstance(tune_config, TuneConfig):
        raise TypeError(f"expected a TuneConfig, got {type(tune_config).__name__}")
    check_space(model, space)
    configs = trial_configs(base_config, space, tune_config)
    scheduler = copy.deepcopy(tune_config.scheduler) or FIFOScheduler()
    spec = _SearchSpec(model, train.classes, evaluator, train.num_shards, check_stop(stop),
                       tune_config.metric, tune_config.mode)
    search = _Search(configs, scheduler, tune_config, max_failures)
    shards = list(train.shards) + list(valid.shards if valid is not None else [])
    rows = train.num_rows

    def steps_of(job: tuple) -> int:
        """A segment's cost: its optimizer steps and each epoch's evaluation."""
        per_epoch = steps_per_epoch(rows, job[1].get("batch_size", 1024)) + _EVAL_STEPS
        return (job[3] - job[0][1]) * per_epoch

    runner = _SegmentRunner(spec, shards, 2 * num_workers(), search.first_segments(), steps_of)
    try:
        search.run(runner)
    finally:
        runner.cancel()
        _shards_cache.clear()  # this process's copy (workers drop theirs at the next search)
    return search.grid()


class _Search:
    """The order of decisions (see the module docstring) and what the trials did."""

    def __init__(self, configs: list[dict], scheduler: Any, tune_config: TuneConfig,
                 max_failures: int) -> None:
        self.configs, self.scheduler, self.tune_config = configs, scheduler, tune_config
        self.max_failures = max_failures
        self.states: dict[int, tuple] = {}
        self.history: dict[int, list] = {i: [] for i in range(len(configs))}
        self.errors: dict[int, BaseException] = {}
        self.failures = dict.fromkeys(range(len(configs)), 0)

    def epochs(self, trial: int) -> int:
        return int(self.configs[trial].get("epochs", 10))

    def job(self, trial: int, start: int) -> tuple:
        if isinstance(self.scheduler, ASHAScheduler):
            stop = min(self.scheduler.next_stop(start), self.epochs(trial))
        else:
            stop = min(self.scheduler.max_t or self.epochs(trial), self.epochs(trial))
        return (trial, start), self.configs[trial], self.states.get(trial), stop

    def first_segments(self) -> list[tuple]:
        return [self.job(i, 0) for i in range(len(self.configs))]

    def run(self, runner: _SegmentRunner) -> None:
        """Take segments in the order of decisions (see the module docstring):
        one queue of trials per rung (segments that start at the same epoch end
        at the same rung), each in trial order; the search takes the first
        outcome that is in among the queues' heads.  Within a rung, that order
        is the trials' order whatever the timing or the window size, so
        ``max_concurrent_trials`` changes no decision: it only bounds how many
        trials are in progress."""
        queues: dict[int, deque] = {}
        new = iter(range(len(self.configs)))
        limit = self.tune_config.max_concurrent_trials or len(self.configs)
        in_progress = 0
        while True:
            for trial in itertools.islice(new, limit - in_progress):
                queues.setdefault(0, deque()).append(trial)
                in_progress += 1
            heads = [self.job(queue[0], start) for start, queue in sorted(queues.items()) if queue]
            if not heads:
                return
            job = runner.first_done(heads)
            trial, start = job[0]
            queues[start].popleft()
            if self._process(trial, runner.take(job), runner):
                resume = self.states[trial][2]
                queues.setdefault(resume, deque()).append(trial)
                runner.need(self.job(trial, resume))
            else:
                in_progress -= 1

    def _process(self, trial: int, outcome: Any, runner: _SegmentRunner) -> bool:
        """Record a segment's outcome; whether the trial goes on."""
        start = self.states[trial][2] if trial in self.states else 0
        while isinstance(outcome, BaseException):
            if self.failures[trial] >= self.max_failures:
                self.errors[trial] = outcome
                return False
            self.failures[trial] += 1
            runner.retry(self.job(trial, start))
            outcome = runner.result(self.job(trial, start))
        state, rows, stopped = outcome
        self.states[trial] = state
        self.history[trial].extend(rows)
        if stopped or not rows or state[2] >= self.epochs(trial) \
                or not np.isfinite(rows[-1]["loss"]):
            return False
        metric = self.tune_config.metric
        if metric not in rows[-1]:
            raise ValueError(f"TuneConfig metric {metric!r} is not among the trials' metrics "
                             f"{sorted(rows[-1])}")
        return self.scheduler.decide(state[2], rows[-1][metric], self.tune_config.mode)

    def grid(self) -> ResultGrid:
        results = []
        for i, config in enumerate(self.configs):
            rows, checkpoint = self.history[i], None
            if i in self.states:
                params, opt_state, epochs, _ = self.states[i]
                checkpoint = Checkpoint(params, epochs - 1, opt_state, config)
            results.append(_TrialResult(rows[-1] if rows else {}, rows, checkpoint,
                                        self.errors.get(i), [checkpoint] if checkpoint else [],
                                        config))
        return ResultGrid(results, self.tune_config.metric, self.tune_config.mode)


class _TrialResult(Result):
    """A trial's :class:`Result` whose ``metrics_dataframe`` is made from its rows
    when first read: a search of a thousand trials would otherwise spend a
    quarter of a second, after its last segment, on DataFrames few are read."""

    @property
    def metrics_dataframe(self) -> Any:
        frame = self.__dict__.get("_frame")
        if frame is None:
            import pandas as pd

            frame = self.__dict__["_frame"] = pd.DataFrame(self.__dict__.pop("_rows", []))
        return frame

    @metrics_dataframe.setter
    def metrics_dataframe(self, value: Any) -> None:
        if isinstance(value, list):
            self.__dict__["_rows"] = value
            self.__dict__.pop("_frame", None)
        else:
            self.__dict__["_frame"] = value


def num_workers() -> int:
    """The cluster's task workers (their CPUs, one each); 1 before ``init`` and in
    local mode, where calls run one at a time."""
    if not daskray.is_initialized():
        return 1
    return max(1, int(daskray.cluster_resources().get("CPU", 1)))
