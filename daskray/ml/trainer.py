"""Data-parallel training: one task per group of shards and epoch, exchanging
gradient sums directly, or a task graph when that cannot be.

The shards are cut into at most ``num_workers`` groups by the worker holding
them (found by a task per shard before training, see :func:`local_groups`), so
a group's task reads its shards in place instead of having them copied from
another worker.  Every step of an epoch is the same arithmetic whichever way it
runs: each group takes the gradient SUM of each of its shards' slice of the
step's global batch, then every group's per-shard sums are added in a fixed
pairwise tree in shard order, divided by the batch's rows, L2 added, and the
optimizer stepped.  The close of an epoch evaluates each group's training (and
validation) shards at the new parameters; the driver reads the metrics.

**The direct exchange** (several groups on daskray's own runtime, one host):
one task per group runs the whole epoch (:func:`_mesh_epoch_task`).  After each
step's gradient sums it sends them to the other groups' tasks and receives
theirs over a :class:`~daskray.ml.collective.Mesh` -- authenticated Unix-domain
sockets set up for that epoch, raw float64 bytes, no head in between -- so a
step costs one message hop, not a task hop through the head.  Every task
applies the same update to the same sums, so all hold the same parameters
without sending them.  Sums a task has not received within as long as its own
took (the other process is waiting for a CPU on a loaded machine), it computes
itself from the other group's shards and sends on, so the step goes on at the
pace of the tasks that run.  Groups are evened out first as far as each keeps
most of its own shards (:func:`balance_groups`).  These tasks must run at the
same time:

* A worker that dies mid-epoch ends its task (its peers finish the epoch
  computing its sums, but its shards' metrics are lost), and the driver redoes
  the epoch from the last closed state (at most ``FailureConfig.max_failures``
  times), on the task graph until the dead worker's replacement is up, then
  directly again.
* Tasks that cannot all run at once (a worker busy with a long task, fewer
  workers than groups) time out waiting for each other
  (``collective.RENDEZVOUS_SECONDS``); the driver then trains the rest of the
  fit on the task graph and says why (``Trainer.fallback_reason``, a warning).
* On the dask.distributed backend, inside a task, across hosts or off Linux,
  the task graph trains.

**The task graph**: step 0 is one task per group (its gradient sums at the
epoch's parameters); step t > 0 one task per group that first applies step t-1's
update from every group's outputs, then takes its gradient sums; the close, one
task per group, applies the last update and evaluates.  A step costs a task hop
(report, schedule, dispatch, fetch); only gradient sums travel, and the cluster
retries the tasks of a dead worker.  With one group there is nothing to
exchange: one task runs a whole epoch, close included, whatever the backend.

What every task of a run shares (model, optimizer, classes, ...) is put in the
object store once.  The driver submits each epoch without waiting for it and
reads the previous epoch's metrics meanwhile; when a ``stop`` condition is met,
the epoch already submitted is cancelled.  Which rows a step reads depends only
on the seed, the epoch, the step and the shard, and the reduction order only on
the shards -- never on the workers, the grouping or the path -- so training on
one worker, on two, or in one process with :func:`reference_fit` gives
bit-identical parameters.  ``Trainer.epoch_paths`` tells which path trained each
epoch ("mesh" or "graph"), ``Trainer.redone`` the epochs redone and why.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import daskray

from . import collective
from .checkpoints import Checkpoint, Result
from .dataset import Dataset
from .models import Model
from .search import run_search
from .steps import (
    apply_evaluator, evaluate_shard, full_config, make_optimizer, model_targets, output_count,
    steps_per_epoch, summarize, update,
)
from .steps import DEFAULT_TRAIN_CONFIG, tree_sum  # noqa: F401 - their old home was here

# ---------------------------------------------------------------------- configs


@dataclass
class ScalingConfig:
    """How many workers may share the training: the shards are cut into at most
    ``num_workers`` groups, one task per group and epoch (exchanging gradient
    sums directly) or per group and step (the task graph).  Groups follow where
    the shards are held, so there may be fewer (one, if a single worker holds
    every shard).  Placement only: the results do not depend on it."""

    num_workers: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {self.num_workers!r}")


@dataclass
class RunConfig:
    """``stop``: end early when a metric reaches a value, e.g. ``{"valid_loss": 0.3}``
    (for metrics with "acc" in their name: at or above; else at or below; the
    counters ``training_iteration`` and ``epochs``: at or above).
    ``failure_config``: as ``Trainer(failure_config=...)``, Ray's place for it."""

    name: str | None = None
    stop: dict | None = None
    storage_path: str | None = None
    failure_config: "FailureConfig | None" = None


