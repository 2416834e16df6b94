"""XGBoost trained data-parallel on daskray's workers: :class:`XGBoostTrainer`.

``XGBoostTrainer(params=..., num_boost_round=..., scaling_config=ScalingConfig(num_workers=N),
run_config=...).fit(train, valid=...)`` starts one actor per worker (a long-lived
process of its own).  Each actor reads its share of the dataset's shards from the
object store -- arrays in shared memory, read in place -- and builds xgboost's
``QuantileDMatrix`` from them through a ``DataIter``, so the rows are never
concatenated into one copy.  The actors join xgboost's own collective (its
``RabitTracker``, started by the trainer on 127.0.0.1, or on the address that
reaches the dask scheduler on the dask.distributed backend); xgboost then
allreduces histograms and metrics itself.

The driver trains in *chunks* of ``checkpoint_frequency`` rounds: one call per
actor per chunk returns the chunk's per-round metrics (``result.metrics_dataframe``),
and at the chunk's end rank 0's booster becomes the latest checkpoint.  When an
actor dies (its process killed, say), every actor of the group is ended, a new
group is started, and training goes on from the last checkpoint, at most
``FailureConfig.max_failures`` times.  xgboost reseeds per round
(``seed_per_iteration``), so a resumed run grows the same trees as an
uninterrupted one.  After a clean fit the actors stay up, idle and holding no
data, for the next fit of the same cluster (see :class:`_Pool`).

Same model from 1 and 2 workers: the bin boundaries come from a quantile sketch
that xgboost merges across workers, so they can differ between worker counts when
a feature has more distinct values than ``max_bin``; the models then differ by the
sketch's approximation (accuracy within 0.2 points of xgboost in one process in
the tests and the benchmark).  With at most ``max_bin`` distinct values per
feature the cuts are exact and 1 and 2 workers grow the same trees, with leaf
values, intercept and predictions equal up to float32 rounding (relative 1e-6):
xgboost adds the gradient sums and estimates the intercept in another order on
two workers than on one (tested).

Tuning (``tune_config=TuneConfig(...)``, ``param_space=...``) runs each trial as one
task training with one worker and one thread, reporting every round to the same
search as :class:`~daskray.ml.Tuner` (ASHA rungs are rounds).

xgboost is an extra: ``pip install 'daskray[xgboost]'`` (the CPU-only ``xgboost-cpu``).
"""

from __future__ import annotations

import os
from typing import Any

import daskray

from .checkpoints import Checkpoint
from .dataset import Dataset
from .trainer import FailureConfig, RunConfig, ScalingConfig
from .xgboost_core import (
    DEFAULT_PARAMS, XGBoostResult, _checkpoint, build_matrices, get_model, new_booster,
    predict, require_xgboost, shard_parts, train_rounds,
)
from .xgboost_tune import search

__all__ = ["XGBoostTrainer", "XGBoostResult", "predict", "get_model", "require_xgboost",
           "release_workers"]

#: how long the tracker and the workers wait for each other to connect (seconds)
TRACKER_TIMEOUT = 120


# ---------------------------------------------------------------------- the actors


class _XGBoostWorker:
    """One training process: joins the collective for a fit, holds its matrices and
    booster, and after :meth:`finish` waits idle (no data) for the next fit."""

    def __init__(self) -> None:
        require_xgboost()  # the import is most of a new process's start: pay it now
        self.rank, self.evals, self.booster = 0, [], None

    def pid(self) -> int:
        return os.getpid()

    def setup(self, rank: int, tracker_args: dict, params: dict, train: list,
              valid: list | None, model: bytes | None) -> int:
        """Join the collective as ``rank``, build the matrices from the shards (their
        refs come nested in lists, so they are read here, in place), start from
        ``model``; the rank xgboost gave."""
        from xgboost import collective

        self.rank = rank
        collective.init(**tracker_args, dmlc_task_id=str(rank))
        shards = daskray.get(list(train))
        valid_shards = daskray.get(list(valid)) if valid is not None else None
        self.evals = build_matrices(params, shards, valid_shards)
        self.booster = new_booster(params, self.evals, model)
        return collective.get_rank()

    def train(self, first: int, last: int) -> tuple[list[dict], bytes | None]:
        """Rounds ``first .. last - 1``: their metrics, and rank 0's booster."""
        rows = train_rounds(self.booster, self.evals, first, last)
        model = bytes(self.booster.save_raw("ubj")) if self.rank == 0 else None
        return rows, model

    def finish(self) -> None:
        """Drop the fit's data and leave the collective (the tracker waits for all)."""
        from xgboost import collective

        self.evals, self.booster = [], None
        collective.finalize()


