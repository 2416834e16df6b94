"""A ``torch.nn.Module`` behind daskray.ml's numpy model protocol.

:class:`TorchModel` lets the trainer (per-shard gradient sums, a fixed pairwise
tree, one update) train a PyTorch network.  The trainer never sees torch: the
parameters are a ``dict[str, np.ndarray]`` named by ``module.named_parameters()``
(``"0.weight"``, ``"0.bias"``, ...), and every call runs the module functionally
(``torch.func.functional_call``) on tensors made from those arrays, with the
gradient from autograd.  The module object itself only supplies the structure
(and any buffers); its own parameter tensors are never trained in place.

Numerics, and why:

- **float64.**  The module is converted to float64 and every input becomes a
  float64 tensor, so parameters round-trip between numpy and torch without
  rounding and the gradient sums have the precision of the numpy built-ins.
  Training with one worker, two workers or :func:`~daskray.ml.reference_fit`
  then gives bit-identical parameters, as for the numpy models.
- **One intra-op thread.**  Torch's default thread pool is slow on small
  batches when workers share few cores, and the thread count changes how torch
  splits reductions (so the bits).  In a daskray worker the adapter sets
  ``torch.set_num_threads(1)`` for the process the first time it computes; in
  any other process (the driver: ``reference_fit``, local mode) it uses one
  thread for its own calls and restores the caller's setting afterwards.
- **Copies into torch memory.**  Inputs are copied into torch-allocated
  (64-byte aligned) tensors, so the BLAS kernels see the same alignment whether
  an array came from shared memory, a pickle or a fresh numpy allocation.
- **Sums.**  The loss is the SUM over rows (``reduction="sum"``); the trainer
  divides by the global batch once.  Defaults by ``task``: cross-entropy on
  logits for ``"multiclass"`` (``(n, k)`` outputs, int labels ``0..k-1``),
  binary cross-entropy on logits for ``"binary"`` (one output, ``y`` in {0, 1}),
  and half the squared error for ``"regression"`` -- ``0.5 * sum((out - y)^2)``,
  the convention of :class:`~daskray.ml.models.LinearRegression` and of
  :class:`~daskray.ml.models.Model`'s default loss, so a learning rate means the
  same for both.
- **Eval mode.**  Every row's loss must depend only on that row and the
  parameters (that is what makes per-shard sums add up), so the module always
  runs in eval mode (dropout off) and batch-normalization layers, whose
  training-mode output mixes rows, are refused.

Initialization: with a factory (a module class, or a zero-argument callable),
``init_params`` builds a fresh module with torch's RNG seeded from the ``rng``
it is given -- the module's own initialization, deterministic per seed, and the
caller's global torch RNG untouched.  With a module instance, ``init_params``
returns copies of its current parameters (whatever the seed: pass a factory for
trials that should start differently).

Importing this module imports torch; ``daskray.ml.models.TorchModel`` imports it
only on first use, so ``import daskray.ml`` never needs torch.
"""

from __future__ import annotations

import copy
import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "daskray.ml.TorchModel needs PyTorch. Install the CPU build with "
        "`pip install torch==2.13.0` (or the `torch` extra: `pip install 'daskray[torch]'`)."
    ) from error

import daskray

from .model_base import TASKS, Model, Params, check_2d, check_sizes, class_labels

__all__ = ["TorchModel"]

#: the dtype of every tensor the adapter makes (see the module docstring)
DTYPE = torch.float64

#: the seed of the structure-only module a factory builds for computing (its
#: parameter values are never used, but any buffers must be the same everywhere)
_TEMPLATE_SEED = 0

