"""``Tuner``: Ray Tune's entry point -- a function trainable, or a Trainer, searched.

::

    def train_fn(config):
        start = get_checkpoint()          # None, or the checkpoint to resume from
        for epoch in range(...):
            ...
            report({"loss": loss}, checkpoint=Checkpoint(params, epoch))
    grid = Tuner(train_fn, param_space={"lr": tune.loguniform(1e-3, 1)},
                 tune_config=TuneConfig(metric="loss", mode="min", num_samples=100,
                                        scheduler=ASHAScheduler(max_t=27)),
                 run_config=RunConfig(stop={"training_iteration": 20})).fit()
    grid.get_best_result().config

``Tuner(trainer, param_space=...).fit(train, valid=valid)`` searches a
:class:`~daskray.ml.Trainer` instead, with :func:`daskray.ml.tune.run_search`.

Reports and stopping
--------------------
Each trial of a function trainable is one task running ``train_fn(config)``;
``max_concurrent_trials`` of them (default: two per worker) are submitted at
once.  ``report`` adds ``training_iteration`` (one more per report),
``time_total_s`` and ``config`` to the metrics and keeps them in the trial; they
come back with the task's result.  Most reports send no message at all:

- ``RunConfig(stop=...)`` is checked inside the trial;
- at ``max_t`` of an :class:`~daskray.ml.tune.ASHAScheduler` the trial stops
  without asking anyone;
- at an ASHA rung (``grace_period * reduction_factor**k`` iterations) the report
  goes to the search's controller -- with the reports since the last message --
  and waits for the answer: the controller records the metric at that rung and
  says whether the trial goes on;
- when failed trials may be retried, a report with a checkpoint goes to the
  controller too, and waits for its acknowledgement: once ``report`` returns,
  a trial whose worker dies resumes from that checkpoint.

When the trial must stop, ``report`` raises a private exception derived from
``BaseException`` (so ``except Exception`` in the trainable does not swallow
it); the task catches it and returns the trial's reports.  A trial thus costs one
task plus one round trip per rung it reaches (and per checkpoint, with retries),
and a stopped trial runs no further iteration.  The controller is an actor on a
cluster and a plain object in local mode, where trials run one after another in
this process.  On a cluster the scheduler judges trials in the order their rung
reports arrive, so which trials go on may vary from run to run (Ray's ASHA does
the same); a Trainer search is exact in this respect (see :mod:`daskray.ml.tune`).
While a trial waits for an answer its worker may run another trial on the same
stack (daskray lends the slot of a task blocked in ``get``); the waiting trial
goes on when that one has finished or waits in turn.

Failures: a trial that raises, or whose worker dies, runs again from its last
checkpoint (``get_checkpoint()`` returns it, and iterations go on from the
checkpoint's) up to ``max_failures`` times (a :class:`FailureConfig`); after
that its ``Result.error`` is set and the search goes on.  The controller
remembers each rung decision, so a retried trial is judged once per rung.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import traceback
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import daskray

from .checkpoints import Checkpoint, Result
from .dataset import Dataset
from .search import (
    ASHAScheduler, FIFOScheduler, ResultGrid, TuneConfig, check_stop, generate_configs,
    num_workers, run_search, stop_reached,
)
from .trainer import FailureConfig, RunConfig, Trainer

__all__ = ["Tuner", "report", "get_checkpoint", "with_parameters"]


# ---------------------------------------------------------------------- inside a trial


class _StopTrial(BaseException):
    """Raised by ``report`` in a trial that must stop; caught by the trial's task."""


@dataclass(frozen=True)
class _Plan:
    """What a trial needs to know of its search to report and stop."""

    rungs: frozenset
    max_t: int | None
    stop: Any
    metric: str
    mode: str
    send_checkpoints: bool


class _Attempt(NamedTuple):
    """What one run of a trial did: its reports, last checkpoint (with the
    iteration it was reported at) and the exception that ended it, if any."""

    results: list
    checkpoint: tuple | None
    error: BaseException | None = None