@dataclass
class FailureConfig:
    """``max_failures``: on the task graph, times a step's task is re-run after its
    worker died (the run resumes from the last completed step, whose parameters
    are an object the head keeps); with the direct exchange, times an epoch is
    redone from the last completed epoch after a worker died mid-epoch."""

    max_failures: int = 3


# ---------------------------------------------------------------------- the algorithm


#: bytes of per-epoch row orders a process keeps (see :func:`epoch_order`)
ORDER_CACHE_BYTES = 64 * 2**20
_order_cache: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_order_cache_bytes = 0
_order_lock = threading.Lock()


def epoch_order(n: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The permutation of a shard's ``n`` rows for ``epoch``, fixed by (seed, epoch, shard).

    Every step of an epoch reads a slice of it, so it is drawn once per process
    and kept (read-only) in a small LRU cache bounded by ``ORDER_CACHE_BYTES``:
    drawing it again for every step cost more than the step's gradient."""
    global _order_cache_bytes
    key = (int(n), int(seed), int(epoch), int(shard))
    with _order_lock:
        order = _order_cache.get(key)
        if order is not None:
            _order_cache.move_to_end(key)
            return order
    order = np.random.default_rng([seed, epoch, shard]).permutation(n)
    order.flags.writeable = False
    with _order_lock:
        if key not in _order_cache and order.nbytes <= ORDER_CACHE_BYTES:
            _order_cache[key] = order
            _order_cache_bytes += order.nbytes
            while _order_cache_bytes > ORDER_CACHE_BYTES:
                _, dropped = _order_cache.popitem(last=False)
                _order_cache_bytes -= dropped.nbytes
    return order


def batch_rows(n: int, epoch: int, step: int, steps: int, seed: int, shard: int) -> np.ndarray:
    """Rows of a shard of ``n`` rows that step ``step`` of ``epoch`` reads: an equal
    share of a per-epoch permutation fixed by (seed, epoch, shard)."""
    order = epoch_order(n, seed, epoch, shard)
    return order[step * n // steps:(step + 1) * n // steps]


def shard_gradients(params: dict, model: Model, classes: Any, epoch: int, step: int,
                    steps: int, seed: int, first_shard: int, *shards: tuple) -> list:
    """Gradient sums of consecutive shards for one step: [(grads, rows), ...]."""
    return numbered_shard_gradients(params, model, classes, epoch, step, steps, seed,
                                    range(first_shard, first_shard + len(shards)), shards)


def numbered_shard_gradients(params: dict, model: Model, classes: Any, epoch: int, step: int,
                             steps: int, seed: int, shard_ids: Sequence[int],
                             shards: Sequence[tuple]) -> list:
    """Gradient sums of the shards numbered ``shard_ids`` for one step: [(grads, rows), ...]."""
    out = []
    for shard, (X, y) in zip(shard_ids, shards):
        rows = batch_rows(len(y), epoch, step, steps, seed, shard)
        target = model_targets(model, y[rows], classes)
        # np.take copies the same rows as X[rows], faster
        batch = np.take(X, rows, axis=0) if isinstance(X, np.ndarray) else X[rows]
        out.append((model.gradient(params, batch, target), len(rows)))
    return out


def in_shard_order(shard_ids: Sequence[int], items: Sequence) -> list:
    """``items`` (one per shard, listed in the order of ``shard_ids``) sorted by shard."""
    return [items[i] for i in sorted(range(len(shard_ids)), key=shard_ids.__getitem__)]


def update_from_groups(model: Model, optimizer: Any, l2: float, order: Sequence[int],
                       outputs: Sequence[tuple], carry: tuple) -> tuple[dict, dict]:
    """The update of ``carry = (params, state)`` from :func:`group_steps` outputs.

    ``order`` lists the shards behind the outputs' gradient sums, output after
    output; the sums are put back in shard order first, so the pairwise tree is
    the one :func:`reference_fit` uses whichever shards each group held."""
    flat = [g for _, grads in outputs for g in grads]
    return update(carry[0], carry[1], model, optimizer, l2, in_shard_order(order, flat))


def group_steps(start: tuple | None, model: Model, optimizer: Any, l2: float, classes: Any,
                epoch: int, first_step: int, last_step: int, steps: int, seed: int,
                shard_ids: Sequence[int], own: int, order: Sequence[int],
                *inputs: Any) -> tuple[tuple, list]:
    """Steps ``first_step .. last_step - 1`` of ``epoch`` for one group of shards.

    ``inputs`` are the group's shards (numbered ``shard_ids``), then the previous
    step's outputs of every group when its update is still pending.  Parameters
    and optimizer state come from ``start`` (when nothing is pending) or else
    from this group's own previous output (number ``own``; every group holds the
    same), updated by the pending gradient sums (see :func:`update_from_groups`).
    Every step but the last is completed here -- only a group holding every
    shard may run more than one -- and the last one's gradient sums are returned
    with the parameters they were taken at: ``((params, state), [(grads, rows),
    ...])``, for the next task to apply.  The same calls in the same order as
    :func:`reference_fit`, so the same bits.
    """
    shards, previous = inputs[:len(shard_ids)], inputs[len(shard_ids):]
    if previous:
        params, state = update_from_groups(model, optimizer, l2, order, previous,
                                           previous[own][0])
    elif start is not None:
        params, state = start
    else:
        raise ValueError("group_steps needs a start (params, state) or previous outputs")
    grads = numbered_shard_gradients(params, model, classes, epoch, first_step, steps, seed,
                                     shard_ids, shards)
    for step in range(first_step + 1, last_step):
        params, state = update(params, state, model, optimizer, l2,
                               in_shard_order(shard_ids, grads))
        grads = numbered_shard_gradients(params, model, classes, epoch, step, steps, seed,
                                         shard_ids, shards)
    return (params, state), grads


def close_epoch(model: Model, optimizer: Any, l2: float, classes: Any, order: Sequence[int],
                outputs: Sequence[tuple], own: int, train_shards: Sequence[tuple],
                valid_shards: Sequence[tuple], judge_train: bool,
                judge_valid: bool) -> tuple[tuple, list, list]:
    """The end of an epoch for one group: the last step's update (from every
    group's :func:`group_steps` output), then the group's shards evaluated at
    the new parameters.  ``((params, state), train parts, valid parts)``, a part
    being :func:`evaluate_shard`'s tuple; ``judge_*``: with predictions."""
    carry = update_from_groups(model, optimizer, l2, order, outputs, outputs[own][0])
    return (carry,
            [evaluate_shard(carry[0], model, classes, s, judge_train) for s in train_shards],
            [evaluate_shard(carry[0], model, classes, s, judge_valid) for s in valid_shards])


# The tasks Trainer.fit submits.  What every task of a run shares -- the model,
# the optimizer, L2, the classes, the steps per epoch, the seed and the shard
# order -- travels once, as one object in the store (``plan``), not in every call.
# An epoch ends with a "closed" tuple ``((params, state), train parts, valid
# parts)``; the next epoch starts from it.

def _step_task(plan: tuple, closed: tuple | None, epoch: int, first_step: int,
               last_step: int, shard_ids: list, own: int, *inputs: Any) -> tuple[tuple, list]:
    """Steps of one group (:func:`group_steps`), from ``closed`` or pending outputs."""
    model, optimizer, l2, classes, steps, seed, order = plan
    return group_steps(None if closed is None else closed[0], model, optimizer, l2, classes,
                       epoch, first_step, last_step, steps, seed, shard_ids, own, order,
                       *inputs)


def _close_task(plan: tuple, own: int, n_train: int, n_valid: int, judge_train: bool,
                judge_valid: bool, *inputs: Any) -> tuple[tuple, list, list]:
    """:func:`close_epoch` of one group; ``inputs``: its ``n_train`` training shards,
    its ``n_valid`` validation shards, then every group's output of the epoch's
    last step."""
    model, optimizer, l2, classes, _, _, order = plan
    train, valid = inputs[:n_train], inputs[n_train:n_train + n_valid]
    return close_epoch(model, optimizer, l2, classes, order, inputs[n_train + n_valid:], own,
                       train, valid, judge_train, judge_valid)


def _epoch_task(plan: tuple, closed: tuple, epoch: int, n_train: int, judge_train: bool,
                judge_valid: bool, *shards: Any) -> tuple[tuple, list, list]:
    """A whole epoch when one group holds every shard: all steps, then the close;
    ``shards``: the ``n_train`` training shards (all, in order), then the
    validation shards."""
    model, optimizer, l2, classes, steps, seed, order = plan
    train, valid = shards[:n_train], shards[n_train:]
    last = group_steps(closed[0], model, optimizer, l2, classes, epoch, 0, steps, steps, seed,
                       order, 0, order, *train)
    return close_epoch(model, optimizer, l2, classes, order, [last], 0, train, valid,
                       judge_train, judge_valid)


#: a step's message between training tasks: the step, then how many shards' sums
_STEP = struct.Struct("<qI")


def _pack_step(step: int, shard_ids: Sequence[int], sums: Sequence[tuple]) -> bytes:
    """The gradient sums of shards ``shard_ids`` at ``step``, as bytes."""
    ids = np.asarray(shard_ids, dtype=np.int64)
    return b"".join([_STEP.pack(step, len(ids)), ids.data, collective.pack_sums(sums)])


def _take_steps(messages: list, known: dict, step: int) -> None:
    """Add the sums of step ``step`` or later from ``messages`` to ``known``,
    ``{(step, shard): (grads, rows)}``; older ones are not needed any more."""
    for _, payload in messages:
        at, count = _STEP.unpack_from(payload, 0)
        if at < step:
            continue
        ids = np.frombuffer(payload, dtype=np.int64, count=count, offset=_STEP.size).tolist()
        sums = collective.unpack_sums(memoryview(payload)[_STEP.size + 8 * count:])
        for shard, item in zip(ids, sums):
            known.setdefault((at, shard), item)


#: the least a task waits for another group's sums before computing them itself
PATIENCE_SECONDS = 0.001


def _mesh_epoch_task(plan: tuple, closed: tuple, epoch: int, spec: tuple, tag: str, rank: int,
                     shard_ids: list, all_shards: list, n_train: int, judge_train: bool,
                     judge_valid: bool, *shards: Any) -> tuple[tuple, list, list]:
    """A whole epoch of one group, its gradient sums exchanged with the other
    groups' tasks over a :class:`~daskray.ml.collective.Mesh` (joined as ``rank``
    under ``tag``); then the group's shards evaluated, as :func:`close_epoch` does.
    ``shards``: the group's ``n_train`` training shards (numbered ``shard_ids``),
    then its validation shards; ``all_shards``: the refs of every training shard.
    (A message to a task that has not read a great deal already is dropped: it
    will compute those sums itself when it runs again.)

    Each step the task sends its shards' sums to the others and waits for
    theirs.  Sums that have not come within as long as its own took (at least
    ``PATIENCE_SECONDS``) -- the other group's process is waiting for a CPU, or
    is gone -- it computes itself, from ``all_shards`` (read in place from the
    store the first time), and sends them on: a step never waits for a process
    that does not run, and a task that fell behind catches up on the sums
    already there.  Whoever computes a shard's sums, they are the same bits,
    added in shard order: every task applies the same updates as
    :func:`reference_fit`."""
    model, optimizer, l2, classes, steps, seed, order = plan
    held = dict(zip(shard_ids, shards[:n_train]))
    everyone = sorted(order)
    params, state = closed[0]
    known: dict = {}
    # A worker loads the public API (and dask) on first use, ~0.2 s: here, before
    # the steps, rather than at the first read of another group's shards.
    daskray.get  # noqa: B018 - the attribute's first lookup is the load
    with collective.Mesh.join(spec, tag, rank) as mesh:
        for step in range(steps):
            _take_steps(mesh.receive(0), known, step)
            mine = [s for s in shard_ids if (step, s) not in known]
            began = time.perf_counter()
            if mine:
                sums = numbered_shard_gradients(params, model, classes, epoch, step, steps,
                                                seed, mine, [held[s] for s in mine])
                mesh.send(_pack_step(step, mine, sums), droppable=True)
                known.update(zip(((step, s) for s in mine), sums))
            deadline = time.perf_counter() + max(time.perf_counter() - began, PATIENCE_SECONDS)
            while True:
                missing = [s for s in everyone if (step, s) not in known]
                if not missing:
                    break
                left = deadline - time.perf_counter()
                if left > 0 and len(mesh.ended) < len(mesh.peers):
                    _take_steps(mesh.receive(left), known, step)
                    continue
                absent = [s for s in missing if s not in held]
                if absent:  # the first time: the other groups' shards, read in place
                    held.update(zip(absent, daskray.get([all_shards[s] for s in absent])))
                sums = numbered_shard_gradients(params, model, classes, epoch, step, steps,
                                                seed, missing, [held[s] for s in missing])
                mesh.send(_pack_step(step, missing, sums), droppable=True)
                known.update(zip(((step, s) for s in missing), sums))
            params, state = update(params, state, model, optimizer, l2,
                                   [known.pop((step, s)) for s in everyone])
            for key in [k for k in known if k[0] <= step]:
                del known[key]
    train, valid = shards[:n_train], shards[n_train:]
    return ((params, state),
            [evaluate_shard(params, model, classes, s, judge_train) for s in train],
            [evaluate_shard(params, model, classes, s, judge_valid) for s in valid])


def _error_of(ref: Any) -> BaseException | None:
    """What ``get(ref)`` raises, or None."""
    try:
        daskray.get(ref)
    except Exception as exc:  # noqa: BLE001 - the caller sorts them
        return exc
    return None


def _where() -> tuple[str, int, int]:
    """The process a task runs in: (host, network namespace, pid).  Tasks whose
    processes share the first two can reach each other's abstract Unix sockets."""
    import socket

    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return socket.gethostname(), netns, os.getpid()


def _locate(shard: Any) -> tuple[str, int]:
    """Where a shard is: a task that reads only it runs next to it."""
    return _where()


def local_groups(owners: Sequence[Any], n_groups: int) -> list[list[int]]:
    """Shards grouped by the process holding them: at most ``n_groups`` groups.

    ``owners[i]`` names the process holding shard ``i``.  Each of the
    ``n_groups`` processes holding most shards gets a group of its shards; the
    shards of any further process join the smallest groups.  Locality comes
    before balance: a task reading a shard held by another worker has it copied
    over for every step, which costs more than computing the step's slice of
    several shards, so uneven groups (even a single one, when one process holds
    everything) train faster than even groups that fetch.  Groups come back in
    order of their first shard, each sorted -- the grouping decides where
    gradients are computed, never the result (sums are reassembled in shard
    order)."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    by_owner: dict[Any, list[int]] = {}
    for shard, owner in enumerate(owners):
        by_owner.setdefault(owner, []).append(shard)
    held = sorted(by_owner.values(), key=lambda shards: (-len(shards), shards[0]))
    groups = [list(shards) for shards in held[:n_groups]]
    for shards in held[n_groups:]:
        smallest = min(range(len(groups)), key=lambda i: (len(groups[i]), groups[i][0]))
        groups[smallest] += shards
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def balance_groups(groups: Sequence[list[int]]) -> list[list[int]]:
    """``groups`` (each held by one process, as :func:`local_groups` makes them)
    made more even for tasks that run side by side a whole epoch, whose steps
    last as long as the largest group's: the largest group gives its last shard
    to the smallest while that evens them out and the smallest still holds
    strictly more of its own shards than it was given.  The latter keeps each
    group's task placed next to most of its shards (the scheduler follows the
    bytes), so two groups' tasks never end up queued on one worker.  Groups
    come back sorted, in order of their first shard."""
    own = [len(g) for g in groups]
    out = [sorted(g) for g in groups]
    given = [0] * len(out)
    while len(out) > 1:
        big = max(range(len(out)), key=lambda i: (len(out[i]), -i))
        small = min(range(len(out)), key=lambda i: (len(out[i]), i))
        if len(out[big]) - len(out[small]) < 2 or given[small] + 1 >= own[small]:
            break
        out[small].append(out[big].pop())
        given[small] += 1
    return sorted((sorted(g) for g in out), key=lambda g: g[0])


def pair_groups(owners: Sequence[Any], other_groups: Sequence[list],
                other_owners: Sequence[Any]) -> list[list[int]]:
    """``other_groups`` (e.g. validation shards) matched one to one with groups held
    by ``owners`` (e.g. training shards): same holder first, then in order; groups
    left without a match get ``[]``."""
    if len(other_groups) > len(owners):
        raise ValueError(f"{len(other_groups)} groups cannot pair with {len(owners)}")
    paired: list[list[int] | None] = [None] * len(owners)
    left = list(range(len(other_groups)))
    for i, owner in enumerate(owners):
        match = next((j for j in left if other_owners[j] == owner), None)
        if match is not None:
            paired[i] = other_groups[match]
            left.remove(match)
    for i in range(len(owners)):
        if paired[i] is None:
            paired[i] = other_groups[left.pop(0)] if left else []
    return paired

class Evaluation:
    """The seed's evaluator: called with predictions and labels (numpy arrays, in
    the data's own label values), it returns a number (reported as ``score``) or a
    dict of named numbers, added to each epoch's metrics."""

    def __call__(self, predictions: np.ndarray, labels: np.ndarray) -> float | dict:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(predictions, labels)")


def reference_fit(model: Model, shards: Sequence[tuple], train_config: dict | None = None,
                  classes: Any = None) -> dict:
    """The trainer's algorithm in this process, on ``[(X, y), ...]`` shards: the
    parameters ``Trainer.fit`` computes, bit for bit."""
    config = full_config(train_config)
    optimizer = make_optimizer(config)
    n_features = shards[0][0].shape[1]
    params = model.init_params(n_features, output_count(model, classes),
                               np.random.default_rng(config["seed"]))
    state = optimizer.init_state(params)
    steps = steps_per_epoch(sum(len(s[1]) for s in shards), config["batch_size"])
    for epoch in range(config["epochs"]):
        for step in range(steps):
            groups = shard_gradients(params, model, classes, epoch, step, steps,
                                     config["seed"], 0, *shards)
            params, state = update(params, state, model, optimizer, config["l2"], groups)
    return params


# ---------------------------------------------------------------------- the trainer

_log = logging.getLogger(__name__)


class _Layout:
    """Where a fit's shards are: their groups (see :func:`local_groups`), the
    processes holding them, the validation groups paired with them, and the
    plan every task of the fit shares (put in the store once)."""

    def __init__(self, trainer: "Trainer", train: Dataset, valid: Dataset | None,
                 shared: tuple) -> None:
        self.train, self.shared = train, shared
        self.all_shards = list(train.shards)
        self.groups, self.owners = trainer._groups(train, trainer.scaling.num_workers)
        self.n_groups = len(self.groups)
        self.valid_groups = (pair_groups(self.owners, *trainer._groups(valid, self.n_groups))
                             if valid is not None else [[] for _ in self.groups])
        self.valid_order = [i for g in self.valid_groups for i in g]
        self.valid_shards = [[valid.shards[j] for j in g] for g in self.valid_groups]
        self.steps = shared[4]
        self._set_groups(self.groups)

    def _set_groups(self, groups: list[list[int]]) -> None:
        self.groups = groups
        self.order = [i for g in groups for i in g]
        self.plan = daskray.put((*self.shared, self.order))
        self.shards = [[self.train.shards[j] for j in g] for g in groups]

    def balance(self) -> None:
        """Even the training groups out for tasks that run side by side (see
        :func:`balance_groups`); each keeps its place (and validation shards)."""
        balanced = balance_groups(self.groups)
        if balanced != self.groups:
            self._set_groups(balanced)


class Trainer:
    """``Trainer(model=..., train_config=..., scaling_config=...).fit(train, valid=...)``."""

    def __init__(self, model: Model | type | None = None, train_config: dict | None = None,
                 scaling_config: ScalingConfig | None = None, run_config: RunConfig | None = None,
                 resume_from_checkpoint: Checkpoint | None = None, config: Any = None,
                 param_space: dict | None = None,
                 failure_config: FailureConfig | None = None, evaluator: Any = None) -> None:
        """With ``config`` (a ``TuneConfig``) it searches ``param_space`` instead:
        ``model`` may then be a class, built for each trial from its config."""
        if model is None:
            raise ValueError("Trainer needs a model")
        self.model = model
        self.tune_config = config
        self.param_space = param_space or {}
        self.config = full_config({k: v for k, v in (train_config or {}).items()})
        if config is None and isinstance(model, type):
            raise ValueError("a model class needs a search (config=TuneConfig(...)); "
                             "pass a model instance to train one model")
        self.scaling = scaling_config or ScalingConfig()
        self.run_config = run_config or RunConfig()
        self.resume = resume_from_checkpoint
        self.failure = failure_config or self.run_config.failure_config or FailureConfig()
        self.evaluator = evaluator

    def fit(self, train: Dataset, valid: Dataset | None = None) -> Result:
        """Train; the Result has per-epoch metrics and the final checkpoint.  With a
        search, the best trial's Result, whose ``grid`` holds every trial."""
        import pandas as pd

        if self.tune_config is not None:
            grid = run_search(self.model, self.config, self.param_space, self.tune_config,
                              train, valid, self.evaluator)
            best = grid.get_best_result()
            best.grid = grid
            return best

        model, config = self.model, self.config
        optimizer = make_optimizer(config)
        classes = train.classes if model.task != "regression" else None
        if self.resume is not None:
            params, state, start = self.resume.params, self.resume.opt_state, self.resume.epoch + 1
        else:
            params = model.init_params(train.n_features, output_count(model, classes),
                                       np.random.default_rng(config["seed"]))
            state, start = optimizer.init_state(params), 0
        steps = steps_per_epoch(train.num_rows, config["batch_size"])
        retries = self.failure.max_failures
        judged = self.evaluator is not None
        judge_train, judge_valid = judged and valid is None, judged
        shared = (model, optimizer, config["l2"], classes, steps, config["seed"])
        layout = _Layout(self, train, valid, shared)
        spec, reason = self._mesh_spec(layout)
        if spec is not None:
            layout.balance()
        self.fallback_reason, self.epoch_paths, self.redone = reason, {}, []
        closed = [daskray.put(((params, state), [], []))] * layout.n_groups
        history: list[dict] = []
        pending: deque = deque()  # epochs submitted, metrics not read yet
        final, stopped = (params, state), False
        epoch, failures, attempt = start, 0, 0
        recovering = False  # a worker died: the task graph trains until it is replaced
        while True:
            # keep one epoch computing while the previous one's metrics are read
            while not stopped and epoch < config["epochs"] and len(pending) < 2:
                if recovering and spec is not None and self._workers_back(layout):
                    # the dead workers' replacements are up: the groups follow where
                    # the shards are now, and their tasks can run together again
                    recovering = False
                    layout = _Layout(self, train, valid, shared)
                    spec, self.fallback_reason = self._mesh_spec(layout)
                    if spec is not None:
                        layout.balance()
                    closed = closed if len(closed) == layout.n_groups else [closed[0]] * \
                        layout.n_groups
                use_mesh = spec is not None and layout.n_groups > 1 and not recovering
                closed, submitted = (
                    self._submit_mesh(layout, spec, f"{epoch}-{attempt}", closed, epoch,
                                      judge_train, judge_valid) if use_mesh else
                    self._submit_graph(layout, closed, epoch, retries, judge_train,
                                       judge_valid))
                self.epoch_paths[epoch] = "mesh" if use_mesh else "graph"
                pending.append((epoch, closed, submitted, use_mesh, layout))
                epoch += 1
            if stopped or not pending:
                break
            entry = pending.popleft()
            try:
                stopped = self._record(entry[:3], entry[4].order, entry[4].valid_order,
                                       history)
            except Exception:
                if not entry[3]:
                    raise
                failure = self._mesh_failure(entry[1])  # raises what the model raised
                if failure is None:
                    raise
                for _, _, submitted, _, _ in (entry, *pending):
                    for ref in reversed(submitted):
                        daskray.cancel(ref)
                pending.clear()
                self.redone.append((entry[0], f"{type(failure).__name__}: {failure}"))
                if isinstance(failure, collective.RendezvousTimeout):
                    spec = None
                    self.fallback_reason = (
                        f"the tasks of epoch {entry[0]} did not all run at once ({failure}); "
                        "the task-graph path trains the rest of this fit")
                    _log.warning("Trainer.fit: %s", self.fallback_reason)
                else:
                    failures += 1
                    if failures > retries:
                        raise failure
                    # Workers are being replaced: the task graph trains meanwhile (its
                    # tasks need not run together, and the cluster retries them).
                    recovering = True
                attempt += 1
                epoch = entry[0]
                carry = history[-1]["_carry"] if history else (params, state)
                closed = [daskray.put((carry, [], []))] * layout.n_groups
        for _, _, submitted, _, _ in pending:  # stopped early: later epochs are not wanted
            for ref in reversed(submitted):
                daskray.cancel(ref)
        if history:
            final = history[-1].pop("_carry")
        for row in history:
            row.pop("_carry", None)
        params, state = final
        frame = pd.DataFrame(history)
        last_epoch = history[-1]["epoch"] if history else start - 1
        checkpoint = Checkpoint(params, last_epoch, state, dict(config))
        if self.run_config.storage_path:
            checkpoint.to_directory(self.run_config.storage_path)
        return Result(history[-1] if history else {}, frame, checkpoint, None, [checkpoint],
                      dict(config))

    def _submit_graph(self, layout: "_Layout", closed: list, epoch: int, retries: int,
                      judge_train: bool, judge_valid: bool) -> tuple[list, list]:
        """One epoch as a task graph (a task per group and step; one task in all
        with one group): the refs of its close, and every ref submitted."""
        plan, groups, shards, valid_shards = (layout.plan, layout.groups, layout.shards,
                                              layout.valid_shards)
        if layout.n_groups == 1:  # nothing to exchange between steps: one task per epoch
            closed = [daskray.remote(max_retries=retries)(_epoch_task).remote(
                plan, closed[0], epoch, len(shards[0]), judge_train, judge_valid,
                *shards[0], *valid_shards[0])]
            return closed, list(closed)
        steps = layout.steps
        step_task = daskray.remote(max_retries=retries)(_step_task)
        outputs = [step_task.remote(plan, closed[i], epoch, 0, 1, g, i, *shards[i])
                   for i, g in enumerate(groups)]
        submitted = list(outputs)
        for step in range(1, steps):
            outputs = [step_task.remote(plan, None, epoch, step, step + 1, g, i,
                                        *shards[i], *outputs)
                       for i, g in enumerate(groups)]
            submitted += outputs
        close_task = daskray.remote(max_retries=retries)(_close_task)
        closed = [close_task.remote(plan, i, len(shards[i]), len(valid_shards[i]),
                                    judge_train, judge_valid, *shards[i],
                                    *valid_shards[i], *outputs)
                  for i in range(layout.n_groups)]
        return closed, submitted + closed

    @staticmethod
    def _submit_mesh(layout: "_Layout", spec: tuple, tag: str, closed: list, epoch: int,
                     judge_train: bool, judge_valid: bool) -> tuple[list, list]:
        """One epoch as one task per group, exchanging gradient sums over a mesh
        joined under ``tag``.  Not retried by the cluster: a rank that ran again
        alone would wait for peers that are gone, so the driver redoes the whole
        epoch instead (see :meth:`fit`)."""
        task = daskray.remote(max_retries=0)(_mesh_epoch_task)
        # every training shard's ref, inside a list: not an input the task waits
        # for (nor one that draws it to a worker), read only if it is needed
        everyone = layout.all_shards
        closed = [task.remote(layout.plan, closed[i], epoch, spec, tag, i, g, everyone,
                              len(layout.shards[i]), judge_train, judge_valid,
                              *layout.shards[i], *layout.valid_shards[i])
                  for i, g in enumerate(layout.groups)]
        return closed, list(closed)

    @staticmethod
    def _mesh_spec(layout: "_Layout") -> tuple[tuple | None, str | None]:
        """The mesh the groups' tasks join (see :mod:`daskray.ml.collective`), or
        None and why the task-graph path trains instead."""
        if layout.n_groups < 2:
            return None, None
        if not collective.available():
            return None, "the tasks' direct exchange needs Linux's abstract Unix sockets"
        if not daskray.is_initialized():  # e.g. a fit inside a task
            return None, "Trainer.fit runs outside a driver (in a task)"
        backend = daskray.init(ignore_reinit_error=True).backend
        if backend != "local":
            return None, f"the {backend!r} backend runs the task graph"
        if not all(isinstance(owner, tuple) for owner in layout.owners):
            return None, "where the groups' shards are held is not known"
        if len({owner[:2] for owner in layout.owners}) > 1:
            return None, "the groups' workers are on more than one host"
        if not Trainer._workers_back(layout):
            return None, f"fewer workers than the {layout.n_groups} groups"
        return collective.new_spec(layout.n_groups), None

    @staticmethod
    def _workers_back(layout: "_Layout") -> bool:
        """Whether the cluster has a worker for every group again (after one died)."""
        return daskray.cluster_resources().get("CPU", 0) >= layout.n_groups

    @staticmethod
    def _mesh_failure(closed: list) -> BaseException | None:
        """Why an epoch on the mesh failed, when a redo can mend it: a worker died
        or the tasks did not run together
        (a rank timed out waiting: the ranks not finished yet are cancelled, they
        may be queued behind it).  What a task raised otherwise (the model's own
        error, say) is raised here; None if no task failed."""
        done, waiting = daskray.wait(closed, num_returns=len(closed), timeout=0)
        errors = [_error_of(ref) for ref in done]
        if any(isinstance(e, collective.RendezvousTimeout) for e in errors):
            for ref in waiting:
                daskray.cancel(ref)
            errors += [e for e in map(_error_of, waiting)
                       if not isinstance(e, daskray.TaskCancelledError)]
        else:
            errors += [_error_of(ref) for ref in waiting]
        transient = (daskray.WorkerCrashedError, daskray.ObjectLostError,
                     collective.CollectiveError)
        for error in errors:
            if error is not None and not isinstance(error, transient):
                raise error
        crashed = [e for e in errors if isinstance(e, transient[:2])]
        lost = [e for e in errors if isinstance(e, collective.PeerLost)]
        timeouts = [e for e in errors if isinstance(e, collective.CollectiveError)]
        return (crashed or lost or timeouts or [None])[0]

    @staticmethod
    def _groups(data: Dataset, n_groups: int) -> tuple[list[list[int]], list[Any]]:
        """``data``'s shards in at most ``n_groups`` groups by the worker holding
        them (see :func:`local_groups`), and the process holding most of each."""
        if min(n_groups, data.num_shards) == 1:
            return [list(range(data.num_shards))], [None]
        locate = daskray.remote(_locate)
        owners = daskray.get([locate.remote(s) for s in data.shards])
        groups = local_groups(owners, n_groups)
        return groups, [Counter(owners[i] for i in g).most_common(1)[0][0] for g in groups]

    def _record(self, entry: tuple, order: list, valid_order: list, history: list) -> bool:
        """Add a submitted epoch's metrics to ``history`` (waiting for them), with its
        parameters under ``"_carry"``; whether training should stop there."""
        epoch, closed, _ = entry
        outputs = daskray.get(closed)
        train = in_shard_order(order, [p for out in outputs for p in out[1]])
        valid = in_shard_order(valid_order, [p for out in outputs for p in out[2]])
        row: dict = {"epoch": epoch, "training_iteration": epoch + 1,
                     **summarize(train, "train", self.model.task)}
        if valid:
            row.update(summarize(valid, "valid", self.model.task))
        row["loss"] = row.get("valid_loss", row["train_loss"])
        row.update(apply_evaluator(self.evaluator, valid or train))
        row["_carry"] = outputs[0][0]
        history.append(row)
        return self._should_stop(row)

    def _should_stop(self, row: dict) -> bool:
        for metric, target in (self.run_config.stop or {}).items():
            if metric in ("epochs", "training_iteration"):
                if row["training_iteration"] >= target:
                    return True
                continue
            value = row.get(metric)
            if value is None:
                continue
            if ("acc" in metric and value >= target) or ("acc" not in metric and value <= target):
                return True
        return False
