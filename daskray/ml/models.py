"""Numpy models for ``daskray.ml``: the protocol the trainer relies on, and the built-ins.

The protocol
------------
A model is an object (usually a :class:`Model` subclass) whose parameters live
*outside* it, in a ``dict[str, np.ndarray]`` of float64 arrays.  The model itself
holds only hyperparameters, so it pickles small and the same object can be shipped
to every worker while the parameters travel through the object store::

    class Model:
        task: str   # "regression" | "binary" | "multiclass"
        def init_params(self, n_features, n_outputs, rng) -> dict[str, np.ndarray]
        def forward(self, params, X) -> np.ndarray
            # regression: values (n,) (or (n, k) for k > 1 outputs)
            # binary:     P(y = 1), shape (n,)
            # multiclass: class probabilities, shape (n, k)
        def loss(self, params, X, y) -> float
            # SUM over the rows of X (not the mean); the data term only
        def gradient(self, params, X, y) -> dict[str, np.ndarray]
            # SUM over the rows of d loss / d params; same keys and shapes as params
        def predict(self, params, X) -> np.ndarray
            # regression: values; binary / multiclass: int class labels
        def weight_keys(self) -> tuple[str, ...]
            # the params L2 regularization applies to (weights, not biases)

plus an optional ``loss_and_gradient(params, X, y) -> (float, dict)`` that the
built-ins implement with one forward pass; its results are bit-identical to
calling ``loss`` and ``gradient`` separately.

Why sums: the trainer computes one sum per data shard next to its data, adds the
sums in a fixed tree, and divides by the global batch size once.  Per-shard means
would weight unequal shards wrongly, and dividing early would change the bits.
Regularization (``l2 * w`` for ``w`` in ``weight_keys()``) is added by the trainer
once per step, after that division, which is why ``loss``/``gradient`` hold the
data term only.

Labels: regression takes float targets ``(n,)`` (or ``(n, k)``), binary takes
``y`` in {0, 1}, multiclass takes int labels ``0..k-1`` with ``n_outputs = k``.

Determinism: everything is float64 and uses plain numpy (matmul, pairwise
``sum``), so the same inputs give the same bits in every process.
``init_params`` draws only from the ``rng`` it is given (Glorot-scaled normal
weights, He-scaled for ReLU layers; zero biases).

The seed's minimal style
------------------------
A subclass may define only ``init_params`` and ``forward``.  ``Model`` then
supplies a ``loss`` chosen by ``task`` (squared error for regression,
cross-entropy on ``forward``'s clipped probabilities otherwise) and a
``gradient`` by central finite differences (:func:`numerical_gradient`), with a
``RuntimeWarning`` once per model class because it costs two loss evaluations
per parameter entry.

Built-ins: :class:`LinearRegression`, :class:`LogisticRegression` and
:class:`SoftmaxRegression` (parameters ``w`` ``(n_features, n_outputs)`` and
``b`` ``(n_outputs,)``), and :class:`MLP` with hand-written backprop
(``w0, b0, ..., w{L-1}, b{L-1}``).  ``weight_keys()`` lists the ``w``'s.

``TorchModel`` (a ``torch.nn.Module`` behind this protocol, in
:mod:`daskray.ml.torch_model`) is also reachable here; it is imported on first
use, so importing this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .model_base import (
    TASKS, Model, Params, check_2d, check_sizes, class_labels, column_squeeze,
    numerical_gradient,
)

__all__ = [
    "Params", "TASKS", "Model", "numerical_gradient",
    "LinearRegression", "LogisticRegression", "SoftmaxRegression", "MLP",
]



def __getattr__(name: str) -> Any:
    """``TorchModel`` on first use: torch is imported only when it is asked for."""
    if name == "TorchModel":
        from .torch_model import TorchModel

        return TorchModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Numerics shared by the built-ins
# ---------------------------------------------------------------------------

def _as_matrix(X: np.ndarray) -> np.ndarray:
    """``X`` as a float64 2-D array (no copy when it already is one)."""
    X = np.asarray(X, dtype=np.float64)
    check_2d("X", X)
    return X


def _binary_targets(y: np.ndarray, n: int) -> np.ndarray:
    """``y`` (0/1, or probabilities) as a float64 column ``(n, 1)``."""
    return np.asarray(y, dtype=np.float64).reshape(n, 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow: ``exp`` only ever sees ``-|z|``."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log(1 + e^z)`` without overflow, as ``log1p(exp(-|z|)) + max(z, 0)``: the
    formula of ``np.logaddexp(0, z)``, but numpy's exp and log1p run vectorized,
    several times faster on the rows of a whole shard (the value may differ from
    logaddexp's in the last bit)."""
    out = np.abs(z)
    np.negative(out, out=out)
    np.exp(out, out=out)
    np.log1p(out, out=out)
    out += np.maximum(z, 0.0)
    return out


