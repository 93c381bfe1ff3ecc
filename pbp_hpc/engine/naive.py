"""The report's per-example backpropagation (its Algorithms 3 and 4): one example at a time.

Matrix-vector products and rank-1 updates instead of GEMMs. Kept for two reasons: it is the
report's naive baseline (`naive-serial`, and `example-parallel` when ranks share the batch),
and it is a test oracle written independently of the batched code in model.py.
Same flat layout, same loss, same summed-gradient contract as model.backward_sum.
"""

from __future__ import annotations

import numpy as np

from pbp_hpc.engine.model import Layout, views


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * np.tanh(0.5 * z) + 0.5


def example_grad_sum(
    theta: np.ndarray, layout: Layout, x: np.ndarray, y: np.ndarray, grad: np.ndarray
) -> float:
    """Add each example's gradient to `grad` (flat, zeroed by the caller); return the loss sum."""
    ws, bs = views(theta, layout, np)
    gws, gbs = views(grad, layout, np)
    loss = 0.0
    for i in range(x.shape[0]):
        acts = [x[i]]
        for w, b in zip(ws, bs):  # forward: a <- sigmoid(W^T a + b)
            acts.append(_sigmoid(acts[-1] @ w + b))
        err = acts[-1] - y[i]
        loss += 0.5 * float(err @ err)
        d = err * acts[-1] * (1 - acts[-1])
        for l in range(len(ws) - 1, -1, -1):  # backward: outer products, one layer at a time
            gws[l] += np.outer(acts[l], d)
            gbs[l] += d
            if l > 0:
                d = (ws[l] @ d) * acts[l] * (1 - acts[l])
    return loss
