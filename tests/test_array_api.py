"""One code path: the model, backprop, update and the device data path are written against an
array namespace, so they run unchanged under array_api_strict and give numpy's answer.

array_api_strict refuses everything outside the standard (numpy arrays mixed in, implicit
trailing axes, out-of-bounds slices, `out=`), so a numpy-only call in the hot path fails
here before it fails on a GPU. In float64 the results must match numpy to 1e-12.
"""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config
from pbp_hpc.engine import activations, losses, model
from pbp_hpc import train
from helpers import REPORT_SETUP

xs = pytest.importorskip("array_api_strict", reason="array_api_strict is in the test extra: pip install .[test]")

WORLD = MPI.COMM_WORLD


def small(**over):
    base = {**REPORT_SETUP,
        "model.layers": "[784, 24, 10]", "model.dtype": "float64", "data.name": "synthetic",
        "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.5,
        "train.batch_size": 16, "train.eval_every": 1, "train.progress": "false",
    }
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


ACTS, LOSSES = activations.names(), losses.names()


def grad_and_loss(xp, sizes, n, max_batch, act="sigmoid", loss="mse"):
    """Forward + backward + prediction on namespace xp; results as numpy."""
    layout = model.Layout(sizes)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-1, 1, (n, sizes[0])), np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    f, l = activations.get(act), losses.get(loss)
    theta = xp.asarray(model.glorot_uniform(layout, 1, "float64"))
    ws, bs = model.views(theta, layout, xp)
    grad = xp.zeros((layout.n_params,), dtype=xp.float64)
    gws, gbs = model.views(grad, layout, xp)
    work = model.Workspace(layout, max_batch, xp, xp.float64)
    work.x[:n, ...], work.y[:n, ...] = xp.asarray(x), xp.asarray(y)
    loss_sum, seen = xp.zeros((1,), dtype=xp.float64), []
    model.forward(xp, ws, bs, work.x, work, n, f, l)
    model.backward_sum(xp, ws, gws, gbs, work.x, work.y, work, n, loss_sum, seen.append, act=f, loss=l)
    pred = model.predict_into(xp, ws, bs, work.x, work, n, f, l)
    return np.asarray(grad), float(loss_sum[0]), np.asarray(pred), seen


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sizes,n,max_batch", [([20, 16, 12, 10], 7, 7), ([30, 10], 5, 9), ([12, 8, 8, 8, 4], 1, 4)])
def test_forward_backward_under_the_strict_namespace_equal_numpy(sizes, n, max_batch, act, loss):
    ref = grad_and_loss(np, sizes, n, max_batch, act, loss)
    got = grad_and_loss(xs, sizes, n, max_batch, act, loss)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12, atol=1e-14)
    assert got[1] == pytest.approx(ref[1], rel=1e-12)
    np.testing.assert_array_equal(got[2], ref[2])
    assert got[3] == ref[3]


def test_training_under_the_strict_namespace_equals_numpy():
    """The whole loop: device-resident data, device order, staged reducer, update, evaluation."""
    cfg = small(**{"train.shuffle": "false", "model.layers": "[784, 16, 12, 10]"})
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    got = train.run(cfg, MPI.COMM_SELF, return_params=True, xp=xs)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-12, atol=1e-14)
    assert [e["loss"] for e in got["epochs"]] == pytest.approx([e["loss"] for e in ref["epochs"]], rel=1e-12)
    assert [e["val_accuracy"] for e in got["epochs"]] == [e["val_accuracy"] for e in ref["epochs"]]
    assert got["test_accuracy"] == ref["test_accuracy"]
    assert got["gpu_reducer"] in ("staged", "cuda-aware") and "gpu_reducer" not in ref


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_training_with_each_activation_and_loss_under_the_strict_namespace_equals_numpy(act, loss):
    cfg = small(**{"model.activation": act, "model.loss": loss, "optimizer.name": "nesterov", "train.epochs": 1,
                   "train.shuffle": "false", "train.learning_rate": 0.1})  # unshuffled: the device path draws another order
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    got = train.run(cfg, MPI.COMM_SELF, return_params=True, xp=xs)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-12, atol=1e-14)
    assert got["epochs"][0]["loss"] == pytest.approx(ref["epochs"][0]["loss"], rel=1e-12)
    assert got["test_accuracy"] == ref["test_accuracy"]


def numpy_only(fn, *arrays):
    """fn computed by numpy on copies, written back: the strict namespace refuses the mix."""
    def kernel(xp, *args):
        args[0][...] = fn(*(np.asarray(a) for a in args))  # np.* on strict arrays: a numpy array comes back
        return args[0]
    return kernel


CANARIES = {  # a kernel of the hot path, by the config that takes it
    # the forward pass's fast sigmoid, whichever form this machine takes (activations.SIGMOID_BY_TANH)
    "sigmoid": (activations, "tanh_sigmoid_", lambda z: 0.5 * np.tanh(z) + 0.5) if activations.SIGMOID_BY_TANH
    else (activations, "exp_sigmoid_", lambda z: 1 / (1 + np.exp(z))),
    "tanh": (activations, "tanh_delta_", lambda a, g: g * (1 - a * a)),
    "relu": (activations, "relu_", lambda z: np.maximum(z, 0)),
    "cross_entropy": (losses, "log_softmax_", lambda z, p, row: z),
}


@pytest.mark.parametrize("case", list(CANARIES))
def test_a_numpy_only_call_in_the_hot_path_fails_under_the_strict_namespace(monkeypatch, case):
    """The canary: the strict tests above would catch a kernel that bypasses the namespace."""
    module, name, fn = CANARIES[case]
    monkeypatch.setattr(module, name, numpy_only(fn))
    over = {"model.loss": "cross_entropy"} if case == "cross_entropy" else {"model.activation": case}
    with pytest.raises((TypeError, ValueError)):
        train.run(small(**{"train.epochs": 1, **over}), MPI.COMM_SELF, xp=xs)


def test_shuffled_strict_training_learns():
    res = train.run(small(**{"train.epochs": 3}), MPI.COMM_SELF, xp=xs)
    losses = [e["loss"] for e in res["epochs"]]
    assert losses[-1] < losses[0]


@pytest.mark.mpi(min_size=2)
def test_strict_namespace_on_p_ranks_equals_one_rank_with_the_device_order():
    """Every rank draws the same device-side order and the staged reducer sums correctly:
    otherwise examples would be skipped or repeated and the P-rank run would drift."""
    cfg = small(**{"train.batch_size": 7})
    par = train.run(cfg, WORLD, return_params=True, xp=xs)
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True, xp=xs)
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    assert par["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.mpi(min_size=2)
def test_strict_namespace_on_p_ranks_equals_numpy_on_p_ranks():
    cfg = small(**{"train.shuffle": "false", "train.batch_size": 10})
    got = train.run(cfg, WORLD, return_params=True, xp=xs)
    ref = train.run(cfg, WORLD, return_params=True)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-12, atol=1e-14)
