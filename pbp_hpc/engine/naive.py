"""The report's per-example backpropagation (its Algorithms 3 and 4): one example at a time.

Matrix-vector products and rank-1 updates instead of GEMMs. Kept for two reasons: it is the
report's naive baseline (`naive-serial`, and `example-parallel` when ranks share the batch),
and it is a test oracle written independently of the batched code in model.py: no workspace,
no GEMM tricks, each activation's plain form (activations.Activation.forward_, not the fused
fast form model.forward takes). Same flat layout, same activations and losses, same
summed-gradient contract as model.backward_sum.
"""

from __future__ import annotations

import numpy as np

from pbp_hpc.engine import activations, losses
from pbp_hpc.engine.model import Layout, views


def example_grad_sum(
    theta: np.ndarray, layout: Layout, x: np.ndarray, y: np.ndarray, grad: np.ndarray,
    activation: str = "sigmoid", loss: str = "mse",
) -> float:
    """Add each example's gradient to `grad` (flat, zeroed by the caller); return the loss sum."""
    act, fn = activations.get(activation), losses.get(loss)
    out_act = act if fn.output_activation else None
    ws, bs = views(theta, layout, np)
    gws, gbs = views(grad, layout, np)
    total = 0.0
    err, row = np.empty((1, layout.sizes[-1]), dtype=theta.dtype), np.empty((1, 1), dtype=theta.dtype)
    for i in range(x.shape[0]):
        acts = [x[i]]
        for l, (w, b) in enumerate(zip(ws, bs)):  # forward: a <- f(W^T a + b), the output layer as the loss says
            z = acts[-1] @ w + b
            acts.append(act.forward_(np, z) if (l < len(ws) - 1 or out_act is not None) else z)
        out, target = acts[-1][None, :], y[i][None, :]  # one row: the loss's kernels work on rows
        total += float(fn.value_(np, out, target, err, row))
        d = fn.delta_(np, out, target, err, row, out_act)[0]
        for l in range(len(ws) - 1, -1, -1):  # backward: outer products, one layer at a time
            gws[l] += np.outer(acts[l], d)
            gbs[l] += d
            if l > 0:
                d = act.delta_(np, acts[l], ws[l] @ d)  # acts[l] becomes the delta: no longer needed
    return total