class _Pool:
    """Idle training actors of this driver's cluster, kept between fits: a new
    process pays for importing xgboost (seconds, with scikit-learn), which would
    otherwise be most of a short fit.  :func:`release_workers` ends them."""

    def __init__(self) -> None:
        self.address: str | None = None
        self.idle: list = []

    def take(self, n: int) -> list:
        """``n`` actors: idle ones of this cluster that still answer, then new ones."""
        address = _cluster_address()
        if address != self.address:
            self.address, self.idle = address, []
        taken, self.idle = self.idle[:n], self.idle[n:]
        if taken:
            try:
                daskray.get([a.pid.remote() for a in taken], timeout=30)
            except Exception:  # a cluster re-made at the same address, a dead actor
                _end(taken)
                taken = []
        worker = daskray.remote(max_restarts=0, max_task_retries=0)(_XGBoostWorker)
        return taken + [worker.remote() for _ in range(n - len(taken))]

    def give_back(self, actors: list) -> None:
        self.idle.extend(actors)

    def release(self) -> None:
        actors, self.idle = self.idle, []
        if daskray.is_initialized():
            _end(actors)


_pool = _Pool()


def release_workers() -> None:
    """End the idle training actors that :class:`XGBoostTrainer` keeps between fits."""
    _pool.release()


def _end(actors: list) -> None:
    """Every actor ended (a survivor of a lost peer may be stuck waiting for it)."""
    for actor in actors:
        try:
            daskray.kill(actor)
        except Exception:  # already dead
            pass


def _cluster_address() -> str | None:
    """The address of the cluster this driver runs on (None when it has none)."""
    return daskray.init(ignore_reinit_error=True).address_info.get("address")


def _tracker_host() -> str:
    """Where the workers reach the tracker: loopback on daskray's own runtime (one
    machine); on a dask.distributed cluster the address this host uses to reach
    the scheduler."""
    from urllib.parse import urlparse

    address = _cluster_address() or ""
    host = urlparse(address).hostname if "://" in address else None
    if not host or host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    from distributed.utils import get_ip

    return get_ip(host)


class _Group:
    """The actors of one attempt and their tracker: returned to the pool together
    after a clean finish, ended together after a failure."""

    def __init__(self, params: dict, train: Dataset, valid: Dataset | None,
                 num_workers: int, model: bytes | None) -> None:
        from xgboost.tracker import RabitTracker

        parts = shard_parts(train.num_shards, num_workers)
        valid_parts = shard_parts(valid.num_shards, len(parts)) if valid is not None else None
        self.tracker = RabitTracker(n_workers=len(parts), host_ip=_tracker_host(),
                                    timeout=TRACKER_TIMEOUT)
        self.tracker.start()
        args = {**self.tracker.worker_args(), "dmlc_timeout": TRACKER_TIMEOUT}
        self.actors = _pool.take(len(parts))
        _gather([actor.setup.remote(rank, args, params, [train.shards[i] for i in part],
                                    _valid_part(valid, valid_parts, rank), model)
                 for rank, (actor, part) in enumerate(zip(self.actors, parts))])

    def train(self, first: int, last: int) -> tuple[list[dict], bytes]:
        """Rounds ``first .. last - 1`` on every worker: rank 0's metrics and booster."""
        return _gather([a.train.remote(first, last) for a in self.actors])[0]

    def finish(self) -> None:
        _gather([a.finish.remote() for a in self.actors])
        self.tracker.wait_for(TRACKER_TIMEOUT)
        self.tracker.free()
        _pool.give_back(self.actors)
        self.actors = []

    def end(self) -> None:
        """Every actor ended, and the tracker freed."""
        _end(self.actors)
        self.actors = []
        try:
            self.tracker.free()
        except Exception:  # xgboost reports the lost worker here too: already known
            pass


