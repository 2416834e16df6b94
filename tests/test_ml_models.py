"""daskray.ml models and optimizers: pure numpy, no cluster.

What the trainer relies on: gradients that match the loss, loss and gradient as
sums over rows (so per-shard sums can be added), deterministic initialization,
pure optimizer steps, and a finite-difference fallback for models without a
gradient.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from daskray.ml.models import (MLP, LinearRegression, LogisticRegression, Model,
                               SoftmaxRegression, numerical_gradient)
from daskray.ml.optimizers import SGD, Adam, Optimizer, get_optimizer


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _data(model: Model, n_outputs: int, n: int = 13, n_features: int = 4, seed: int = 0):
    """Random small ``(X, y)`` with labels suited to ``model``'s task and output count."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_features))
    if model.task == "regression":
        y = rng.standard_normal(n) if n_outputs == 1 else rng.standard_normal((n, n_outputs))
    elif n_outputs == 1:
        y = rng.integers(0, 2, n)
    else:
        y = rng.integers(0, n_outputs, n)
    return X, y


def _assert_grads_close(got: dict, want: dict, rtol: float = 1e-6) -> None:
    """Same keys, shapes; entries equal to ``rtol`` relative to each parameter's scale."""
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        scale = max(1.0, float(np.max(np.abs(want[key]))))
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=rtol * scale, err_msg=key)


def _fit_full_batch(model: Model, X, y, n_outputs: int, optimizer: Optimizer,
                    steps: int, seed: int = 0) -> dict:
    """Plain full-batch training: the mean gradient fed to ``optimizer`` ``steps`` times."""
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(seed))
    state = optimizer.init_state(params)
    for _ in range(steps):
        grads = {k: g / len(X) for k, g in model.gradient(params, X, y).items()}
        params, state = optimizer.step(params, grads, state)
    return params


# (model, n_outputs): every built-in shape of output layer
BUILTINS = [
    (LinearRegression(), 1),
    (LinearRegression(), 3),
    (LogisticRegression(), 1),
    (SoftmaxRegression(), 4),
    (MLP(hidden=(6,), activation="relu"), 3),
    (MLP(hidden=(5, 4), activation="tanh"), 3),
    (MLP(hidden=(6,), activation="tanh", task="binary"), 1),
    (MLP(hidden=(5, 3), activation="relu"), 1),
]
IDS = [f"{m!r}-{k}" for m, k in BUILTINS]


# ---------------------------------------------------------------------------
# the protocol, for every built-in
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_gradient_matches_finite_differences(model, n_outputs):
    X, y = _data(model, n_outputs)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(1))
    _assert_grads_close(model.gradient(params, X, y), numerical_gradient(model, params, X, y))


@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_loss_and_gradient_are_sums_over_rows(model, n_outputs):
    X, y = _data(model, n_outputs, n=20)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(2))
    k = 7
    parts = model.loss(params, X[:k], y[:k]) + model.loss(params, X[k:], y[k:])
    assert model.loss(params, X, y) == pytest.approx(parts, rel=1e-12)
    g, g1, g2 = (model.gradient(params, X, y), model.gradient(params, X[:k], y[:k]),
                 model.gradient(params, X[k:], y[k:]))
    for key in g:
        np.testing.assert_allclose(g[key], g1[key] + g2[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_loss_and_gradient_together_equal_separate_calls_bitwise(model, n_outputs):
    X, y = _data(model, n_outputs)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(3))
    loss, grads = model.loss_and_gradient(params, X, y)
    assert loss == model.loss(params, X, y)
    separate = model.gradient(params, X, y)
    assert all(np.array_equal(grads[k], separate[k]) for k in separate)


@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_init_params_deterministic_float64_zero_biases(model, n_outputs):
    a = model.init_params(4, n_outputs, np.random.default_rng(7))
    b = model.init_params(4, n_outputs, np.random.default_rng(7))
    c = model.init_params(4, n_outputs, np.random.default_rng(8))
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float64 for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in model.weight_keys())
    for key in a:
        if key in model.weight_keys():
            assert a[key].ndim == 2 and np.any(a[key] != 0)
        else:
            assert not np.any(a[key]), f"bias {key} should start at zero"


@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_forward_and_predict_shapes(model, n_outputs):
    X, _ = _data(model, n_outputs)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(4))
    out, pred = model.forward(params, X), model.predict(params, X)
    if model.task == "regression":
        assert out.shape == ((len(X),) if n_outputs == 1 else (len(X), n_outputs))
        np.testing.assert_array_equal(pred, out)
    elif n_outputs == 1:
        assert out.shape == (len(X),) and np.all((out > 0) & (out < 1))
        np.testing.assert_array_equal(pred, (out > 0.5).astype(int))
    else:
        assert out.shape == (len(X), n_outputs)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_array_equal(pred, out.argmax(axis=1))
    if model.task != "regression":
        assert pred.dtype.kind == "i"