def _local_mode() -> bool:
    """Whether calls run in this process (``init(local_mode=True)``)."""
    return daskray.get_runtime_context().is_local_mode()


class _Channel:
    """Messages to the controller: an actor's methods, or a local object's."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.remote = isinstance(controller, daskray.ActorHandle)

    def ask(self, *args: Any) -> Any:
        if self.remote:
            return daskray.get(self.controller.report.remote(*args))
        return self.controller.report(*args)


class _Session:
    """One run of one trial, in the process that runs it."""

    def __init__(self, trial_id: int, config: dict, plan: _Plan, channel: _Channel,
                 resume: tuple | None) -> None:
        self.trial_id, self.config, self.plan, self.channel = trial_id, config, plan, channel
        #: the last checkpoint and the iteration it was reported at
        self.checkpoint, self.checkpoint_iteration, self.seconds = resume or (None, 0, 0.0)
        self.iteration = self.checkpoint_iteration
        self.started = time.perf_counter()
        self.results: list = []
        self.unsent: list = []
        self.checkpoint_unsent = False

    def report(self, metrics: Mapping, checkpoint: Checkpoint | None) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(f"report() takes a dict of metrics, e.g. report({{'loss': 0.3}}); "
                            f"got {type(metrics).__name__}")
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"report(checkpoint=...) takes a daskray.ml.Checkpoint, e.g. "
                            f"Checkpoint(params={{...}}, epoch=i); got {type(checkpoint).__name__}")
        self.iteration += 1
        result = {**metrics, "training_iteration": self.iteration,
                  "time_total_s": self.seconds + time.perf_counter() - self.started,
                  "config": self.config}
        self.results.append(result)
        self.unsent.append(result)
        if checkpoint is not None:
            self.checkpoint, self.checkpoint_iteration = checkpoint, self.iteration
            self.checkpoint_unsent = self.plan.send_checkpoints
        plan = self.plan
        stop = plan.max_t is not None and self.iteration >= plan.max_t
        if not stop and plan.stop is not None:
            stop = stop_reached(plan.stop, self.trial_id, result, plan.metric, plan.mode)
        if not stop and self.iteration in plan.rungs:
            if plan.metric not in result:
                raise ValueError(f"the scheduler ranks trials by {plan.metric!r} (TuneConfig "
                                 f"metric), but the report at iteration {self.iteration} has "
                                 f"only {sorted(metrics)}")
            stop = not self.channel.ask(*self._message(), (self.iteration, result[plan.metric]))
        elif self.checkpoint_unsent:  # once report returns, the checkpoint is safe
            self.channel.ask(*self._message(), None)
        if stop:
            raise _StopTrial

    def _message(self) -> tuple:
        """(trial, reports not sent yet, the checkpoint if not sent yet)."""
        checkpoint = None
        if self.checkpoint_unsent:
            checkpoint = (self.checkpoint, self.checkpoint_iteration)
            self.checkpoint_unsent = False
        unsent, self.unsent = self.unsent, []
        return self.trial_id, unsent, checkpoint

    def attempt(self, error: BaseException | None = None) -> _Attempt:
        checkpoint = None
        if self.checkpoint is not None:
            checkpoint = (self.checkpoint, self.checkpoint_iteration)
        return _Attempt(self.results, checkpoint, error)


_current: ContextVar[_Session | None] = ContextVar("daskray_ml_trial", default=None)


def report(metrics: Mapping, checkpoint: Checkpoint | None = None) -> None:
    """Report a trial's metrics (and optionally a checkpoint) for this iteration.

    Called from a function trainable run by :class:`Tuner`.  Adds
    ``training_iteration``, ``time_total_s`` and ``config``.  When the search
    stops this trial (a scheduler, or ``RunConfig.stop``), the call does not
    return: the trial ends there (see the module docstring).
    """
    session = _current.get()
    if session is None:
        raise RuntimeError("daskray.ml.report() was called outside a trial; call it from the "
                           "function given to Tuner(train_fn, ...), which runs it per trial")
    session.report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The trial's last reported checkpoint: on a retry, the one to resume from.
    None at a trial's first start, and outside a trial."""
    session = _current.get()
    return None if session is None else session.checkpoint


