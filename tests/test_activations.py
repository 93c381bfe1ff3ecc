"""Every activation x loss (x init) the config names: the batched gradient is the gradient.

Checked three ways in float64: against the per-example oracle (naive.py: one example at a
time, the activations' plain forms) to 1e-12, against central finite differences of a loss
written here from the formulas alone (not from pbp_hpc's kernels), and through whole training
runs against PyTorch (tests/test_framework.py does the optimizers and schedules). Also: the
fused sigmoid fast path against its plain definition, relu's derivative at 0, cross-entropy
at extreme logits, and he_uniform's bounds.
"""

import typing

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, train
from pbp_hpc.engine import activations, losses, model, naive

ACTS = ["sigmoid", "tanh", "relu"]
LOSSES = ["mse", "cross_entropy"]
PAIRS = [(a, l) for a in ACTS for l in LOSSES]


def _problem(sizes, n, seed=1, init="glorot_uniform", dtype=np.float64):
    layout = model.Layout(sizes)
    theta = model.init_params(layout, seed, "float64", init=init).astype(dtype)
    rng = np.random.default_rng(seed)
    theta[np.concatenate([np.arange(s.start, s.stop) for s in layout.b_slices])] = rng.uniform(-0.3, 0.3, sum(sizes[1:]))
    x = rng.uniform(-1, 1, (n, sizes[0])).astype(dtype)  # signed: relu sees both sides
    y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]
    return layout, theta, x, y


def batched_grad(layout, theta, x, y, act, loss, max_batch=None):
    n = x.shape[0]
    ws, bs = model.views(theta, layout, np)
    grad = np.zeros(layout.n_params, dtype=theta.dtype)
    gws, gbs = model.views(grad, layout, np)
    work = model.Workspace(layout, max_batch or n, np, theta.dtype)
    work.x[:n], work.y[:n] = x, y
    out = np.zeros(1, dtype=theta.dtype)
    f, l = activations.get(act), losses.get(loss)
    model.forward(np, ws, bs, work.x, work, n, f, l)
    model.backward_sum(np, ws, gws, gbs, work.x, work.y, work, n, out, act=f, loss=l)
    return grad, float(out[0])


# The formulas, written out with numpy and nothing of pbp_hpc's: the finite differences' loss.
FORMULAS = {"sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)), "tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0)}


def formula_loss(layout, theta, x, y, act, loss):
    ws, bs = model.views(theta, layout, np)
    a = x
    for l, (w, b) in enumerate(zip(ws, bs)):
        z = a @ w + b
        a = z if (l == len(ws) - 1 and loss == "cross_entropy") else FORMULAS[act](z)
    if loss == "mse":
        return 0.5 * float(((a - y) ** 2).sum())
    m = a.max(axis=1, keepdims=True)
    logp = a - m - np.log(np.exp(a - m).sum(axis=1, keepdims=True))
    return -float((y * logp).sum())


def test_the_config_offers_exactly_what_is_defined():
    fields = config.ModelConfig.model_fields
    assert typing.get_args(fields["activation"].annotation) == tuple(activations.names())
    assert typing.get_args(fields["loss"].annotation) == tuple(losses.names())
    assert typing.get_args(fields["init"].annotation) == tuple(model.INITS)


