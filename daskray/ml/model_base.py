"""The model protocol's base class and the checks every model shares (numpy or torch).

:class:`Model` gives a subclass defaults for everything but ``init_params`` and
``forward`` (see :mod:`daskray.ml.models` for the protocol).  It lives apart from
the built-in models so that :mod:`daskray.ml.torch_model` can build on it while
``daskray.ml.models`` loads ``TorchModel`` on first use: one direction of imports.
``daskray.ml.models`` re-exports everything public here.
"""

from __future__ import annotations

import warnings
import weakref

import numpy as np

__all__ = [
    "Params", "TASKS", "Model", "numerical_gradient", "check_2d", "column_squeeze",
    "class_labels", "check_sizes",
]

#: parameters (and gradients): name -> float64 array
Params = dict[str, np.ndarray]

TASKS = ("regression", "binary", "multiclass")

#: probabilities are clipped to [_PROB_CLIP, 1 - _PROB_CLIP] before log in the
#: default cross-entropy, so a confident wrong prediction costs ~27.6, not inf
_PROB_CLIP = 1e-12

#: model classes that have already warned about finite-difference gradients
_WARNED_CLASSES: "weakref.WeakSet[type]" = weakref.WeakSet()


# ---------------------------------------------------------------------------
# The base class: defaults for the seed's minimal style
# ---------------------------------------------------------------------------