def _run_trial(trainable: Callable, trial_id: int, config: dict, plan: _Plan,
               controller: Any, resume: tuple | None) -> _Attempt:
    """The task of one trial: run ``trainable(config)`` until it returns or is stopped."""
    session = _Session(trial_id, config, plan, _Channel(controller), resume)
    token = _current.set(session)
    try:
        trainable(dict(config))
    except _StopTrial:
        pass
    except Exception as exc:
        exc.add_note(f"in trial {trial_id} ({config}):\n{traceback.format_exc()}")
        return session.attempt(exc)
    finally:
        _current.reset(token)
    return session.attempt()


# ---------------------------------------------------------------------- the search's side


class _Controller:
    """Where trials' messages go: the scheduler's rungs, and what each trial sent
    (for a retry after its worker died)."""

    def __init__(self, scheduler: Any, mode: str) -> None:
        self.scheduler, self.mode = scheduler, mode
        self.results: dict[int, list] = {}
        self.checkpoints: dict[int, tuple] = {}
        self.decisions: dict[tuple, bool] = {}

    def report(self, trial_id: int, results: list, checkpoint: tuple | None,
               rung: tuple | None) -> bool:
        """Record reports (and a checkpoint); at a rung ``(iteration, value)``,
        whether the trial goes on."""
        kept = self.results.setdefault(trial_id, [])
        for result in results:  # a retry reports iterations again: drop the old ones
            while kept and kept[-1]["training_iteration"] >= result["training_iteration"]:
                kept.pop()
            kept.append(result)
        if checkpoint is not None:
            self.checkpoints[trial_id] = checkpoint
        if rung is None:
            return True
        iteration, value = rung
        if (trial_id, iteration) not in self.decisions:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"the metric a scheduler ranks by must be a number, got "
                                f"{value!r} at iteration {iteration}") from None
            self.decisions[trial_id, iteration] = math.isfinite(value) and \
                self.scheduler.decide(iteration, value, self.mode)
        return self.decisions[trial_id, iteration]

    def trial(self, trial_id: int) -> _Attempt:
        """What the controller got from a trial whose task died."""
        return _Attempt(list(self.results.get(trial_id, [])), self.checkpoints.get(trial_id))