#: relative tolerance of the one-off check that a custom loss is a sum over rows
_SUM_CHECK_RTOL = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _in_daskray_worker() -> bool:
    """Whether this process is a worker of a daskray cluster: only there does the
    runtime context name a worker (outside any cluster it cannot be asked)."""
    try:
        return daskray.get_runtime_context().get_worker_id() is not None
    except daskray.ClusterError:  # neither a driver after init() nor a worker
        return False


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread (see the module docstring).

    In a daskray worker the setting is made once and kept for the process; in
    any other process it is restored on exit.
    """
    if _in_daskray_worker():
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        yield
        return
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensor(a: Any) -> torch.Tensor:
    """A float64 copy of ``a`` in torch-allocated memory."""
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=DTYPE)


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


class TorchModel(Model):
    """A PyTorch network as a daskray.ml model: numpy parameters, autograd gradients.

    ``module`` is one of

    - a ``torch.nn.Module`` instance (it is copied; the copy is converted to float64),
    - a ``torch.nn.Module`` subclass, built as ``module(**module_kwargs)``,
    - a callable returning a module, called as ``module(**module_kwargs)``.

    A factory must build the same structure on every call: each worker process
    builds its own copy from it (so the model pickles small), and
    ``init_params`` builds a seeded one.  The module maps float64 rows
    ``(n, n_features)`` to *logits* for classification -- ``(n, k)`` for
    ``task="multiclass"``, ``(n, 1)`` or ``(n,)`` for ``"binary"`` -- or to
    values ``(n,)`` / ``(n, k)`` for ``"regression"``; ``forward`` applies the
    softmax or sigmoid itself.

    ``loss`` is ``None`` for the task's default (module docstring), or a callable
    ``loss(output, target) -> scalar tensor`` that is the SUM over rows, e.g.
    ``torch.nn.CrossEntropyLoss(reduction="sum")``.  Its ``target`` is an int64
    label tensor ``(n,)`` for multiclass, else a float64 tensor shaped like
    ``output``.  A loss module whose ``reduction`` is not ``"sum"`` is refused,
    and the first loss each copy of the model computes (the driver's, every
    worker's) is checked to add up over rows: the loss is evaluated again on the
    two halves of the batch's outputs, which costs no extra pass of the network.

    Parameters are named by ``module.named_parameters()``; ``weight_keys()``
    (the parameters the trainer's ``l2`` applies to) are those with two or more
    dimensions -- weight matrices and kernels, not biases or scales.
    """

    def __init__(self, module: "torch.nn.Module | type | Callable[..., torch.nn.Module]",
                 loss: LossFn | None = None, *, task: str = "multiclass",
                 module_kwargs: dict[str, Any] | None = None) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if module_kwargs is not None and not isinstance(module_kwargs, dict):
            raise TypeError(f"module_kwargs must be a dict, got {type(module_kwargs).__name__}")
        self.task = task
        self.loss_fn = _checked_loss(loss)
        self.module_kwargs = dict(module_kwargs or {})
        if isinstance(module, torch.nn.Module):
            if self.module_kwargs:
                raise ValueError("module_kwargs are for a module class or factory; "
                                 "got a module instance, which is already built")
            self.factory: Callable[..., torch.nn.Module] | None = None
            self._template = _prepared(copy.deepcopy(module), "the module")
        elif callable(module):
            self.factory = module
            self._template = self._build(_TEMPLATE_SEED)
        else:
            raise TypeError("TorchModel needs a torch.nn.Module instance, a Module subclass or "
                            f"a callable that returns a Module; got {type(module).__name__}")
        self._shapes = {name: tuple(p.shape) for name, p in self._template.named_parameters()}
        self._local = threading.local()
        self._loss_checked = False

    # ------------------------------------------------------------------ plumbing

    def _build(self, seed: int) -> torch.nn.Module:
        """A module from the factory, with torch's RNG seeded by ``seed`` (and then
        restored, so the caller's global torch RNG does not move)."""
        assert self.factory is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.factory(**self.module_kwargs)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"the module factory {_describe(self.factory)} returned "
                            f"{type(module).__name__}, not a torch.nn.Module")
        return _prepared(module, f"the module built by {_describe(self.factory)}")

    def _module(self) -> torch.nn.Module:
        """This thread's copy of the module (``functional_call`` swaps a module's
        parameters while it runs, so threads must not share one)."""
        module = getattr(self._local, "module", None)
        if module is None:
            if getattr(self, "_template", None) is None:  # unpickled from a factory
                self._template = self._build(_TEMPLATE_SEED)
            module = self._local.module = copy.deepcopy(self._template)
        return module

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]
        state["_loss_checked"] = False
        if self.factory is not None:  # each process rebuilds it: pickles small
            state["_template"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        source = (f"factory={_describe(self.factory)}" if self.factory is not None
                  else f"module={type(self._template).__name__}")
        kwargs = f", module_kwargs={self.module_kwargs!r}" if self.module_kwargs else ""
        loss = f", loss={self.loss_fn!r}" if self.loss_fn is not None else ""
        return f"TorchModel({source}{kwargs}{loss}, task={self.task!r})"

    def _parameters(self, params: Params, requires_grad: bool) -> dict[str, torch.Tensor]:
        """``params`` as float64 tensors, after checking they fit the module."""
        if set(params) != set(self._shapes):
            missing = sorted(set(self._shapes) - set(params))
            extra = sorted(set(params) - set(self._shapes))
            raise ValueError(f"parameters do not match the module's named_parameters(): "
                             f"missing {missing}, unexpected {extra}")
        tensors = {}
        for name, shape in self._shapes.items():
            value = np.asarray(params[name])
            if value.shape != shape:
                raise ValueError(f"parameter {name!r} has shape {value.shape}; "
                                 f"the module's is {shape}")
            tensors[name] = _tensor(value).requires_grad_(requires_grad)
        return tensors

    def _output(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                X: np.ndarray) -> torch.Tensor:
        """The module's output for the rows of ``X``, checked against the task."""
        X = np.asarray(X, dtype=np.float64)
        check_2d("X", X)
        out = functional_call(module, tensors, (_tensor(X),))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the module returned {type(out).__name__}; daskray.ml needs one "
                            "tensor of logits (classification) or values (regression)")
        n = X.shape[0]
        if self.task == "multiclass":
            ok = out.ndim == 2 and out.shape[0] == n and out.shape[1] >= 2
            need = "(n, k) logits with k >= 2 classes"
        elif self.task == "binary":
            ok = tuple(out.shape) in ((n,), (n, 1))
            need = "(n, 1) or (n,) logits"
        else:
            ok = out.ndim in (1, 2) and out.shape[0] == n
            need = "(n,) or (n, k) values"
        if not ok:
            raise ValueError(f"the module's output for {n} rows has shape {tuple(out.shape)}; "
                             f"a {self.task} TorchModel needs {need}")
        return out

    def _target(self, y: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """``y`` as the loss's target: int64 labels, or floats shaped like ``out``."""
        if self.task == "multiclass":
            return torch.from_numpy(class_labels(y, out.shape[1]).astype(np.int64))
        t = np.asarray(y, dtype=np.float64)
        if t.size != out.numel():
            raise ValueError(f"y has {t.size} values for a module output of shape "
                             f"{tuple(out.shape)}")
        return _tensor(t.reshape(tuple(out.shape)))

    def _loss_tensor(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The SUM over rows of the loss, as a scalar tensor."""
        if self.loss_fn is None:
            if self.task == "multiclass":
                return F.cross_entropy(out, target, reduction="sum")
            if self.task == "binary":
                return F.binary_cross_entropy_with_logits(out, target, reduction="sum")
            return 0.5 * F.mse_loss(out, target, reduction="sum")
        value = self.loss_fn(out, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the loss {_describe(self.loss_fn)} returned {shape}; it must "
                             "return a scalar tensor, the SUM over rows (reduction='sum')")
        if not self._loss_checked and out.shape[0] >= 2:
            self._check_sum(out.detach(), target, value.detach())
            self._loss_checked = True
        return value.reshape(())

    def _check_sum(self, out: torch.Tensor, target: torch.Tensor, whole: torch.Tensor) -> None:
        """Raise if the custom loss over all rows is not its sum over two halves."""
        assert self.loss_fn is not None
        half = out.shape[0] // 2
        with torch.no_grad():
            parts = [float(self.loss_fn(out[:half], target[:half])),
                     float(self.loss_fn(out[half:], target[half:]))]
        total, split = float(whole), parts[0] + parts[1]
        scale = abs(parts[0]) + abs(parts[1])
        if not math.isclose(total, split, rel_tol=_SUM_CHECK_RTOL, abs_tol=1e-12 * scale):
            raise ValueError(
                f"the loss {_describe(self.loss_fn)} is not a sum over rows: on {out.shape[0]} "
                f"rows it gives {total!r}, but on the two halves {parts[0]!r} + {parts[1]!r} = "
                f"{split!r}. daskray.ml adds per-shard sums and divides by the global batch "
                "itself: use reduction='sum', and no terms that do not belong to a row")

    # ------------------------------------------------------------------ the protocol

    def init_params(self, n_features: int, n_outputs: int,
                    rng: np.random.Generator) -> Params:
        """Float64 copies of the module's parameters, checked to fit ``n_features`` inputs
        and ``n_outputs`` outputs: a module built with torch seeded from ``rng`` when
        the model has a factory, else the given module's own values."""
        check_sizes(self, n_features, n_outputs)
        if self.task == "binary" and n_outputs != 1:
            raise ValueError(f"a binary TorchModel has one logit output; got n_outputs={n_outputs}")
        if self.factory is not None:
            module = self._build(int(rng.integers(0, 2**63 - 1)))
            shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
            if shapes != self._shapes:
                raise ValueError(f"the module factory {_describe(self.factory)} built "
                                 f"parameters {shapes}, not {self._shapes} as before; it must "
                                 "build the same structure on every call")
        else:
            module = self._template
        params = {name: p.detach().numpy().copy() for name, p in module.named_parameters()}
        self._check_fits(params, int(n_features), int(n_outputs))
        return params

    def _check_fits(self, params: Params, n_features: int, n_outputs: int) -> None:
        """Run the module on two zero rows: it must take ``n_features`` columns and
        give outputs for ``n_outputs`` (classes, or regression targets)."""
        with _one_thread(), torch.no_grad():
            try:
                out = functional_call(self._module(), self._parameters(params, False),
                                      (torch.zeros(2, n_features, dtype=DTYPE),))
            except RuntimeError as error:
                raise ValueError(f"the module cannot run on rows of {n_features} features "
                                 f"(the data's width): {error}") from error
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the module returned {type(out).__name__}; daskray.ml needs one "
                            "tensor of logits (classification) or values (regression)")
        if self.task == "multiclass":
            fits, need = tuple(out.shape) == (2, n_outputs), f"(n, {n_outputs}) logits"
            what = f"{n_outputs} classes"
        elif n_outputs == 1:
            fits, need = tuple(out.shape) in ((2,), (2, 1)), "(n,) or (n, 1)"
            what = "one output"
        else:
            fits, need = tuple(out.shape) == (2, n_outputs), f"(n, {n_outputs}) values"
            what = f"{n_outputs} outputs"
        if not fits:
            raise ValueError(f"the module's output for 2 rows has shape {tuple(out.shape)}, but "
                             f"the data needs {what}, {need}: size its last layer to match")

    def forward(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, k)`` (softmax), P(y=1) ``(n,)`` (sigmoid), or values."""
        with _one_thread(), torch.no_grad():
            out = self._output(self._module(), self._parameters(params, False), X)
            if self.task == "multiclass":
                out = torch.softmax(out, dim=1)
            elif self.task == "binary":
                out = torch.sigmoid(out.reshape(-1))
            elif out.ndim == 2 and out.shape[1] == 1:
                out = out[:, 0]
            return out.numpy()

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Int labels (argmax of the logits, or logit > 0) or regression values."""
        with _one_thread(), torch.no_grad():
            out = self._output(self._module(), self._parameters(params, False), X)
            if self.task == "multiclass":
                return out.argmax(dim=1).numpy().astype(np.int64)
            if self.task == "binary":
                return (out.reshape(-1) > 0).numpy().astype(np.int64)
            return (out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out).numpy()

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray) -> float:
        """Sum over the rows of ``X`` of the loss (data term only)."""
        with _one_thread(), torch.no_grad():
            out = self._output(self._module(), self._parameters(params, False), X)
            return float(self._loss_tensor(out, self._target(y, out)))

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray) -> Params:
        """Sum over rows of d loss / d params (autograd), keyed and shaped like ``params``."""
        return self.loss_and_gradient(params, X, y)[1]

    def loss_and_gradient(self, params: Params, X: np.ndarray,
                          y: np.ndarray) -> tuple[float, Params]:
        """``(loss, gradient)`` from one forward and one backward pass."""
        with _one_thread():
            tensors = self._parameters(params, True)
            out = self._output(self._module(), tensors, X)
            value = self._loss_tensor(out, self._target(y, out))
            grads = torch.autograd.grad(value, list(tensors.values()), allow_unused=True)
            result = {name: (g.numpy() if g is not None else np.zeros(self._shapes[name]))
                      for name, g in zip(tensors, grads)}
            return float(value.detach()), {name: result[name] for name in params}

    def weight_keys(self) -> tuple[str, ...]:
        """Parameters with two or more dimensions: what the trainer's ``l2`` applies to."""
        return tuple(name for name, shape in self._shapes.items() if len(shape) >= 2)


