"""Optimizers for ``daskray.ml``: pure update rules over parameter dicts.

An optimizer object holds hyperparameters only (a frozen dataclass, so it pickles
small and compares by value).  Its running state lives in a plain dict that the
trainer keeps next to the parameters — in the update task of each step and in
checkpoints::

    state = opt.init_state(params)
    params, state = opt.step(params, grads, state)

Rules:

- ``grads`` is already the *mean* gradient including regularization: the trainer
  divides the tree-reduced gradient sum by the global batch rows and adds
  ``l2 * W`` before calling ``step``.  Optimizers know nothing about batches.
- ``step`` is pure: it never mutates ``params``, ``grads`` or ``state``; it
  returns new dicts of new arrays.  A step can therefore be retried exactly.
- Elementwise numpy only, in a fixed formula order: the same inputs give the
  same bits in every process.

State layouts (plain dicts of numpy arrays and ints, picklable):

- ``SGD`` without momentum: ``{}``
- ``SGD`` with momentum:    ``{"velocity": {key: array}}``
- ``Adam``:                 ``{"t": int, "m": {key: array}, "v": {key: array}}``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Optimizer", "SGD", "Adam", "get_optimizer", "OPTIMIZERS"]

Params = dict[str, np.ndarray]
State = dict[str, Any]

#: names accepted by get_optimizer
OPTIMIZERS = ("sgd", "momentum", "adam")


class Optimizer:
    """Base class: ``init_state(params)`` and a pure ``step(params, grads, state)``."""

    lr: float

    def init_state(self, params: Params) -> State:
        """The state before the first step, for parameters shaped like ``params``."""
        raise NotImplementedError

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """One update: ``(new_params, new_state)``; inputs are left untouched."""
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent, optionally with (heavy-ball) momentum.

    Without momentum: ``p <- p - lr * g``.  With momentum ``mu`` (PyTorch's form,
    velocity starting at zero): ``v <- mu * v + g``, ``p <- p - lr * v``.
    """

    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def init_state(self, params: Params) -> State:
        if self.momentum == 0.0:
            return {}
        return {"velocity": _zeros_like(params)}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        _check_same_keys(params, grads)
        if self.momentum == 0.0:
            return {k: params[k] - self.lr * grads[k] for k in params}, {}
        velocity = {k: self.momentum * state["velocity"][k] + grads[k] for k in params}
        new_params = {k: params[k] - self.lr * velocity[k] for k in params}
        return new_params, {"velocity": velocity}


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias-corrected moments.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, then with step count ``t``:
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)`` where ``m_hat = m / (1 - b1^t)``
    and ``v_hat = v / (1 - b2^t)``.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        _check_positive("eps", self.eps)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def init_state(self, params: Params) -> State:
        return {"t": 0, "m": _zeros_like(params), "v": _zeros_like(params)}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        _check_same_keys(params, grads)
        t = int(state["t"]) + 1
        b1, b2 = self.beta1, self.beta2
        m = {k: b1 * state["m"][k] + (1.0 - b1) * grads[k] for k in params}
        v = {k: b2 * state["v"][k] + (1.0 - b2) * (grads[k] * grads[k]) for k in params}
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        new_params = {k: params[k] - self.lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + self.eps)
                      for k in params}
        return new_params, {"t": t, "m": m, "v": v}


def get_optimizer(name: str, lr: float, **kw: Any) -> Optimizer:
    """Build an optimizer by name: ``"sgd"``, ``"momentum"`` (SGD, momentum 0.9 unless
    given) or ``"adam"``; ``kw`` are the optimizer's other hyperparameters."""
    key = name.lower() if isinstance(name, str) else None
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if key == "momentum":
        kw = {"momentum": 0.9, **kw}
    factory = Adam if key == "adam" else SGD
    try:
        return factory(lr, **kw)
    except TypeError as exc:  # an unknown keyword: say which ones exist
        fields = [f for f in factory.__dataclass_fields__ if f != "lr"]
        raise TypeError(f"{name!r} optimizer got unexpected options {sorted(kw)}; "
                        f"it accepts {fields}") from exc


def _zeros_like(params: Params) -> Params:
    return {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_same_keys(params: Params, grads: Params) -> None:
    if params.keys() != grads.keys():
        raise KeyError(f"gradient keys {sorted(grads)} do not match parameter keys "
                       f"{sorted(params)}")