class _FunctionSearch:
    """Runs the trials of a function trainable (see the module docstring)."""

    def __init__(self, trainable: Callable, configs: list[dict], tune_config: TuneConfig,
                 stop: Any, max_failures: int) -> None:
        self.trainable, self.configs, self.tune_config = trainable, configs, tune_config
        self.max_failures = max_failures
        scheduler = copy.deepcopy(tune_config.scheduler) or FIFOScheduler()
        asha = isinstance(scheduler, ASHAScheduler)
        self.plan = _Plan(frozenset(scheduler.milestones()[:-1]) if asha else frozenset(),
                          scheduler.max_t, stop, tune_config.metric, tune_config.mode,
                          max_failures > 0)
        self.controller = None
        if asha or max_failures > 0:
            self.controller = (_Controller(scheduler, tune_config.mode) if _local_mode() else
                               daskray.remote(_Controller).remote(scheduler, tune_config.mode))
        self.history: dict[int, list] = {i: [] for i in range(len(configs))}
        self.checkpoints: dict[int, tuple] = {}
        self.errors: dict[int, BaseException] = {}
        self.failures = dict.fromkeys(range(len(configs)), 0)

    def run(self) -> ResultGrid:
        task = daskray.remote(max_retries=0)(_run_trial)
        limit = self.tune_config.max_concurrent_trials or 2 * num_workers()
        waiting = deque(range(len(self.configs)))
        running: dict = {}
        while waiting or running:
            while waiting and len(running) < limit:
                trial = waiting.popleft()
                ref = task.remote(self.trainable, trial, self.configs[trial], self.plan,
                                  self.controller, self._resume(trial))
                running[ref] = trial
            ready, _ = daskray.wait(list(running), num_returns=1)
            trial = running.pop(ready[0])
            if self._record(trial, self._attempt(ready[0], trial)):
                waiting.appendleft(trial)  # a retry goes first
        return self._grid()

    def _attempt(self, ref: Any, trial: int) -> _Attempt:
        try:
            return daskray.get(ref)
        except Exception as exc:  # the task itself failed: its worker died, say
            if self.controller is None:
                return _Attempt([], None, exc)
            sent = (self.controller.trial(trial) if isinstance(self.controller, _Controller)
                    else daskray.get(self.controller.trial.remote(trial)))
            return sent._replace(error=exc)

    def _record(self, trial: int, attempt: _Attempt) -> bool:
        """Keep what an attempt did; whether the trial runs again."""
        start = self.checkpoints[trial][1] if trial in self.checkpoints else 0
        self.history[trial] = [r for r in self.history[trial] if r["training_iteration"] <= start] \
            + [r for r in attempt.results if r["training_iteration"] > start]
        if attempt.checkpoint is not None:
            self.checkpoints[trial] = attempt.checkpoint
        if attempt.error is None:
            return False
        if self.failures[trial] < self.max_failures:
            self.failures[trial] += 1
            resume = self.checkpoints[trial][1] if trial in self.checkpoints else 0
            self.history[trial] = [r for r in self.history[trial]
                                   if r["training_iteration"] <= resume]
            return True
        self.errors[trial] = attempt.error
        return False

    def _resume(self, trial: int) -> tuple | None:
        """(checkpoint, its iteration, time_total_s then) for a retry; None at first."""
        if trial not in self.checkpoints:
            return None
        checkpoint, iteration = self.checkpoints[trial]
        seconds = next((r["time_total_s"] for r in self.history[trial]
                        if r["training_iteration"] == iteration), 0.0)
        return checkpoint, iteration, seconds

    def _grid(self) -> ResultGrid:
        import pandas as pd

        results = []
        for trial, config in enumerate(self.configs):
            rows = self.history[trial]
            checkpoint = self.checkpoints.get(trial, (None, 0))[0]
            frame = pd.DataFrame([{**{k: v for k, v in r.items() if k != "config"},
                                   **{f"config/{k}": v for k, v in config.items()}}
                                  for r in rows])
            results.append(Result(rows[-1] if rows else {}, frame, checkpoint,
                                  self.errors.get(trial), [checkpoint] if checkpoint else [],
                                  config))
        return ResultGrid(results, self.tune_config.metric, self.tune_config.mode)


# ---------------------------------------------------------------------- the Tuner