@pytest.mark.parametrize("act,loss", PAIRS)
@pytest.mark.parametrize("sizes", [[5, 3], [6, 4, 3], [7, 5, 4, 3]])
def test_batched_gradient_matches_finite_differences_of_the_formulas(act, loss, sizes):
    layout, theta, x, y = _problem(sizes, n=4)
    grad, value = batched_grad(layout, theta, x, y, act, loss)
    assert value == pytest.approx(formula_loss(layout, theta, x, y, act, loss), rel=1e-12)
    eps = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        fd[i] = (formula_loss(layout, theta + e, x, y, act, loss) - formula_loss(layout, theta - e, x, y, act, loss)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("act,loss", PAIRS)
@pytest.mark.parametrize("n", [1, 7, 32])
def test_batched_gradient_equals_the_per_example_oracle(act, loss, n):
    layout, theta, x, y = _problem([20, 16, 12, 10], n=n)
    grad, value = batched_grad(layout, theta, x, y, act, loss)
    ref = np.zeros_like(theta)
    ref_value = naive.example_grad_sum(theta, layout, x, y, ref, act, loss)
    np.testing.assert_allclose(grad, ref, rtol=1e-12, atol=1e-14)
    assert value == pytest.approx(ref_value, rel=1e-12)


@pytest.mark.parametrize("n", [5, 1])  # 1: every product is a matrix-vector or rank-1 BLAS call
@pytest.mark.parametrize("act,loss", PAIRS)
def test_the_update_inside_the_gemms_equals_gradient_then_update(act, loss, n):
    """One rank's fused SGD (backward_sum with accumulate: theta += scale * gradient in the
    GEMMs, each layer's input gradient taken before its weights change)."""
    layout, theta, x, y = _problem([9, 8, 6, 4], n=n)
    grad, _ = batched_grad(layout, theta, x, y, act, loss)
    fused = theta.copy()
    ws, bs = model.views(fused, layout, np)
    work = model.Workspace(layout, n, np, np.float64, full_scratch=True)
    work.x[:n], work.y[:n] = x, y
    f, l = activations.get(act), losses.get(loss)
    model.forward(np, ws, bs, work.x, work, n, f, l)
    model.backward_sum(np, ws, ws, bs, work.x, work.y, work, n, np.zeros(1), scale=-0.1, accumulate=True, act=f, loss=l)
    np.testing.assert_allclose(fused, theta - 0.1 * grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act", ACTS)
def test_input_gradient_in_row_blocks_for_every_activation(act, monkeypatch):
    layout, theta, x, y = _problem([12, 10, 8, 6], n=23)
    whole, _ = batched_grad(layout, theta, x, y, act, "cross_entropy")
    monkeypatch.setattr(model.Workspace, "BLOCK_ROWS", 4)
    blocked, _ = batched_grad(layout, theta, x, y, act, "cross_entropy")
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("act,loss", PAIRS)
def test_prediction_is_the_largest_output(act, loss):
    layout, theta, x, _ = _problem([8, 7, 5], n=9)
    ws, bs = model.views(theta, layout, np)
    work = model.Workspace(layout, 9, np, np.float64)
    work.x[:9] = x
    f, l = activations.get(act), losses.get(loss)
    pred = model.predict_into(np, ws, bs, work.x, work, 9, f, l)
    w, b = model.views(theta, layout, np)
    a = FORMULAS[act](x @ w[0] + b[0]) @ w[1] + b[1]  # the logits: softmax keeps their order
    if loss == "mse":
        a = FORMULAS[act](a)
    np.testing.assert_array_equal(pred, np.argmax(a, axis=1))


def test_the_fused_sigmoid_equals_its_plain_definition():
    """The fast path: (a W + b) / 2 in the GEMM (alpha = 0.5), then 0.5 tanh(.) + 0.5, against
    the plain form applied to a W + b; and the plain form against 1 / (1 + exp(-z))."""
    layout, theta, x, y = _problem([30, 20, 10], n=16)
    ws, bs = model.views(theta, layout, np)
    work = model.Workspace(layout, 16, np, np.float64)
    work.x[:16] = x
    fast = model.forward(np, ws, bs, work.x, work, 16).copy()
    a = x
    for w, b in zip(ws, bs):
        a = activations.SIGMOID.forward_(np, a @ w + b)
    np.testing.assert_allclose(fast, a, rtol=2e-16 * 8, atol=0)
    z = np.linspace(-30, 30, 1001)
    # 0.5 tanh + 0.5 is accurate to an ulp of 1 in absolute terms (not relative, near 0)
    np.testing.assert_allclose(activations.SIGMOID.forward_(np, z.copy()), 1 / (1 + np.exp(-z)), rtol=1e-15, atol=1e-16)
    z32 = np.array([-200.0, -90.0, 0.0, 90.0], dtype=np.float32)  # exp(-z) overflows float32 below -88: tanh does not
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        np.testing.assert_array_equal(activations.SIGMOID.forward_(np, z32.copy()), np.array([0, 0, 0.5, 1], np.float32))


@pytest.mark.parametrize("form, pre_scale", [(activations.tanh_sigmoid_, 0.5), (activations.exp_sigmoid_, -1.0)])
def test_both_fast_sigmoid_forms_equal_the_sigmoid_and_never_overflow(form, pre_scale):
    """Whichever form this machine takes (SIGMOID_BY_TANH), each computes sigmoid(z) from the
    GEMM's pre_scale * z, to rounding, and stays finite and silent where exp(-z) overflows."""
    z = np.linspace(-30, 30, 1001)
    np.testing.assert_allclose(form(np, pre_scale * z), 1 / (1 + np.exp(-z)), rtol=1e-14, atol=1e-16)
    z32 = np.array([-200.0, -90.0, 0.0, 90.0], dtype=np.float32)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        np.testing.assert_array_equal(form(np, pre_scale * z32), np.array([0, 0, 0.5, 1], np.float32))
    assert activations.SIGMOID.pre_scale == (0.5 if activations.SIGMOID_BY_TANH else -1.0)


@pytest.mark.parametrize("act", ACTS)
def test_each_derivative_is_that_of_its_forward(act):
    f = activations.get(act)
    z = np.linspace(-3, 3, 61) + 0.013  # no exact 0: relu's kink is tested on its own
    h = 1e-6
    slope = (f.forward_(np, z + h) - f.forward_(np, z - h)) / (2 * h)
    g = np.linspace(0.5, 2.0, z.size)
    got = f.delta_(np, f.forward_(np, z.copy()), g.copy())
    np.testing.assert_allclose(got, g * slope, rtol=1e-8, atol=1e-10)


def test_relu_derivative_at_exactly_zero_is_zero_as_in_pytorch():
    f = activations.get("relu")
    z = np.array([-1.0, -0.0, 0.0, 1e-300, 2.0])
    got = f.delta_(np, f.forward_(np, z.copy()), np.full(5, 3.0))
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 3.0, 3.0])
    torch = pytest.importorskip("torch")
    t = torch.tensor(z, requires_grad=True)
    torch.nn.ReLU()(t).backward(torch.full((5,), 3.0, dtype=torch.float64))
    np.testing.assert_array_equal(t.grad.numpy(), got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_in_place_is_max_with_zero_and_keeps_a_nan(dtype):
    """relu_ against its cached row of zeros (not the scalar 0): batches of two widths, a
    vector, and a NaN that must stay one (a diverged run must show)."""
    rng = np.random.default_rng(2)
    for shape in [(5, 7), (3, 7), (4, 9), (9,)]:
        z = rng.standard_normal(shape).astype(dtype)
        z.flat[1] = np.nan
        want = np.where(np.isnan(z), z, np.maximum(z, 0))
        out = activations.relu_(np, z)
        assert out is z and z.dtype == dtype
        np.testing.assert_array_equal(z, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_at_extreme_logits(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-5e3, -5e3 + 1.0, -5e3], [0.0, 0.0, 0.0]], dtype=dtype)
    y = np.eye(3, dtype=dtype)[[2, 1, 0]]  # the first row: the class with probability exp(-2e4) = 0
    out, err, row = logits.copy(), np.empty_like(logits), np.empty((3, 1), dtype=dtype)
    fn = losses.get("cross_entropy")
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # exp(-2e4) underflows to 0: fine
        value = float(fn.value_(np, out, y, err, row))
        delta = fn.delta_(np, out, y, err, row, None)
    want = 2e4 + np.log(1 + 2 * np.exp(-1.0)) + np.log(3.0)
    assert value == pytest.approx(want, rel=1e-6)
    p = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(delta, p - y, rtol=1e-6, atol=1e-7)
    assert np.isfinite(delta).all()