def _valid_part(valid: Dataset | None, parts: list | None, rank: int) -> list | None:
    """The validation shards' refs for ``rank`` (None: no validation set)."""
    if valid is None or parts is None:
        return None
    return [valid.shards[i] for i in parts[rank]] if rank < len(parts) else []


class WorkerDied(Exception):
    """An actor of the training group died: the run may go on from its checkpoint."""


#: after one worker's call failed, how long the others' calls may take to fail too
#: (a peer of a dead worker fails first when its connection breaks)
FAILURE_GRACE_S = 30.0


def _gather(refs: list) -> list:
    """The values of calls on every worker of a group, in order.  When one fails,
    the others are given ``FAILURE_GRACE_S`` to finish or fail: if any of them died,
    :class:`WorkerDied` (its cause the ActorDiedError), else the first error."""
    pending, values = list(refs), {}
    while pending:
        ready, pending = daskray.wait(pending, num_returns=1)
        try:
            values[ready[0]] = daskray.get(ready[0])
        except daskray.ActorDiedError as error:
            raise WorkerDied() from error
        except Exception as error:
            finished, _ = daskray.wait(pending, num_returns=len(pending),
                                       timeout=FAILURE_GRACE_S) if pending else ([], [])
            for ref in finished:
                try:
                    daskray.get(ref)
                except daskray.ActorDiedError as died:
                    raise WorkerDied() from died
                except Exception:
                    pass
            raise error
    return [values[ref] for ref in refs]


class _Progress:
    """Rounds done, the last checkpoint's booster and the metrics of a training."""

    def __init__(self, done: int, model: bytes | None, end: int) -> None:
        self.done, self.model, self.end = done, model, end
        #: every chunk recorded ends at a checkpoint: a retry never drops rows
        self.history: list[dict] = []

    @property
    def finished(self) -> bool:
        return self.done >= self.end

    def record(self, rows: list[dict], model: bytes) -> None:
        """A chunk done: its rounds' metrics, and its booster as the checkpoint."""
        self.history.extend(rows)
        self.done, self.model = rows[-1]["training_iteration"], model



# ---------------------------------------------------------------------- the trainer