class Tuner:
    """Search hyperparameters of a function trainable or a :class:`Trainer`.

    ``trainable``: a function ``train_fn(config)`` that calls :func:`report`, or a
    ``Trainer`` (its model, train_config and evaluator; ``param_space`` keys are
    train_config keys or arguments of the model class).  ``param_space``: the
    config's entries, fixed or drawn (``tune.loguniform(...)``, ``tune.grid_search``
    ...).  ``tune_config``: a :class:`TuneConfig` (metric, mode, num_samples,
    search_alg, scheduler, max_concurrent_trials, seed).  ``run_config``: a
    ``RunConfig`` whose ``stop`` ends trials.  ``failure_config``: a
    ``FailureConfig`` whose ``max_failures`` is how often a failed trial is re-run
    from its last checkpoint (also read from ``run_config.failure_config`` when
    RunConfig has one).
    """

    def __init__(self, trainable: Callable | Trainer, *, param_space: dict | None = None,
                 tune_config: TuneConfig | None = None, run_config: RunConfig | None = None,
                 failure_config: FailureConfig | None = None) -> None:
        if isinstance(trainable, Trainer):
            tune_config = tune_config or trainable.tune_config
            param_space = trainable.param_space if param_space is None else param_space
        else:
            _check_function(trainable)
        tune_config = TuneConfig() if tune_config is None else tune_config
        run_config = RunConfig() if run_config is None else run_config
        failure_config = failure_config or getattr(run_config, "failure_config", None)
        for name, value, kind in (("param_space", param_space, dict),
                                  ("tune_config", tune_config, TuneConfig),
                                  ("run_config", run_config, RunConfig),
                                  ("failure_config", failure_config, FailureConfig)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"Tuner {name} must be a {kind.__name__}, got "
                                f"{type(value).__name__}")
        self.trainable = trainable
        self.param_space = dict(param_space or {})
        self.tune_config = tune_config
        self.run_config = run_config
        self.stop = check_stop(run_config.stop)
        self.max_failures = failure_config.max_failures if failure_config else 0
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"FailureConfig max_failures must be an int >= 0, got "
                             f"{self.max_failures!r}")

    def fit(self, train: Dataset | None = None, valid: Dataset | None = None) -> ResultGrid:
        """Run every trial; a :class:`ResultGrid` of their Results.  For a Trainer,
        ``train`` (and ``valid``) are the datasets, as ``Trainer.fit`` takes them; a
        function trainable gets its data itself (a closure, or :func:`with_parameters`)."""
        if not daskray.is_initialized():
            raise RuntimeError("daskray is not running: call daskray.init() before Tuner.fit()")
        if isinstance(self.trainable, Trainer):
            for name, value in (("train", train), ("valid", valid)):
                if value is not None and not isinstance(value, Dataset):
                    raise TypeError(f"Tuner.fit {name} must be a daskray.ml.Dataset, got "
                                    f"{type(value).__name__}")
            if train is None:
                raise TypeError("Tuner(trainer).fit(train, valid=None) needs the training "
                                "Dataset, as Trainer.fit does")
            trainer = self.trainable
            return run_search(trainer.model, trainer.config, self.param_space, self.tune_config,
                              train, valid, trainer.evaluator, stop=self.stop,
                              max_failures=self.max_failures)
        if train is not None or valid is not None:
            raise TypeError("Tuner.fit() takes datasets only for a Trainer; a function "
                            "trainable gets its data itself (a closure, or "
                            "tune.with_parameters(train_fn, data=...))")
        configs = generate_configs(self.param_space, self.tune_config.num_samples,
                                   self.tune_config.seed, self.tune_config.search_alg)
        return _FunctionSearch(self.trainable, configs, self.tune_config, self.stop,
                               self.max_failures).run()


def _check_function(trainable: Any) -> None:
    if not callable(trainable):
        raise TypeError(f"Tuner needs a function train_fn(config) or a daskray.ml.Trainer, "
                        f"got {type(trainable).__name__}")
    try:
        inspect.signature(trainable).bind({})
    except TypeError:
        raise TypeError(f"a Tuner trainable is called with one argument, the trial's config "
                        f"dict; {getattr(trainable, '__name__', trainable)!r} cannot be") from None
    except ValueError:  # no signature to check (a builtin): find out when it runs
        pass


class _WithParameters:
    """``trainable(config, **values)``, the values read from the object store."""

    def __init__(self, trainable: Callable, refs: dict) -> None:
        self.trainable, self.refs = trainable, refs
        self.__name__ = getattr(trainable, "__name__", "trainable")

    def __call__(self, config: dict) -> Any:
        values = daskray.get(list(self.refs.values()))
        return self.trainable(config, **dict(zip(self.refs, values)))


def with_parameters(trainable: Callable, **kwargs: Any) -> Callable:
    """``trainable`` called as ``trainable(config, **kwargs)``, with each value
    stored once in the object store instead of pickled into every trial (for
    data sets and other large objects)."""
    if not callable(trainable):
        raise TypeError(f"with_parameters needs a function, got {type(trainable).__name__}")
    try:
        inspect.signature(trainable).bind({}, **kwargs)
    except TypeError as exc:
        name = getattr(trainable, "__name__", trainable)
        raise TypeError(f"with_parameters: {name!r} cannot be called as "
                        f"trainable(config, {', '.join(kwargs)}): {exc}") from None
    except ValueError:
        pass
    return _WithParameters(trainable, {k: daskray.put(v) for k, v in kwargs.items()})