def _checked_loss(loss: Any) -> LossFn | None:
    """``loss`` if it can be a per-row SUM loss, else a TypeError/ValueError saying why."""
    if loss is None:
        return None
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(output, target) -> scalar tensor "
                        f"(e.g. torch.nn.CrossEntropyLoss(reduction='sum')), got "
                        f"{type(loss).__name__}")
    reduction = getattr(loss, "reduction", None)
    if reduction is not None and reduction != "sum":
        raise ValueError(f"the loss {type(loss).__name__} has reduction={reduction!r}; "
                         "daskray.ml needs the SUM over rows, so pass "
                         f"{type(loss).__name__}(reduction='sum') -- the trainer divides "
                         "by the global batch size itself")
    return loss


def _prepared(module: torch.nn.Module, what: str) -> torch.nn.Module:
    """``module`` converted to float64 on the CPU, in eval mode, after checking that
    daskray.ml can train it."""
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{what} contains batch normalization ({name or 'the root'}: "
                f"{type(sub).__name__}), which mixes the rows of a batch; daskray.ml needs "
                "each row's loss to depend only on that row (per-shard sums must add up). "
                "Use torch.nn.LayerNorm, or no normalization")
    named = list(module.named_parameters())
    for name, p in named:
        if torch.nn.parameter.is_lazy(p):
            raise ValueError(f"{what} has an uninitialized lazy parameter {name!r}; give "
                             "its layer explicit sizes (e.g. Linear instead of LazyLinear)")
        if not p.is_floating_point():
            raise ValueError(f"{what} has a non-floating-point parameter {name!r} ({p.dtype})")
    if not named:
        raise ValueError(f"{what} has no parameters to train")
    module = module.to(device="cpu", dtype=DTYPE)
    module.eval()
    return module