class XGBoostTrainer:
    """Gradient-boosted trees on daskray's workers; see the module docstring.

    ``params``: xgboost's training parameters (``objective``, ``max_depth``, ``eta``,
    ``eval_metric``, ``nthread`` -- threads per worker, by default the machine's
    cores shared among the workers -- ...).  ``num_boost_round``: rounds.
    ``checkpoint_frequency``: rounds between checkpoints (0: only at the end).
    ``run_config``: ``stop`` (as for ``Trainer``, on any reported metric or
    ``training_iteration``) is checked at each checkpoint; ``storage_path`` gets
    the final checkpoint.
    ``failure_config`` (or ``run_config.failure_config``): restarts after a worker
    died.  ``resume_from_checkpoint``: go on from an earlier result's checkpoint.
    ``tune_config`` + ``param_space``: search instead (see :meth:`fit`).
    """

    def __init__(self, params: dict | None = None, num_boost_round: int = 10, *,
                 scaling_config: ScalingConfig | None = None,
                 run_config: RunConfig | None = None, checkpoint_frequency: int = 10,
                 failure_config: FailureConfig | None = None,
                 resume_from_checkpoint: Checkpoint | None = None,
                 tune_config: Any = None, param_space: dict | None = None) -> None:
        require_xgboost()
        if not isinstance(num_boost_round, int) or num_boost_round < 1:
            raise ValueError(f"num_boost_round must be a positive int, got {num_boost_round!r}")
        if not isinstance(checkpoint_frequency, int) or checkpoint_frequency < 0:
            raise ValueError(f"checkpoint_frequency must be an int >= 0 (0: at the end only), "
                             f"got {checkpoint_frequency!r}")
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.num_boost_round = num_boost_round
        self.scaling = scaling_config or ScalingConfig()
        self.run_config = run_config or RunConfig()
        self.checkpoint_frequency = checkpoint_frequency or num_boost_round
        self.failure = failure_config or self.run_config.failure_config or FailureConfig()
        self.resume = resume_from_checkpoint
        self.tune_config, self.param_space = tune_config, dict(param_space or {})

    def fit(self, train: Dataset, valid: Dataset | None = None) -> XGBoostResult:
        """Train; the result has per-round metrics, the booster in its checkpoint and
        ``predict``.  With ``tune_config``: the best trial's result, whose ``grid``
        holds every trial (a ``ResultGrid``)."""
        if not daskray.is_initialized():
            raise RuntimeError("daskray is not running: call daskray.init() before "
                               "XGBoostTrainer.fit()")
        for name, value in (("train", train), ("valid", valid)):
            if value is not None and not isinstance(value, Dataset):
                raise TypeError(f"XGBoostTrainer.fit {name} must be a daskray.ml.Dataset "
                                f"(Dataset.from_numpy, from_pandas, from_dask), got "
                                f"{type(value).__name__}")
        if self.tune_config is not None:
            return search(self, train, valid)
        return self._train(train, valid)

    def _worker_params(self) -> dict:
        """The params each worker trains with; ``nthread``: cores per worker."""
        threads = max(1, (os.cpu_count() or 1) // self.scaling.num_workers)
        return {"nthread": threads, **self.params}

    def _train(self, train: Dataset, valid: Dataset | None) -> XGBoostResult:
        import pandas as pd

        params = self._worker_params()
        first, model = 0, None
        if self.resume is not None:
            first, model = self.resume.epoch + 1, bytes(get_model(self.resume).save_raw("ubj"))
        progress = _Progress(first, model, self.num_boost_round)
        failures = 0
        while not progress.finished:
            try:
                self._attempt(params, train, valid, progress)
            except WorkerDied as error:
                failures += 1
                if failures > self.failure.max_failures:
                    raise RuntimeError(
                        f"XGBoost training lost a worker {failures} times (FailureConfig("
                        f"max_failures={self.failure.max_failures})); it got to round "
                        f"{progress.done}: raise max_failures or find why workers die"
                        ) from error.__cause__
        frame = pd.DataFrame(progress.history)
        checkpoint = _checkpoint(progress.model, progress.done, params)
        if self.run_config.storage_path:
            checkpoint.to_directory(self.run_config.storage_path)
        return XGBoostResult(progress.history[-1] if progress.history else {}, frame,
                             checkpoint, None, [checkpoint], dict(params))

    def _attempt(self, params: dict, train: Dataset, valid: Dataset | None,
                 progress: "_Progress") -> None:
        """Train with a new group of workers from ``progress``'s last checkpoint to
        the end, recording each chunk in ``progress``; :class:`WorkerDied` when an
        actor of the group died (the group is ended then)."""
        group = None
        try:
            group = _Group(params, train, valid, self.scaling.num_workers, progress.model)
            while not progress.finished:
                last = min(progress.done + self.checkpoint_frequency, progress.end)
                rows, model = group.train(progress.done, last)
                progress.record(rows, model)
                self._checkpointed(progress.done, model)
                if self._should_stop(rows[-1]):
                    progress.end = progress.done
            group.finish()
        except BaseException:
            if group is not None:
                group.end()
            raise

    def _checkpointed(self, rounds: int, model: bytes) -> None:
        """Called after each checkpoint (a hook for tests and progress)."""

    def _should_stop(self, row: dict) -> bool:
        """Whether ``RunConfig(stop=...)`` ends training at this round's metrics."""
        for metric, target in (self.run_config.stop or {}).items():
            value = row.get("training_iteration" if metric in ("epochs", "rounds") else metric)
            if value is None:
                continue
            if metric in ("epochs", "rounds", "training_iteration"):
                if value >= target:
                    return True
            elif ("acc" in metric and value >= target) or ("acc" not in metric and value <= target):
                return True
        return False