def _sigmoid_xent_loss(z: np.ndarray, t: np.ndarray) -> float:
    """Binary cross-entropy summed over logits ``z`` (n, 1): ``log(1 + e^z) - t z``,
    finite for any logit."""
    return float(np.sum(_softplus(z) - t * z))


def _sigmoid_xent(z: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """Binary cross-entropy from logits ``z`` (n, 1): ``(sum loss, d loss / d z)``."""
    return _sigmoid_xent_loss(z, t), _sigmoid(z) - t


def _log_softmax(Z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by the row max (log-sum-exp) so exp never overflows."""
    shifted = Z - np.max(Z, axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def _softmax_xent(Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Multiclass cross-entropy from logits ``Z`` (n, k): ``(sum loss, d loss / d Z)``."""
    labels = class_labels(y, Z.shape[1])
    log_p = _log_softmax(Z)
    rows = np.arange(labels.size)
    loss = -float(np.sum(log_p[rows, labels]))
    delta = np.exp(log_p)
    delta[rows, labels] -= 1.0
    return loss, delta


def _affine_gradient(inputs: np.ndarray, delta: np.ndarray, w_key: str,
                     b_key: str) -> Params:
    """Gradient of ``inputs @ w + b`` given ``delta = d loss / d output``, summed over rows."""
    return {w_key: inputs.T @ delta, b_key: np.sum(delta, axis=0)}


def _normal_weights(rng: np.random.Generator, fan_in: int, fan_out: int,
                    scheme: str) -> np.ndarray:
    """A ``(fan_in, fan_out)`` normal matrix scaled by Glorot or He."""
    if scheme == "he":
        std = np.sqrt(2.0 / fan_in)
    else:  # glorot
        std = np.sqrt(2.0 / (fan_in + fan_out))
    return rng.standard_normal((fan_in, fan_out)) * std


# ---------------------------------------------------------------------------
# Linear models: logits = X @ w + b, w (n_features, n_outputs), b (n_outputs,)
# ---------------------------------------------------------------------------

class _LinearModel(Model):
    """Shared parts of the three linear models; subclasses supply the output layer."""

    def init_params(self, n_features: int, n_outputs: int,
                    rng: np.random.Generator) -> Params:
        check_sizes(self, n_features, n_outputs)
        self._check_outputs(n_outputs)
        return {"w": _normal_weights(rng, n_features, n_outputs, "glorot"),
                "b": np.zeros(n_outputs)}

    def _check_outputs(self, n_outputs: int) -> None:
        """Raise if this model cannot have ``n_outputs`` outputs."""

    def _logits(self, params: Params, X: np.ndarray) -> np.ndarray:
        return _as_matrix(X) @ params["w"] + params["b"]

    def _loss_and_delta(self, Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """``(sum loss, d loss / d Z)`` for logits ``Z``."""
        raise NotImplementedError

    def _split(self) -> bool:
        """Whether this is a built-in linear class itself (not a subclass that may
        override its loss): then the loss and its derivative are computed apart
        when only one is wanted, each by the very operations of
        ``_loss_and_delta`` (so the same bits), without paying for the other."""
        return type(self) in _SPLIT_LOSS

    def _loss_only(self, Z: np.ndarray, y: np.ndarray) -> float:
        return self._loss_and_delta(Z, y)[0]

    def _delta_only(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._loss_and_delta(Z, y)[1]

    def _predict_logits(self, Z: np.ndarray) -> np.ndarray:
        """``predict``'s result from the logits."""
        raise NotImplementedError

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        Z = self._logits(params, X)
        return self._loss_only(Z, y) if self._split() else self._loss_and_delta(Z, y)[0]

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray) -> Params:
        if not self._split():
            return self.loss_and_gradient(params, X, y)[1]
        X = _as_matrix(X)
        return _affine_gradient(X, self._delta_only(self._logits(params, X), y), "w", "b")

    def loss_and_predict(self, params: Params, X: np.ndarray,
                         y: np.ndarray) -> tuple[float, np.ndarray]:
        """``(loss(params, X, y), predict(params, X))`` from one matmul over ``X``
        (an evaluation needs both)."""
        if not self._split():
            return self.loss(params, X, y), self.predict(params, X)
        Z = self._logits(params, X)
        return self._loss_only(Z, y), self._predict_logits(Z)

    def loss_and_gradient(self, params: Params, X: np.ndarray,
                          y: np.ndarray) -> tuple[float, Params]:
        X = _as_matrix(X)
        loss, delta = self._loss_and_delta(self._logits(params, X), y)
        return loss, _affine_gradient(X, delta, "w", "b")

    def weight_keys(self) -> tuple[str, ...]:
        return ("w",)


class LinearRegression(_LinearModel):
    """Least squares: ``loss = sum 0.5 * (X w + b - y)^2``.

    One output gives predictions of shape ``(n,)``; ``n_outputs = k`` fits ``k``
    targets at once (``y`` and predictions ``(n, k)``).
    """

    task = "regression"

    def _loss_and_delta(self, Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        residual = Z - np.asarray(y, dtype=np.float64).reshape(Z.shape)
        return 0.5 * float(np.sum(residual * residual)), residual

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        return column_squeeze(self._logits(params, X))

    def _delta_only(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return Z - np.asarray(y, dtype=np.float64).reshape(Z.shape)

    def _predict_logits(self, Z: np.ndarray) -> np.ndarray:
        return column_squeeze(Z)

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        return self.forward(params, X)


class LogisticRegression(_LinearModel):
    """Binary logistic regression: ``P(y=1) = sigmoid(X w + b)``, cross-entropy loss.

    ``y`` in {0, 1}; one output.  The loss is computed from logits as
    ``log1p(exp(-|z|)) + max(z, 0) - y z``, so it stays finite however large the
    logits are.
    """

    task = "binary"

    def _check_outputs(self, n_outputs: int) -> None:
        if n_outputs != 1:
            raise ValueError(f"LogisticRegression has one output, P(y=1); got n_outputs="
                             f"{n_outputs}. Use SoftmaxRegression for k classes.")

    def _loss_and_delta(self, Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return _sigmoid_xent(Z, _binary_targets(y, Z.shape[0]))

    def _loss_only(self, Z: np.ndarray, y: np.ndarray) -> float:
        return _sigmoid_xent_loss(Z, _binary_targets(y, Z.shape[0]))

    def _delta_only(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _sigmoid(Z) - _binary_targets(y, Z.shape[0])  # as _sigmoid_xent

    def _predict_logits(self, Z: np.ndarray) -> np.ndarray:
        return (Z[:, 0] > 0).astype(np.int64)

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        return _sigmoid(self._logits(params, X))[:, 0]

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        return self._predict_logits(self._logits(params, X))


class SoftmaxRegression(_LinearModel):
    """Multinomial logistic regression over ``k = n_outputs`` classes, cross-entropy loss.

    ``y`` holds int labels ``0..k-1``; ``forward`` gives probabilities ``(n, k)``.
    """

    task = "multiclass"

    def _check_outputs(self, n_outputs: int) -> None:
        if n_outputs < 2:
            raise ValueError(f"SoftmaxRegression needs n_outputs = number of classes >= 2, "
                             f"got {n_outputs}")

    def _loss_and_delta(self, Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return _softmax_xent(Z, y)

    def _loss_only(self, Z: np.ndarray, y: np.ndarray) -> float:
        labels = class_labels(y, Z.shape[1])  # as _softmax_xent
        return -float(np.sum(_log_softmax(Z)[np.arange(labels.size), labels]))

    def _delta_only(self, Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        labels = class_labels(y, Z.shape[1])  # as _softmax_xent
        delta = np.exp(_log_softmax(Z))
        delta[np.arange(labels.size), labels] -= 1.0
        return delta

    def _predict_logits(self, Z: np.ndarray) -> np.ndarray:
        return np.argmax(Z, axis=1).astype(np.int64)

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        return np.exp(_log_softmax(self._logits(params, X)))

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        return self._predict_logits(self._logits(params, X))


#: the linear classes whose loss and its derivative may be computed apart (see
#: ``_LinearModel._split``); a subclass always goes through ``_loss_and_delta``
_SPLIT_LOSS = frozenset({LinearRegression, LogisticRegression, SoftmaxRegression})


# ---------------------------------------------------------------------------
# MLP: hidden layers w0/b0 .. w{L-2}/b{L-2}, output layer w{L-1}/b{L-1}
# ---------------------------------------------------------------------------

_ACTIVATIONS = ("relu", "tanh")


class MLP(Model):
    """A multilayer perceptron with hand-written backprop.

    ``hidden`` gives the hidden layer widths, ``activation`` is ``"relu"`` or
    ``"tanh"``.  The output layer follows ``n_outputs``: ``k >= 2`` units with a
    softmax (multiclass, int labels ``0..k-1``), or one unit with a sigmoid
    (binary, ``y`` in {0, 1}).  ``task`` tells the trainer which one to ask for
    (``"binary"`` requires ``n_outputs == 1``).

    Parameters are ``w0, b0, ..., w{L-1}, b{L-1}`` with ``L = len(hidden) + 1``;
    ``w{i}`` has shape ``(fan_in, fan_out)``.  Hidden ReLU layers use He
    initialization, everything else Glorot; biases start at zero.
    """

    def __init__(self, hidden: int | Sequence[int] = (64,), activation: str = "relu",
                 task: str = "multiclass") -> None:
        widths = (hidden,) if isinstance(hidden, (int, np.integer)) else tuple(hidden)
        if not all(isinstance(w, (int, np.integer)) and w >= 1 for w in widths):
            raise ValueError(f"hidden must be positive ints (layer widths), got {hidden!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if task not in ("multiclass", "binary"):
            raise ValueError(f"MLP task must be 'multiclass' or 'binary', got {task!r}")
        self.hidden = tuple(int(w) for w in widths)
        self.activation = activation
        self.task = task

    def __repr__(self) -> str:
        return (f"MLP(hidden={self.hidden!r}, activation={self.activation!r}, "
                f"task={self.task!r})")

    @property
    def n_layers(self) -> int:
        """Number of affine layers (hidden layers + the output layer)."""
        return len(self.hidden) + 1

    def init_params(self, n_features: int, n_outputs: int,
                    rng: np.random.Generator) -> Params:
        check_sizes(self, n_features, n_outputs)
        if self.task == "binary" and n_outputs != 1:
            raise ValueError(f"a binary MLP has one sigmoid output; got n_outputs={n_outputs}")
        sizes = (int(n_features), *self.hidden, int(n_outputs))
        params: Params = {}
        for i in range(self.n_layers):
            hidden_relu = self.activation == "relu" and i < self.n_layers - 1
            params[f"w{i}"] = _normal_weights(rng, sizes[i], sizes[i + 1],
                                              "he" if hidden_relu else "glorot")
            params[f"b{i}"] = np.zeros(sizes[i + 1])
        return params

    def weight_keys(self) -> tuple[str, ...]:
        return tuple(f"w{i}" for i in range(self.n_layers))

    def _activate(self, Z: np.ndarray) -> np.ndarray:
        return np.maximum(Z, 0.0) if self.activation == "relu" else np.tanh(Z)

    def _activation_slope(self, Z: np.ndarray, A: np.ndarray) -> np.ndarray:
        """d activation / d Z, from the pre-activation ``Z`` and the activation ``A``."""
        return (Z > 0).astype(np.float64) if self.activation == "relu" else 1.0 - A * A

    def _forward_pass(self, params: Params,
                      X: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """``(layer inputs, hidden pre-activations, output logits)`` for backprop."""
        inputs, pre = [_as_matrix(X)], []
        for i in range(self.n_layers - 1):
            Z = inputs[-1] @ params[f"w{i}"] + params[f"b{i}"]
            pre.append(Z)
            inputs.append(self._activate(Z))
        last = self.n_layers - 1
        logits = inputs[-1] @ params[f"w{last}"] + params[f"b{last}"]
        return inputs, pre, logits

    @staticmethod
    def _head_loss_and_delta(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Output-layer loss and ``d loss / d logits``: sigmoid for one unit, softmax for more."""
        if logits.shape[1] == 1:
            return _sigmoid_xent(logits, _binary_targets(y, logits.shape[0]))
        return _softmax_xent(logits, y)

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        logits = self._forward_pass(params, X)[2]
        if logits.shape[1] == 1:
            return _sigmoid(logits)[:, 0]
        return np.exp(_log_softmax(logits))

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        logits = self._forward_pass(params, X)[2]
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).astype(np.int64)
        return np.argmax(logits, axis=1).astype(np.int64)

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        return self._head_loss_and_delta(self._forward_pass(params, X)[2], y)[0]

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray) -> Params:
        return self.loss_and_gradient(params, X, y)[1]

    def loss_and_gradient(self, params: Params, X: np.ndarray,
                          y: np.ndarray) -> tuple[float, Params]:
        inputs, pre, logits = self._forward_pass(params, X)
        loss, delta = self._head_loss_and_delta(logits, y)
        grads: Params = {}
        for i in reversed(range(self.n_layers)):
            grads.update(_affine_gradient(inputs[i], delta, f"w{i}", f"b{i}"))
            if i > 0:  # push delta through w{i} and the activation of layer i-1
                delta = (delta @ params[f"w{i}"].T) * self._activation_slope(pre[i - 1],
                                                                              inputs[i])
        ordered = {}
        for i in range(self.n_layers):  # same key order as the parameters
            ordered[f"w{i}"], ordered[f"b{i}"] = grads[f"w{i}"], grads[f"b{i}"]
        return loss, ordered
