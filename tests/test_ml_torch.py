"""daskray.ml's TorchModel: a torch.nn.Module behind the numpy model protocol.

What the trainer relies on, checked against independent computations: autograd
gradients equal finite differences and the hand-written numpy built-ins for the
same weights; loss and gradient are sums over rows; seeded initialization is
deterministic; training on 1 or 2 workers gives the parameters of
``reference_fit`` bit for bit; a small network learns digits; bad modules and
losses are refused with a message that says what to change.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import daskray  # noqa: E402
from daskray.ml import Dataset, RunConfig, ScalingConfig, Trainer, models, reference_fit  # noqa: E402
from daskray.ml.models import numerical_gradient  # noqa: E402
from daskray.ml.torch_model import TorchModel  # noqa: E402
from daskray.ml.trainer import Checkpoint  # noqa: E402
from helpers import digits_split  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class TwoLayerNet(nn.Module):
    """A module class with constructor arguments (built by TorchModel from kwargs)."""

    def __init__(self, n_features: int = 5, hidden: int = 6, n_outputs: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.out = nn.Linear(hidden, n_outputs)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def _mlp_module(n_features: int, hidden: tuple, n_outputs: int, activation: str) -> nn.Module:
    layers: list = []
    sizes = (n_features, *hidden)
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU() if activation == "relu" else nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], n_outputs))
    return nn.Sequential(*layers)


def _torch_params(numpy_params: dict, n_layers: int) -> dict:
    """A built-in MLP's / linear model's parameters under nn.Sequential / nn.Linear names
    (torch stores a Linear weight as (out, in): the transpose of the numpy ``w``)."""
    if n_layers == 0:  # a single nn.Linear
        return {"weight": numpy_params["w"].T.copy(), "bias": numpy_params["b"].copy()}
    return {name: value for i in range(n_layers)
            for name, value in ((f"{2 * i}.weight", numpy_params[f"w{i}"].T.copy()),
                                (f"{2 * i}.bias", numpy_params[f"b{i}"].copy()))}


def _data(task: str, n_outputs: int, n: int = 17, n_features: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_features))
    if task == "regression":
        y = rng.standard_normal(n) if n_outputs == 1 else rng.standard_normal((n, n_outputs))
    elif task == "binary":
        y = rng.integers(0, 2, n)
    else:
        y = rng.integers(0, n_outputs, n)
    return X, y


def _assert_close(got: dict, want: dict, rtol: float) -> None:
    """Same keys, shapes, dtype float64, entries equal to ``rtol`` of each array's scale."""
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert got[key].dtype == np.float64, key
        scale = max(1e-300, float(np.max(np.abs(want[key]))))
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=rtol * scale, err_msg=key)


# (TorchModel factory, task, n_outputs): every kind of output head
CASES = [
    (lambda: _mlp_module(5, (6,), 3, "relu"), "multiclass", 3),
    (lambda: _mlp_module(5, (4, 3), 1, "tanh"), "binary", 1),
    (lambda: nn.Linear(5, 1), "binary", 1),
    (lambda: _mlp_module(5, (4,), 1, "tanh"), "regression", 1),
    (lambda: nn.Linear(5, 2), "regression", 2),
]
CASE_IDS = ["mlp-multiclass", "mlp-binary", "linear-binary", "mlp-regression", "linear-regression-2"]


# ---------------------------------------------------------------------------
# gradients and losses against independent computations
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("factory,task,n_outputs", CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences(factory, task, n_outputs):
    model = TorchModel(factory, task=task)
    X, y = _data(task, n_outputs)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(1))
    _assert_close(model.gradient(params, X, y), numerical_gradient(model, params, X, y),
                  rtol=1e-6)


@pytest.mark.parametrize("hidden,activation,n_outputs", [
    ((7,), "tanh", 3), ((6, 4), "relu", 4), ((5,), "relu", 1)])