def test_cross_entropy_needs_two_outputs():
    with pytest.raises(config.ConfigError, match="cross_entropy needs at least 2 outputs"):
        config.load(None, ["data.name=synthetic", "model.layers=[784, 8, 1]", "model.loss=cross_entropy"])
    with pytest.raises(config.ConfigError, match="relu"):
        config.load(None, ["model.activation=softplus"])


def test_he_uniform_weights_lie_within_sqrt_6_over_fan_in_and_biases_are_zero():
    layout = model.Layout([784, 256, 10])
    he = model.init_params(layout, 0, "float64", init="he_uniform")
    glorot = model.glorot_uniform(layout, 0, "float64")
    ws, bs = model.views(he, layout, np)
    for w, (n_in, n_out) in zip(ws, [(784, 256), (256, 10)]):
        bound = np.sqrt(6 / n_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
        assert abs(w.mean()) < 0.02 * bound  # centred
    assert all(not b.any() for b in bs)
    np.testing.assert_array_equal(he, model.he_uniform(layout, 0, "float64"))
    gw = model.views(glorot, layout, np)[0]  # the same draws, another bound
    np.testing.assert_allclose(ws[0], gw[0] * np.sqrt(6 / 784) / np.sqrt(6 / (784 + 256)), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="he_uniform"):
        model.init_params(layout, 0, "float64", init="lecun")


# Whole runs: pbp_hpc against PyTorch, and pbp_hpc's step variants against each other.

def small(**over):
    base = {"model.layers": "[784, 12, 7, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 60, "data.n_test": 20, "train.epochs": 2, "train.batch_size": 13,
            "train.learning_rate": 0.3, "train.eval_every": 0, "train.progress": "false",
            "parallel.threads_per_rank": 1}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def assert_same_run(theirs, ours, atol=1e-10):
    np.testing.assert_allclose(theirs["params"], ours["params"], rtol=0, atol=atol)
    assert len(theirs["epochs"]) == len(ours["epochs"])
    for a, b in zip(theirs["epochs"], ours["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
    assert theirs["test_accuracy"] == ours["test_accuracy"]


@pytest.mark.parametrize("act,loss", PAIRS)
def test_training_equals_pytorch_in_float64(act, loss):
    framework = pytest.importorskip("pbp_hpc.framework")
    pytest.importorskip("torch")
    cfg = small(model__activation=act, model__loss=loss)
    ours = train.run(cfg, MPI.COMM_SELF, return_params=True)
    theirs = framework.run(cfg, return_params=True)
    start = model.glorot_uniform(model.Layout(cfg.model.layers), cfg.train.seed, "float64")
    assert np.abs(ours["params"] - start).max() > 1e-3, "training must have moved the parameters"
    assert_same_run(theirs, ours)


def test_framework_starts_from_he_uniform():
    framework = pytest.importorskip("pbp_hpc.framework")
    torch = pytest.importorskip("torch")
    cfg = small(model__init="he_uniform", model__activation="relu")
    layout = model.Layout(cfg.model.layers)
    net, _ = framework.build(torch, cfg, layout)
    np.testing.assert_array_equal(framework.flat_parameters(net, layout), model.he_uniform(layout, cfg.train.seed, "float64"))


def test_training_from_he_uniform_equals_pytorch():
    framework = pytest.importorskip("pbp_hpc.framework")
    pytest.importorskip("torch")
    cfg = small(model__init="he_uniform", model__activation="relu", model__loss="cross_entropy")
    assert_same_run(framework.run(cfg, return_params=True), train.run(cfg, MPI.COMM_SELF, return_params=True))


@pytest.mark.parametrize("act,loss", PAIRS)
def test_per_example_algorithm_equals_batched(act, loss):
    """The naive step (PerExampleStep) against the batched one, through whole runs; with
    momentum, so the batched run is not the fused single-rank SGD path."""
    over = {"model__activation": act, "model__loss": loss, "optimizer__name": "momentum", "train__epochs": 1}
    ref = train.run(small(**over), MPI.COMM_SELF, return_params=True)
    got = train.run(small(algorithm="per_example", **over), MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=0, atol=1e-12)
    assert got["epochs"][0]["loss"] == pytest.approx(ref["epochs"][0]["loss"], rel=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov"])  # sgd: the fused path; nesterov: gradient buffer
def test_skipping_zero_inputs_changes_nothing_but_rounding_with_relu_and_cross_entropy(mnist_dir, optimizer):
    over = {"data.name": "mnist", "data.dir": str(mnist_dir), "data.n_train": 600, "data.n_test": 100,
            "model.layers": "[784, 24, 10]", "model.activation": "relu", "model.loss": "cross_entropy",
            "model.init": "he_uniform", "train.batch_size": 50, "train.epochs": 1, "train.learning_rate": 0.05,
            "optimizer.name": optimizer}
    compact = train.run(small(**over), MPI.COMM_SELF, return_params=True)
    plain = train.run(small(**over, **{"train.skip_zero_inputs": "false"}), MPI.COMM_SELF, return_params=True)
    assert compact["active_inputs"]["compacted_steps"] > 0 and plain["active_inputs"] is None
    np.testing.assert_allclose(compact["params"], plain["params"], rtol=0, atol=1e-12)
    assert compact["test_accuracy"] == plain["test_accuracy"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["blocking", "shm", "shared_batch"])
@pytest.mark.parametrize("act,loss", [("relu", "cross_entropy"), ("tanh", "mse")])
def test_p_ranks_equal_one_rank(act, loss, reducer):
    cfg = small(model__activation=act, model__loss=loss, train__batch_size=7, parallel__reducer=reducer)
    par = train.run(cfg, MPI.COMM_WORLD, return_params=True)
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    assert par["test_accuracy"] == ref["test_accuracy"]
