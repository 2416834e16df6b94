"""What a training run hands back: :class:`Checkpoint` and :class:`Result`.

Shared by the Trainer, the search and the Tuner.  Users keep checkpoints (pickled,
or with ``to_directory``); ones pickled before this module existed name
``daskray.ml.trainer.Checkpoint``, which stays importable for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Checkpoint", "Result"]


@dataclass
class Checkpoint:
    """Parameters (and the optimizer state) after some epoch."""

    params: dict
    epoch: int
    opt_state: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_directory(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        np.savez(os.path.join(path, "params.npz"), **self.params)
        np.savez(os.path.join(path, "opt_state.npz"), **_flatten_state(self.opt_state))
        with open(os.path.join(path, "checkpoint.json"), "w") as f:
            json.dump({"epoch": self.epoch, "config": self.config}, f, default=str)
        return path

    @classmethod
    def from_directory(cls, path: str) -> "Checkpoint":
        with np.load(os.path.join(path, "params.npz")) as data:
            params = {k: data[k] for k in data.files}
        with np.load(os.path.join(path, "opt_state.npz")) as data:
            state = _unflatten_state({k: data[k] for k in data.files})
        with open(os.path.join(path, "checkpoint.json")) as f:
            meta = json.load(f)
        return cls(params, meta["epoch"], state, meta.get("config", {}))


@dataclass
class Result:
    """What a training run (or a trial) ended with: its last metrics, every
    epoch's metrics as a DataFrame, its checkpoint, and its error if it failed."""

    metrics: dict
    metrics_dataframe: Any
    checkpoint: Checkpoint | None
    error: BaseException | None = None
    best_checkpoints: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    #: for a search: every trial (a ResultGrid)
    grid: Any = None


def _flatten_state(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_state(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def _unflatten_state(flat: dict) -> dict:
    state: dict = {}
    for name, value in flat.items():
        parts = name.split("/")
        node = state
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value if value.shape else value.item()
    return state