def test_gradient_and_loss_equal_the_handwritten_mlp(hidden, activation, n_outputs):
    task = "multiclass" if n_outputs > 1 else "binary"
    numpy_model = models.MLP(hidden=hidden, activation=activation, task=task)
    torch_model = TorchModel(_mlp_module(5, hidden, n_outputs, activation), task=task)
    X, y = _data(task, n_outputs, n=40, seed=2)
    params = numpy_model.init_params(5, n_outputs, np.random.default_rng(3))
    tparams = _torch_params(params, numpy_model.n_layers)
    want_loss, want = numpy_model.loss_and_gradient(params, X, y)
    got_loss, got = torch_model.loss_and_gradient(tparams, X, y)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    _assert_close(got, _torch_params(want, numpy_model.n_layers), rtol=1e-10)
    np.testing.assert_allclose(torch_model.forward(tparams, X), numpy_model.forward(params, X),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(torch_model.predict(tparams, X), numpy_model.predict(params, X))


@pytest.mark.parametrize("numpy_model,task,n_outputs", [
    (models.SoftmaxRegression(), "multiclass", 4),
    (models.LogisticRegression(), "binary", 1),
    (models.LinearRegression(), "regression", 1),
    (models.LinearRegression(), "regression", 3),
])
def test_gradient_and_loss_equal_the_handwritten_linear_models(numpy_model, task, n_outputs):
    """A single nn.Linear is the built-in linear model; the default regression loss
    is half the squared error, as LinearRegression's."""
    torch_model = TorchModel(nn.Linear(5, n_outputs), task=task)
    X, y = _data(task, n_outputs, n=30, seed=4)
    params = numpy_model.init_params(5, n_outputs, np.random.default_rng(5))
    params["b"] = np.random.default_rng(6).standard_normal(params["b"].shape)
    tparams = _torch_params(params, 0)
    want_loss, want = numpy_model.loss_and_gradient(params, X, y)
    got_loss, got = torch_model.loss_and_gradient(tparams, X, y)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    _assert_close(got, _torch_params(want, 0), rtol=1e-10)
    np.testing.assert_allclose(torch_model.forward(tparams, X), numpy_model.forward(params, X),
                               rtol=1e-12, atol=1e-15)
    if task == "regression":  # values: equal to rounding (torch fuses the bias add)
        np.testing.assert_allclose(torch_model.predict(tparams, X),
                                   numpy_model.predict(params, X), rtol=1e-12, atol=1e-15)
    else:
        np.testing.assert_array_equal(torch_model.predict(tparams, X),
                                      numpy_model.predict(params, X))


@pytest.mark.parametrize("factory,task,n_outputs", CASES, ids=CASE_IDS)
def test_loss_and_gradient_are_sums_over_rows(factory, task, n_outputs):
    model = TorchModel(factory, task=task)
    X, y = _data(task, n_outputs, n=20, seed=7)
    params = model.init_params(5, n_outputs, np.random.default_rng(8))
    k = 7
    assert model.loss(params, X, y) == pytest.approx(
        model.loss(params, X[:k], y[:k]) + model.loss(params, X[k:], y[k:]), rel=1e-12)
    g, g1, g2 = (model.gradient(params, X, y), model.gradient(params, X[:k], y[:k]),
                 model.gradient(params, X[k:], y[k:]))
    for key in g:
        np.testing.assert_allclose(g[key], g1[key] + g2[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factory,task,n_outputs", CASES, ids=CASE_IDS)
def test_loss_and_gradient_together_equal_separate_calls_bitwise(factory, task, n_outputs):
    model = TorchModel(factory, task=task)
    X, y = _data(task, n_outputs, seed=9)
    params = model.init_params(5, n_outputs, np.random.default_rng(10))
    loss, grads = model.loss_and_gradient(params, X, y)
    assert loss == model.loss(params, X, y)
    separate = model.gradient(params, X, y)
    assert list(grads) == list(params)
    assert all(np.array_equal(grads[k], separate[k]) for k in separate)


def test_forward_and_predict_follow_the_task():
    X, _ = _data("multiclass", 3)
    multi = TorchModel(lambda: _mlp_module(5, (4,), 3, "relu"))
    p = multi.init_params(5, 3, np.random.default_rng(0))
    probs = multi.forward(p, X)
    assert probs.shape == (len(X), 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(multi.predict(p, X), probs.argmax(axis=1))
    binary = TorchModel(nn.Linear(5, 1), task="binary")
    p = binary.init_params(5, 1, np.random.default_rng(0))
    prob = binary.forward(p, X)
    assert prob.shape == (len(X),) and np.all((prob > 0) & (prob < 1))
    np.testing.assert_array_equal(binary.predict(p, X), (prob > 0.5).astype(np.int64))
    assert binary.predict(p, X).dtype == np.int64
    reg = TorchModel(nn.Linear(5, 1), task="regression")
    p = reg.init_params(5, 1, np.random.default_rng(0))
    np.testing.assert_allclose(reg.forward(p, X), X @ p["weight"][0] + p["bias"][0], rtol=1e-12)
    assert reg.predict(p, X).shape == (len(X),)


def test_a_custom_sum_loss_is_used():
    X, y = _data("multiclass", 3, seed=11)
    default = TorchModel(lambda: _mlp_module(5, (4,), 3, "relu"))
    custom = TorchModel(lambda: _mlp_module(5, (4,), 3, "relu"),
                        loss=nn.CrossEntropyLoss(reduction="sum"))
    params = default.init_params(5, 3, np.random.default_rng(0))
    assert custom.loss(params, X, y) == default.loss(params, X, y)
    # a different loss (L1 regression) gives a different, still correct, gradient
    Xr, yr = _data("regression", 1, seed=12)
    l1 = TorchModel(lambda: nn.Linear(5, 1), task="regression",
                    loss=nn.L1Loss(reduction="sum"))
    params = l1.init_params(5, 1, np.random.default_rng(1))
    out = Xr @ params["weight"][0] + params["bias"][0]
    assert l1.loss(params, Xr, yr) == pytest.approx(np.sum(np.abs(out - yr)), rel=1e-12)
    _assert_close(l1.gradient(params, Xr, yr), numerical_gradient(l1, params, Xr, yr), 1e-6)


def test_unused_parameters_get_zero_gradients():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(5, 3)
            self.spare = nn.Linear(5, 3)

        def forward(self, x):
            return self.used(x)

    model = TorchModel(WithSpare())
    X, y = _data("multiclass", 3)
    grads = model.gradient(model.init_params(5, 3, np.random.default_rng(0)), X, y)
    assert not np.any(grads["spare.weight"]) and not np.any(grads["spare.bias"])
    assert np.any(grads["used.weight"])


# ---------------------------------------------------------------------------
# parameters, initialization, pickling, threads
# ---------------------------------------------------------------------------

def test_parameters_are_named_float64_arrays_and_weights_exclude_biases():
    model = TorchModel(TwoLayerNet, module_kwargs={"hidden": 8})
    params = model.init_params(5, 3, np.random.default_rng(0))
    assert list(params) == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    assert params["hidden.weight"].shape == (8, 5) and params["out.weight"].shape == (3, 8)
    assert all(v.dtype == np.float64 for v in params.values())
    assert model.weight_keys() == ("hidden.weight", "out.weight")


def test_seeded_init_is_deterministic_and_leaves_the_global_torch_rng_alone():
    model = TorchModel(lambda: _mlp_module(5, (6,), 3, "relu"))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = model.init_params(5, 3, np.random.default_rng(7))
    b = TorchModel(lambda: _mlp_module(5, (6,), 3, "relu")).init_params(
        5, 3, np.random.default_rng(7))
    c = model.init_params(5, 3, np.random.default_rng(8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in model.weight_keys())
    # torch's own initialization: Linear weights are uniform in +-1/sqrt(fan_in)
    assert np.max(np.abs(a["0.weight"])) <= 1 / np.sqrt(5)


def test_a_module_instance_keeps_its_weights_and_is_not_modified():
    module = nn.Linear(5, 3)
    model = TorchModel(module)
    a = model.init_params(5, 3, np.random.default_rng(0))
    b = model.init_params(5, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(a["weight"], module.weight.detach().numpy().astype(np.float64))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert module.weight.dtype == torch.float32  # the caller's module is not converted
    a["weight"][:] = 0.0  # the returned arrays are copies
    assert torch.count_nonzero(module.weight) > 0


def test_a_float64_round_trip_is_exact():
    """Parameters reach torch as float64, not rounded to float32: on the identity
    matrix a Linear layer gives back ``weight.T + bias``, bit for bit, for values
    float32 cannot hold."""
    model = TorchModel(nn.Linear(5, 3), task="regression")
    params = {"weight": np.random.default_rng(0).standard_normal((3, 5)) * 1e-3 + 1 / 3,
              "bias": np.array([np.pi, np.e, 1e-300])}
    out = model.forward(params, np.eye(5))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, params["weight"].T + params["bias"])
    assert not np.array_equal(out.astype(np.float32).astype(np.float64), out)


def test_model_pickles_and_computes_the_same_bits():
    import cloudpickle

    X, y = _data("multiclass", 3)
    for model in (TorchModel(lambda: _mlp_module(5, (6,), 3, "tanh")),
                  TorchModel(TwoLayerNet, module_kwargs={"hidden": 4}),
                  TorchModel(_mlp_module(5, (6,), 3, "relu"))):
        params = model.init_params(5, 3, np.random.default_rng(0))
        clone = cloudpickle.loads(cloudpickle.dumps(model))
        assert repr(clone) == repr(model)
        assert clone.loss(params, X, y) == model.loss(params, X, y)
        grads, clone_grads = model.gradient(params, X, y), clone.gradient(params, X, y)
        assert all(np.array_equal(grads[k], clone_grads[k]) for k in grads)


def test_computes_on_one_thread_and_restores_the_callers_setting():
    seen = []

    def recording_loss(out, target):
        seen.append(torch.get_num_threads())
        return nn.functional.cross_entropy(out, target, reduction="sum")

    model = TorchModel(nn.Linear(5, 3), loss=recording_loss)
    X, y = _data("multiclass", 3)
    params = model.init_params(5, 3, np.random.default_rng(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.gradient(params, X, y)
        model.loss(params, X, y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {1}


def test_importing_daskray_ml_does_not_import_torch():
    code = ("import sys, daskray.ml, daskray.ml.models as m; "
            "assert 'torch' not in sys.modules, 'torch imported early'; "
            "assert m.TorchModel.__name__ == 'TorchModel'; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_bad_modules_are_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="torch.nn.Module instance"):
        TorchModel("Linear")
    with pytest.raises(TypeError, match="returned int, not a torch.nn.Module"):
        TorchModel(lambda: 3)
    with pytest.raises(ValueError, match="no parameters"):
        TorchModel(nn.ReLU())
    with pytest.raises(ValueError, match="batch normalization"):
        TorchModel(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="lazy parameter"):
        TorchModel(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="module_kwargs are for a module class"):
        TorchModel(nn.Linear(5, 3), module_kwargs={"hidden": 3})
    with pytest.raises(ValueError, match="task must be one of"):
        TorchModel(nn.Linear(5, 3), task="classification")


def test_modules_that_do_not_fit_the_data_are_refused_with_a_clear_message():
    model = TorchModel(lambda: nn.Linear(5, 3))
    with pytest.raises(ValueError, match="cannot run on rows of 7 features"):
        model.init_params(7, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs 4 classes"):
        model.init_params(5, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="binary TorchModel has one logit output"):
        TorchModel(nn.Linear(5, 1), task="binary").init_params(5, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="a multiclass TorchModel needs"):
        TorchModel(nn.Linear(5, 1)).loss({"weight": np.zeros((1, 5)), "bias": np.zeros(1)},
                                         np.zeros((2, 5)), np.zeros(2))
    params = model.init_params(5, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['b'\]"):
        model.gradient({"weight": params["weight"], "b": params["bias"]},
                       np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match=r"'weight' has shape \(5, 3\)"):
        model.gradient({"weight": params["weight"].T, "bias": params["bias"]},
                       np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        model.loss(params, np.zeros((2, 5)), np.array([0, 3]))
    widths = iter([3, 4])  # the first build (at construction) differs from the next
    changing = TorchModel(lambda: nn.Linear(5, next(widths)))
    with pytest.raises(ValueError, match="same structure on every call"):
        changing.init_params(5, 3, np.random.default_rng(0))


def test_bad_losses_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"reduction='mean'.*CrossEntropyLoss\(reduction='sum'\)"):
        TorchModel(nn.Linear(5, 3), loss=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss must be a callable"):
        TorchModel(nn.Linear(5, 3), loss="cross_entropy")
    X, y = _data("multiclass", 3)
    mean = TorchModel(nn.Linear(5, 3),
                      loss=lambda out, t: nn.functional.cross_entropy(out, t))
    params = mean.init_params(5, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a sum over rows.*reduction='sum'"):
        mean.gradient(params, X, y)
    per_row = TorchModel(nn.Linear(5, 3), loss=lambda out, t: nn.functional.cross_entropy(
        out, t, reduction="none"))
    with pytest.raises(ValueError, match=r"returned \(17,\); it must return a scalar tensor"):
        per_row.loss(params, X, y)


# ---------------------------------------------------------------------------
# on the cluster
# ---------------------------------------------------------------------------

def _blobs(n=480, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_trainer_gives_bit_identical_parameters_for_1_and_2_workers_and_reference(task,
                                                                                  tmp_path):
    X, y = _blobs()
    if task == "multiclass":
        model = TorchModel(TwoLayerNet, module_kwargs={"hidden": 8})
        config = {"optimizer": "adam", "lr": 0.05, "batch_size": 96, "epochs": 3, "l2": 1e-3}
    else:
        y = X @ np.arange(1.0, 6.0) + 0.5
        model = TorchModel(lambda: _mlp_module(5, (6,), 1, "tanh"), task="regression")
        config = {"optimizer": "momentum", "lr": 0.01, "batch_size": 96, "epochs": 3,
                  "momentum": 0.9}
    ds = Dataset.from_numpy(X, y, num_shards=6, seed=1)
    fitted = {}
    for workers in (1, 2):
        result = Trainer(model=model, train_config=config,
                         scaling_config=ScalingConfig(num_workers=workers),
                         run_config=RunConfig(storage_path=str(tmp_path / f"w{workers}"))).fit(ds)
        fitted[workers] = result.checkpoint.params
        history = result.metrics_dataframe["train_loss"]
        assert history.iloc[-1] < history.iloc[0]
    reference = reference_fit(model, daskray.get(ds.shards), config,
                              classes=ds.classes if task == "multiclass" else None)
    initial = model.init_params(5, 3 if task == "multiclass" else 1, np.random.default_rng(0))
    assert list(reference) == list(initial)
    for key in reference:
        assert not np.array_equal(reference[key], initial[key]), key  # it trained
        assert np.array_equal(fitted[1][key], reference[key]), key
        assert np.array_equal(fitted[2][key], reference[key]), key
    loaded = Checkpoint.from_directory(str(tmp_path / "w2"))
    assert all(np.array_equal(loaded.params[k], reference[k]) for k in reference)


def _where_threads(model: TorchModel, params: dict, X: np.ndarray, y: np.ndarray) -> int:
    model.gradient(params, X, y)
    return torch.get_num_threads()


@pytest.mark.usefixtures("cluster")
def test_a_worker_runs_torch_on_one_thread():
    if torch.get_num_threads() < 2:
        pytest.skip("one core: torch already uses one thread")
    model = TorchModel(nn.Linear(5, 3))
    X, y = _data("multiclass", 3)
    params = model.init_params(5, 3, np.random.default_rng(0))
    assert daskray.get(daskray.remote(_where_threads).remote(model, params, X, y),
                       timeout=60) == 1


@pytest.mark.usefixtures("cluster")
def test_a_torch_mlp_on_digits_reaches_95_percent():
    train, test = digits_split()
    model = TorchModel(lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    result = Trainer(model=model,
                     train_config={"optimizer": "adam", "lr": 0.01, "batch_size": 64,
                                   "epochs": 12, "seed": 0}).fit(train, valid=test)
    assert result.metrics["valid_accuracy"] >= 0.95, result.metrics