@pytest.mark.parametrize("model,n_outputs", BUILTINS, ids=IDS)
def test_model_pickles(model, n_outputs):
    """Models travel to workers: a pickled copy computes the same bits."""
    X, y = _data(model, n_outputs)
    params = model.init_params(X.shape[1], n_outputs, np.random.default_rng(5))
    clone = pickle.loads(pickle.dumps(model))
    assert clone.loss(params, X, y) == model.loss(params, X, y)
    assert repr(clone) == repr(model)


def test_weight_keys_exclude_biases():
    assert LinearRegression().weight_keys() == ("w",)
    assert SoftmaxRegression().weight_keys() == ("w",)
    assert MLP(hidden=(8, 4)).weight_keys() == ("w0", "w1", "w2")
    assert Model().weight_keys() == ()


def test_mlp_relu_uses_he_and_tanh_glorot_scale():
    wide = 4000
    relu = MLP(hidden=(wide,), activation="relu").init_params(wide, 2, np.random.default_rng(0))
    tanh = MLP(hidden=(wide,), activation="tanh").init_params(wide, 2, np.random.default_rng(0))
    assert relu["w0"].std() == pytest.approx(np.sqrt(2.0 / wide), rel=0.01)
    assert tanh["w0"].std() == pytest.approx(np.sqrt(2.0 / (2 * wide)), rel=0.01)


# ---------------------------------------------------------------------------
# numerics and errors
# ---------------------------------------------------------------------------

def test_logistic_loss_finite_for_huge_logits():
    model = LogisticRegression()
    params = {"w": np.array([[1.0]]), "b": np.zeros(1)}
    X = np.array([[1e6], [-1e6], [1e6], [-1e6]])
    y = np.array([1, 0, 0, 1])  # first two right with certainty, last two wrong
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / divide-by-zero warnings either
        loss = model.loss(params, X, y)
        grads = model.gradient(params, X, y)
        p = model.forward(params, X)
    assert loss == pytest.approx(2e6)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_array_equal(p, [1.0, 0.0, 1.0, 0.0])


