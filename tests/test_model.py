"""The batched backprop is the gradient of the loss: checked against the per-example code and finite differences."""

import numpy as np
import pytest

from pbp_hpc.engine import model
from pbp_hpc.engine import naive


def _problem(sizes, n, seed=1, dtype=np.float64):
    layout = model.Layout(sizes)
    theta = model.glorot_uniform(layout, seed, "float64").astype(dtype)
    rng = np.random.default_rng(seed)
    x = rng.random((n, sizes[0])).astype(dtype)
    y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]
    return layout, theta, x, y


def batched_grad(layout, theta, x, y, max_batch=None):
    n = x.shape[0]
    ws, bs = model.views(theta, layout, np)
    grad = np.zeros(layout.n_params, dtype=theta.dtype)
    gws, gbs = model.views(grad, layout, np)
    work = model.Workspace(layout, max_batch or n, np, theta.dtype)
    work.x[:n], work.y[:n] = x, y
    loss = np.zeros(1, dtype=theta.dtype)
    model.forward(np, ws, bs, work.x, work, n)
    model.backward_sum(np, ws, gws, gbs, work.x, work.y, work, n, loss)
    return grad, float(loss[0])


def loss_of(layout, theta, x, y):
    ws, bs = model.views(theta, layout, np)
    work = model.Workspace(layout, x.shape[0], np, theta.dtype)
    work.x[: x.shape[0]] = x
    a = model.forward(np, ws, bs, work.x, work, x.shape[0])
    return 0.5 * float(((a - y) ** 2).sum())


@pytest.mark.parametrize("sizes", [[5, 3], [6, 4, 3], [7, 5, 4, 3]])
def test_batched_gradient_matches_finite_differences_in_float64(sizes):
    layout, theta, x, y = _problem(sizes, n=4)
    grad, _ = batched_grad(layout, theta, x, y)
    eps = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        fd[i] = (loss_of(layout, theta + e, x, y) - loss_of(layout, theta - e, x, y)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n", [1, 7, 32])
def test_batched_gradient_equals_per_example_sum(n):
    layout, theta, x, y = _problem([20, 16, 12, 10], n=n)
    grad, loss = batched_grad(layout, theta, x, y)
    ref = np.zeros_like(theta)
    ref_loss = naive.example_grad_sum(theta, layout, x, y, ref)
    np.testing.assert_allclose(grad, ref, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(ref_loss, rel=1e-12)


def test_a_smaller_batch_in_a_larger_workspace_uses_only_its_rows():
    layout, theta, x, y = _problem([8, 6, 4], n=5)
    small, _ = batched_grad(layout, theta, x, y)
    padded, _ = batched_grad(layout, theta, x, y, max_batch=64)
    np.testing.assert_array_equal(small, padded)


def test_float32_gradient_agrees_with_float64_to_single_precision():
    layout, theta, x, y = _problem([30, 20, 10], n=16)
    g64, _ = batched_grad(layout, theta, x, y)
    g32, _ = batched_grad(layout, theta.astype(np.float32), x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


def test_layer_done_is_called_top_down_once_per_layer():
    layout, theta, x, y = _problem([6, 5, 4, 3], n=3)
    ws, bs = model.views(theta, layout, np)
    grad = np.zeros(layout.n_params)
    gws, gbs = model.views(grad, layout, np)
    work = model.Workspace(layout, 3, np, np.float64)
    work.x[:3], work.y[:3] = x, y
    seen = []
    model.forward(np, ws, bs, work.x, work, 3)
    model.backward_sum(np, ws, gws, gbs, work.x, work.y, work, 3, np.zeros(1), seen.append)
    assert seen == [2, 1, 0]


def test_layout_is_one_contiguous_block_per_layer():
    layout = model.Layout([784, 1024, 10])
    assert layout.n_params == 784 * 1024 + 1024 + 1024 * 10 + 10
    assert layout.layer_slice(0) == slice(0, 784 * 1024 + 1024)
    assert layout.layer_slice(1).stop == layout.n_params


def test_glorot_uniform_weights_lie_within_the_limit_and_biases_are_zero():
    layout = model.Layout([784, 1024, 10])
    theta = model.glorot_uniform(layout, 0, "float32")
    ws, bs = model.views(theta, layout, np)
    assert np.abs(ws[0]).max() <= np.sqrt(6 / (784 + 1024))
    assert np.abs(ws[0]).max() > 0.9 * np.sqrt(6 / (784 + 1024))
    assert all(not b.any() for b in bs)
    np.testing.assert_array_equal(theta, model.glorot_uniform(layout, 0, "float32"))


def test_flop_count_is_forward_plus_weight_gradients_plus_hidden_input_gradients():
    # Net-1h: 2*(784*1024 + 1024*10) forward, the same for weight gradients, 2*1024*10 input gradients
    f = 2 * (784 * 1024 + 1024 * 10)
    assert model.flops_per_example([784, 1024, 10]) == 2 * f + 2 * 1024 * 10


def test_input_gradient_in_row_blocks_equals_one_block(monkeypatch):
    """Batches above Workspace.BLOCK_ROWS take the input gradient in blocks; the sum is unchanged
    up to rounding: smaller GEMMs may take other BLAS kernels, which add in another order (seen
    here: a quarter of the float64 entries differ, by at most 1.2e-15 relative). The loss comes
    from the output error, before any block, so it is bit for bit the same."""
    layout, theta, x, y = _problem([20, 16, 12, 10], n=37)
    assert theta.dtype == np.float64
    whole, loss = batched_grad(layout, theta, x, y)
    monkeypatch.setattr(model.Workspace, "BLOCK_ROWS", 5)
    assert model.Workspace(layout, 37, np, np.float64).block == 5  # 8 blocks, the last one short
    blocked, loss_b = batched_grad(layout, theta, x, y)
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=0)
    assert loss_b == loss