class Model:
    """Base class of daskray.ml models; parameters are a ``dict[str, np.ndarray]`` (float64).

    Subclasses set ``task`` and define at least ``init_params`` and ``forward``.
    Everything else has a default: ``loss`` by task, ``gradient`` by finite
    differences (slow, warns), ``predict`` by task, no L2-regularized weights.
    See the module docstring for the full protocol.
    """

    task: str = "regression"

    def __init_subclass__(cls, **kwargs: object) -> None:
        """The seed's spelling: a subclass whose ``__init__`` makes its numpy
        parameters as attributes and whose ``forward(self, X)`` reads them is
        adapted to the protocol (parameters passed in, not kept)."""
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and _positional_count(forward) == 2:
            cls.forward = _with_params(forward)

    def init_params(self, n_features: int, n_outputs: int,
                    rng: np.random.Generator) -> Params:
        """Fresh parameters for ``n_features`` inputs and ``n_outputs`` outputs, from ``rng``.

        By default: copies of the numpy arrays the model's ``__init__`` made."""
        own = {k: np.array(v, dtype=np.float64) for k, v in vars(self).items()
               if isinstance(v, np.ndarray)}
        if own:
            return own
        raise NotImplementedError(
            f"{type(self).__name__} does not define init_params(self, n_features, n_outputs, rng); "
            "the trainer calls it to create the parameters. Return a dict of float64 numpy "
            "arrays drawn from `rng` (a numpy Generator) so that runs are reproducible.")

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Predictions for the rows of ``X``: values, P(y=1) or class probabilities, by ``task``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define forward(self, params, X)")

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        """Sum over rows of the task's loss on ``forward``'s output (data term only)."""
        return _loss_from_output(self.task, self.forward(params, X), y)

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray) -> Params:
        """Sum over rows of d loss / d params; by default central finite differences (slow)."""
        _warn_finite_differences(type(self))
        return numerical_gradient(self, params, X, y)

    def loss_and_gradient(self, params: Params, X: np.ndarray,
                          y: np.ndarray) -> tuple[float, Params]:
        """``(loss, gradient)`` together; built-ins share one forward pass."""
        return self.loss(params, X, y), self.gradient(params, X, y)

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Values (regression) or int class labels (binary, multiclass) for the rows of ``X``."""
        return _predict_from_output(self.task, self.forward(params, X))

    def weight_keys(self) -> tuple[str, ...]:
        """Parameters L2 regularization applies to; none by default."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _positional_count(func: object) -> int:
    import inspect

    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(1 for p in parameters
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _with_params(forward: object) -> object:
    """``forward(self, X)`` reading attributes -> ``forward(self, params, X)``."""

    def adapted(self: Model, params: Params, X: np.ndarray) -> np.ndarray:
        saved = {k: getattr(self, k) for k in params if hasattr(self, k)}
        try:
            for k, v in params.items():
                setattr(self, k, v)
            return forward(self, X)
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    adapted.__name__ = getattr(forward, "__name__", "forward")
    adapted.__doc__ = getattr(forward, "__doc__", None)
    return adapted


def numerical_gradient(model: Model, params: Params, X: np.ndarray, y: np.ndarray,
                       eps: float = 1e-6) -> Params:
    """Central-difference gradient of ``model.loss`` over every entry of every parameter.

    ``(loss(p + eps) - loss(p - eps)) / (2 eps)`` per entry: two loss evaluations
    per parameter entry, so only for small models and for checking hand-written
    gradients.  ``params`` is not modified (the work is done on float64 copies).
    """
    work = {key: np.array(value, dtype=np.float64, copy=True) for key, value in params.items()}
    return {key: _central_differences(model, work, key, X, y, eps) for key in work}


def _central_differences(model: Model, work: Params, key: str, X: np.ndarray,
                         y: np.ndarray, eps: float) -> np.ndarray:
    """Finite-difference gradient for ``work[key]``, perturbing it in place and restoring it."""
    flat = work[key].reshape(-1)  # a view: work[key] is a fresh contiguous copy
    grad = np.empty(flat.size, dtype=np.float64)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        up = model.loss(work, X, y)
        flat[i] = original - eps
        down = model.loss(work, X, y)
        flat[i] = original
        grad[i] = (up - down) / (2.0 * eps)
    return grad.reshape(work[key].shape)


def _warn_finite_differences(cls: type) -> None:
    """Warn, once per model class, that its gradient comes from finite differences."""
    if cls in _WARNED_CLASSES:
        return
    _WARNED_CLASSES.add(cls)
    warnings.warn(
        f"{cls.__name__} defines no gradient(); daskray.ml falls back to central finite "
        "differences (two loss evaluations per parameter entry), which is slow beyond a few "
        "hundred parameters. Define gradient(params, X, y) returning the sum over rows of "
        "d loss / d params to train faster.",
        RuntimeWarning, stacklevel=3)


def _loss_from_output(task: str, output: np.ndarray, y: np.ndarray) -> float:
    """The default data loss (a sum over rows) of a model's ``forward`` output."""
    output = np.asarray(output, dtype=np.float64)
    if task == "regression":
        values = column_squeeze(output)
        residual = values - np.asarray(y, dtype=np.float64).reshape(values.shape)
        return 0.5 * float(np.sum(residual * residual))
    if task == "binary":
        p = np.clip(output.reshape(-1), _PROB_CLIP, 1.0 - _PROB_CLIP)
        t = np.asarray(y, dtype=np.float64).reshape(-1)
        return -float(np.sum(t * np.log(p) + (1.0 - t) * np.log1p(-p)))
    if task == "multiclass":
        check_2d("forward's output for a multiclass model", output)
        labels = class_labels(y, output.shape[1])
        p = np.clip(output[np.arange(labels.size), labels], _PROB_CLIP, 1.0)
        return -float(np.sum(np.log(p)))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _predict_from_output(task: str, output: np.ndarray) -> np.ndarray:
    """Values or int labels from a model's ``forward`` output, by task."""
    output = np.asarray(output)
    if task == "regression":
        return column_squeeze(output)
    if task == "binary":
        return (output.reshape(-1) > 0.5).astype(np.int64)
    if task == "multiclass":
        return np.argmax(output, axis=1).astype(np.int64)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ---------------------------------------------------------------------------
# Checks and reshaping shared by every model
# ---------------------------------------------------------------------------

def check_2d(what: str, a: np.ndarray) -> None:
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, columns), got shape {a.shape}")


def column_squeeze(a: np.ndarray) -> np.ndarray:
    """``(n, 1) -> (n,)``; anything else unchanged."""
    return a[:, 0] if a.ndim == 2 and a.shape[1] == 1 else a


def class_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``y`` as int labels in ``0..n_classes-1``, or a ValueError saying what is wrong."""
    y = np.asarray(y).reshape(-1)
    labels = y.astype(np.intp)
    if not np.array_equal(labels, y):
        raise ValueError("multiclass labels must be integers 0..k-1")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"multiclass labels must lie in 0..{n_classes - 1} "
                         f"(n_outputs={n_classes}); got {labels.min()}..{labels.max()}")
    return labels


def check_sizes(model: Model, n_features: int, n_outputs: int) -> None:
    if int(n_features) < 1 or int(n_outputs) < 1:
        raise ValueError(f"{type(model).__name__}.init_params needs n_features >= 1 and "
                         f"n_outputs >= 1, got {n_features} and {n_outputs}")