def test_softmax_loss_finite_for_huge_logits():
    model = SoftmaxRegression()
    params = {"w": np.array([[1e6, -1e6, 0.0]]), "b": np.zeros(3)}
    X = np.array([[1.0], [1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = model.loss(params, X, np.array([0, 1]))
    assert loss == pytest.approx(2e6)


@pytest.mark.parametrize("make,n_outputs,match", [
    (LogisticRegression, 2, "one output"),
    (SoftmaxRegression, 1, ">= 2"),
    (lambda: MLP(task="binary"), 3, "one sigmoid output"),
])
def test_init_params_rejects_wrong_output_count(make, n_outputs, match):
    with pytest.raises(ValueError, match=match):
        make().init_params(3, n_outputs, np.random.default_rng(0))


def test_multiclass_labels_are_checked():
    model = SoftmaxRegression()
    params = model.init_params(2, 3, np.random.default_rng(0))
    X = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        model.loss(params, X, np.array([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        model.loss(params, X, np.array([0.5, 1.0]))


@pytest.mark.parametrize("kwargs", [{"hidden": (0,)}, {"hidden": ("a",)},
                                    {"activation": "sigmoid"}, {"task": "regression"}])
def test_mlp_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        MLP(**kwargs)


def test_mlp_accepts_int_and_list_hidden():
    assert MLP(hidden=16).hidden == (16,)
    assert MLP(hidden=[8, 4]).hidden == (8, 4)


# ---------------------------------------------------------------------------
# training: the models learn
# ---------------------------------------------------------------------------

def test_softmax_regression_gradient_descent_separates_blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    y = np.repeat(np.arange(3), 100)
    X = centers[y] + rng.standard_normal((300, 2))
    model = SoftmaxRegression()
    params = _fit_full_batch(model, X, y, 3, SGD(lr=0.5), steps=300)
    assert np.mean(model.predict(params, X) == y) >= 0.98
    assert model.loss(params, X, y) / len(X) < 0.1


@pytest.mark.parametrize("n_outputs", [1, 2])
def test_mlp_learns_xor(n_outputs):
    X = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    model = MLP(hidden=(8,), activation="tanh")
    params = _fit_full_batch(model, X, y, n_outputs, Adam(lr=0.05), steps=500)
    np.testing.assert_array_equal(model.predict(params, X), y)
    assert model.loss(params, X, y) / len(X) < 0.05


def test_linear_models_are_not_enough_for_xor():
    """The XOR check above is meaningful: no linear model gets all four points."""
    X = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    model = LogisticRegression()
    params = _fit_full_batch(model, X, y, 1, Adam(lr=0.05), steps=500)
    assert np.mean(model.predict(params, X) == y) < 1.0


def test_linear_regression_recovers_coefficients():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3))
    y = X @ np.array([1.5, -2.0, 0.5]) + 0.25
    model = LinearRegression()
    params = _fit_full_batch(model, X, y, 1, SGD(lr=0.3, momentum=0.5), steps=300)
    np.testing.assert_allclose(params["w"][:, 0], [1.5, -2.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(params["b"], [0.25], atol=1e-6)


# ---------------------------------------------------------------------------
# the seed's minimal style: forward (+ init_params) only
# ---------------------------------------------------------------------------

def _seed_style_linear():
    """A fresh class each call, so the once-per-class warning fires in every test."""

    class SeedLinear(Model):
        def __init__(self, config=None):
            self.config = config or {}

        def init_params(self, n_features, n_outputs, rng):
            return {"w": np.zeros(n_features), "b": np.zeros(())}

        def forward(self, params, X):
            return X @ params["w"] + params["b"]

    return SeedLinear()


def test_seed_style_model_trains_by_finite_differences_and_warns_once():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3
    model = _seed_style_linear()
    assert model.task == "regression"
    with pytest.warns(RuntimeWarning, match="finite differences"):
        params = _fit_full_batch(model, X, y, 1, SGD(lr=0.3), steps=150)
    np.testing.assert_allclose(params["w"], [1.0, -2.0, 0.5], atol=1e-4)
    assert float(params["b"]) == pytest.approx(0.3, abs=1e-4)
    with warnings.catch_warnings(record=True) as caught:  # already warned for this class
        warnings.simplefilter("always")
        model.gradient(params, X, y)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_seed_style_default_loss_matches_builtins():
    """Default losses by task agree with the built-in models' (sums, same definition)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((9, 2))

    class SeedBinary(Model):
        task = "binary"

        def forward(self, params, X):
            return LogisticRegression().forward(params, X)

    class SeedMulti(Model):
        task = "multiclass"

        def forward(self, params, X):
            return SoftmaxRegression().forward(params, X)

    for seed_model, builtin, k in [(_seed_style_linear(), None, 1),
                                   (SeedBinary(), LogisticRegression(), 1),
                                   (SeedMulti(), SoftmaxRegression(), 3)]:
        y = rng.integers(0, max(k, 2), len(X))
        if builtin is None:  # regression: compare with LinearRegression's parameters
            params = {"w": rng.standard_normal(2), "b": np.array(0.5)}
            lin = {"w": params["w"][:, None], "b": np.array([0.5])}
            assert seed_model.loss(params, X, y) == pytest.approx(
                LinearRegression().loss(lin, X, y), rel=1e-12)
            continue
        params = builtin.init_params(2, k, rng)
        assert seed_model.loss(params, X, y) == pytest.approx(builtin.loss(params, X, y),
                                                              rel=1e-12)
        np.testing.assert_array_equal(seed_model.predict(params, X), builtin.predict(params, X))
        with pytest.warns(RuntimeWarning):
            _assert_grads_close(seed_model.gradient(params, X, y), builtin.gradient(params, X, y))


def test_model_without_init_params_says_what_to_define():
    class OnlyForward(Model):
        def forward(self, params, X):
            return X[:, 0]

    with pytest.raises(NotImplementedError, match="init_params"):
        OnlyForward().init_params(3, 1, np.random.default_rng(0))


def test_numerical_gradient_leaves_params_untouched():
    model = LinearRegression()
    X, y = _data(model, 1)
    params = model.init_params(X.shape[1], 1, np.random.default_rng(0))
    before = {k: v.copy() for k, v in params.items()}
    numerical_gradient(model, params, X, y)
    assert all(np.array_equal(params[k], before[k]) for k in params)


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------

def _toy():
    """One-entry parameters and two successive gradients, for hand-computed updates."""
    params = {"w": np.array([1.0]), "b": np.array([-2.0])}
    g1 = {"w": np.array([0.5]), "b": np.array([1.0])}
    g2 = {"w": np.array([-0.25]), "b": np.array([1.0])}
    return params, g1, g2


def _frozen_copy(tree):
    """A deep copy of nested dicts of arrays, for mutation checks."""
    if isinstance(tree, dict):
        return {k: _frozen_copy(v) for k, v in tree.items()}
    return np.copy(tree) if isinstance(tree, np.ndarray) else tree


def _assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


def test_sgd_step_is_p_minus_lr_g_exactly():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    grads = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    opt = SGD(lr=0.37)
    new, state = opt.step(params, grads, opt.init_state(params))
    for k in params:
        assert np.array_equal(new[k], params[k] - 0.37 * grads[k])
    assert state == {}


def test_momentum_two_steps_by_hand():
    params, g1, g2 = _toy()
    opt = SGD(lr=0.1, momentum=0.9)
    p1, s1 = opt.step(params, g1, opt.init_state(params))
    p2, s2 = opt.step(p1, g2, s1)
    # w: v1 = 0.5, p1 = 1 - 0.05 = 0.95; v2 = 0.9*0.5 - 0.25 = 0.2, p2 = 0.95 - 0.02 = 0.93
    assert p1["w"][0] == pytest.approx(0.95, rel=1e-14)
    assert p2["w"][0] == pytest.approx(0.93, rel=1e-14)
    assert s2["velocity"]["w"][0] == pytest.approx(0.2, rel=1e-14)
    # b: v1 = 1, p1 = -2.1; v2 = 1.9, p2 = -2.29
    assert p2["b"][0] == pytest.approx(-2.29, rel=1e-14)


def test_adam_two_steps_by_hand():
    params, g1, g2 = _toy()
    opt = Adam(lr=0.1)
    p1, s1 = opt.step(params, g1, opt.init_state(params))
    p2, s2 = opt.step(p1, g2, s1)
    # step 1: m = 0.1*0.5 = 0.05, v = 0.001*0.25 = 2.5e-4; m_hat = 0.5, v_hat = 0.25
    assert p1["w"][0] == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8), rel=1e-14)
    # step 2: m = 0.9*0.05 + 0.1*(-0.25) = 0.02, v = 0.999*2.5e-4 + 0.001*0.0625 = 3.1225e-4
    m_hat, v_hat = 0.02 / (1 - 0.9 ** 2), 3.1225e-4 / (1 - 0.999 ** 2)
    want = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8) - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)
    assert p2["w"][0] == pytest.approx(want, rel=1e-12)
    assert p2["w"][0] == pytest.approx(0.8733662987078462, rel=1e-14)  # 40-digit Decimal
    assert s2["t"] == 2
    assert s2["m"]["w"][0] == pytest.approx(0.02, rel=1e-12)
    assert s2["v"]["w"][0] == pytest.approx(3.1225e-4, rel=1e-12)
    # a constant gradient moves b by ~lr per step (Adam's scale invariance)
    assert p2["b"][0] == pytest.approx(-2.2, rel=1e-6)


@pytest.mark.parametrize("opt", [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), Adam(lr=0.1)],
                         ids=repr)
def test_optimizer_step_does_not_mutate_inputs(opt):
    params, g1, g2 = _toy()
    state = opt.init_state(params)
    p1, s1 = opt.step(params, g1, state)
    snapshot = [_frozen_copy(x) for x in (params, g1, state, p1, s1)]
    opt.step(p1, g2, s1)
    for before, after in zip(snapshot, (params, g1, state, p1, s1)):
        _assert_tree_equal(before, after)
    assert all(p1[k] is not params[k] for k in params)


def test_optimizer_rejects_mismatched_gradient_keys():
    params, g1, _ = _toy()
    with pytest.raises(KeyError, match="do not match"):
        SGD(lr=0.1).step(params, {"w": g1["w"]}, {})


def test_get_optimizer_factory():
    assert get_optimizer("sgd", 0.1) == SGD(lr=0.1)
    assert get_optimizer("SGD", 0.1, momentum=0.5) == SGD(lr=0.1, momentum=0.5)
    assert get_optimizer("momentum", 0.1) == SGD(lr=0.1, momentum=0.9)
    assert get_optimizer("momentum", 0.1, momentum=0.8) == SGD(lr=0.1, momentum=0.8)
    assert get_optimizer("adam", 0.01, beta2=0.99) == Adam(lr=0.01, beta2=0.99)
    with pytest.raises(ValueError, match="unknown optimizer"):
        get_optimizer("rmsprop", 0.1)
    with pytest.raises(TypeError, match="beta1"):
        get_optimizer("sgd", 0.1, beta1=0.9)


@pytest.mark.parametrize("make", [lambda: SGD(lr=0.0), lambda: SGD(lr=0.1, momentum=1.0),
                                  lambda: Adam(lr=-1.0), lambda: Adam(beta1=1.0)])
def test_optimizer_rejects_bad_hyperparameters(make):
    with pytest.raises(ValueError):
        make()
