"""The MLP: flat parameters, and batched forward/backward that sum per-example gradients.

One contiguous parameter buffer `theta` holds every layer's weights and biases; the gradient
buffer has the same layout, so each layer's gradient is one contiguous slice (what the
overlapping reducer sends as soon as that layer is done) and the whole gradient is one buffer
(what the blocking reducer sends in one Allreduce). Layer l's block is W_l (n_in x n_out,
row-major, so a batch times W_l is a plain GEMM) followed by b_l.

The hidden activation and the loss are the config's (engine/activations.py, engine/losses.py;
the report's sigmoid and 0.5 * ||a_L - y||^2 by default). The functions here return *sums*
over the examples given, never means: ranks add their sums, then divide by the global batch
size, which is Algorithm 5 of the report.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np

from pbp_hpc.engine import activations, losses, ops
from pbp_hpc.engine.layout import Layout, take, views  # noqa: F401  (Layout, views: where they lived)
from pbp_hpc.engine.activations import Activation
from pbp_hpc.engine.losses import Loss

Array = Any


# model.init -> the bound of the uniform draw of a layer's weights, from its fan-in and fan-out
INITS: dict[str, Callable[[int, int], float]] = {
    "glorot_uniform": lambda n_in, n_out: math.sqrt(6.0 / (n_in + n_out)),  # Glorot & Bengio (2010)
    "he_uniform": lambda n_in, n_out: math.sqrt(6.0 / n_in),  # He et al. (2015), for relu
}


def init_params(layout: Layout, seed: int, dtype: str, out: Optional[np.ndarray] = None,
                init: str = "glorot_uniform") -> np.ndarray:
    """Uniform weights in [-bound, bound] (INITS[init]), zero biases, as a flat float64-drawn
    host array cast to dtype.

    Drawn on the host with numpy whatever the backend, so every backend and every rank count
    starts from bit-identical parameters for a given seed. `out`: a host array to fill
    instead (shared memory, say), so that no second copy of the model is ever allocated.
    The inits draw the same stream and differ only in the bound.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if not layout.is_whole:  # a rank's part: drawn whole and cut, so it is the 1-rank model's part
        whole = init_params(Layout(layout.sizes), seed, dtype, None, init)
        part = np.zeros(layout.n_params, dtype=dtype) if out is None else out
        take(layout, whole, part)
        return part
    bound = INITS[init]
    rng = np.random.default_rng([seed, 0x6C6F7261])  # a stream of its own, apart from the data order
    if out is None:
        theta = np.zeros(layout.n_params, dtype=dtype)
    else:
        theta = out
        theta[...] = 0
    chunk = 1 << 16  # drawn in pieces (the same stream as one draw): no float64 copy of the model
    for s, n_in, n_out in zip(layout.w_slices, layout.sizes[:-1], layout.sizes[1:]):
        limit = bound(n_in, n_out)
        for lo in range(s.start, s.stop, chunk):
            hi = min(s.stop, lo + chunk)
            theta[lo:hi] = rng.uniform(-limit, limit, size=hi - lo)  # float64 draws, rounded on assignment
    return theta


def glorot_uniform(layout: Layout, seed: int, dtype: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """init_params with the report's Glorot-uniform bound, sqrt(6 / (fan_in + fan_out))."""
    return init_params(layout, seed, dtype, out, "glorot_uniform")


def he_uniform(layout: Layout, seed: int, dtype: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """init_params with He-uniform's bound, sqrt(6 / fan_in)."""
    return init_params(layout, seed, dtype, out, "he_uniform")


def flops_per_example(sizes: list[int]) -> int:
    """GEMM flops one example needs in a training step, the count GFLOP/s is based on.

    Forward (2*n_in*n_out per layer), weight gradients (the same again), and input gradients
    for every layer but the first (nothing needs the gradient of the data). Elementwise work
    is not counted: it is not what the hardware's peak is quoted for.
    """
    pairs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2 * sum(pairs) + 2 * sum(pairs) + 2 * sum(pairs[1:])


class Workspace:
    """Buffers for one rank's largest local batch, allocated once and reused every step."""

    BLOCK_ROWS = 1024  # rows per input-gradient GEMM: what bounds the scratch for large batches

    def __init__(self, layout: Layout, max_batch: int, xp: ModuleType, dtype: Any, full_scratch: bool = False):
        """full_scratch: room for a hidden layer's incoming gradient for every row at once,
        which backward_sum(accumulate=True) needs; otherwise one block of rows."""
        self.xp = xp
        self.max_batch = max(1, max_batch)
        widths = layout.sizes[1:]
        # a_1..a_L; backward_sum overwrites each with its layer's delta, so no delta buffers
        self.acts = [xp.zeros((self.max_batch, w), dtype=dtype) for w in widths]
        self.block = self.max_batch if full_scratch else min(self.max_batch, self.BLOCK_ROWS)
        # the output error (all rows), or one block of a hidden layer's incoming gradient
        self.scratch = xp.zeros((max(self.max_batch * widths[-1], self.block * max(widths)),), dtype=dtype)
        self._scratch_views: dict[tuple[int, int], Array] = {}  # made once per shape, not per step
        self.ones = xp.ones((1, self.max_batch), dtype=dtype)  # a row: the bias gradient is ones @ delta
        self.row = xp.zeros((self.max_batch, 1), dtype=dtype)  # a number per example: softmax's max and sum
        self.x = xp.zeros((self.max_batch, layout.sizes[0]), dtype=dtype)
        self.y = xp.zeros((self.max_batch, layout.sizes[-1]), dtype=dtype)

    def scratch_like(self, n: int, width: int) -> Array:
        key = (n, width)
        if key not in self._scratch_views:
            self._scratch_views[key] = self.xp.reshape(self.scratch[: n * width], (n, width))
        return self._scratch_views[key]


SIGMOID, MSE = activations.SIGMOID, losses.MSE_LOSS  # the report's, and the defaults


def forward(xp: ModuleType, ws: list[Array], bs: list[Optional[Array]], x: Array, work: Workspace, n: int,
            act: Activation = SIGMOID, loss: Loss = MSE) -> Array:
    """Activations of every layer for the first n rows of x, into work.acts; returns the output
    (a_L, or the logits where the loss wants a linear output layer).

    Each layer takes its activation's fast form: for sigmoid, (a w + b) times pre_scale in the
    GEMM's alpha (free), then 0.5 tanh(.) + 0.5 or 1 / (1 + exp(.)) (activations.SIGMOID_BY_TANH).

    A bias given as None is folded into the layer's product: its input ends with a column of
    ones and its weights with the bias row (what active_inputs does for the first layer);
    backward_sum then takes the bias's gradient from the weight-gradient GEMM.
    """
    a = x[:n, ...]  # explicit trailing axes: the Array API has no implicit ones
    last = len(ws) - 1
    for l, (w, b) in enumerate(zip(ws, bs)):
        z = work.acts[l][:n, ...]
        if l < last or loss.output_activation:
            ops.linear_(xp, a, w, b, out=z, scale=act.pre_scale)
            act.fast_forward_(xp, z)
        else:
            ops.linear_(xp, a, w, b, out=z)
        a = z
    return a


def backward_sum(
    xp: ModuleType,
    ws: list[Array],
    gws: list[Array],
    gbs: list[Array],
    x: Array,
    y: Array,
    work: Workspace,
    n: int,
    loss_out: Array,
    layer_done: Optional[Callable[[int], None]] = None,
    scale: float = 1.0,
    accumulate: bool = False,
    act: Activation = SIGMOID,
    loss: Loss = MSE,
) -> None:
    """Summed gradients of the loss over n examples into gws/gbs, summed loss into loss_out[0].

    gws/gbs receive scale * gradient; with accumulate, it is added to what they hold. Passing
    the parameters themselves as gws/gbs with scale = -lr/B makes the SGD step happen inside
    the gradient GEMMs (BLAS's alpha and beta): a single rank then needs neither a gradient
    buffer nor an update pass. That needs ops.has_gemm(xp) and Workspace(full_scratch=True):
    each layer's input gradient is computed, for all rows, before its weights change.

    Must follow forward() on the same rows, with the same act and loss. Layers are finished
    from the top down and `layer_done(l)` is called as soon as layer l's gradient is complete,
    so a reducer can start sending it while the layers below are still being computed. The
    loss is written before the first call, so it can travel with the top layer's gradient.

    Each layer's delta overwrites that layer's activations, which are not needed once the
    delta is known: the workspace holds one batch's activations and one scratch, no deltas.
    """
    L = len(ws)
    a_out = work.acts[L - 1][:n, ...]
    err, row, y_n = work.scratch_like(n, a_out.shape[1]), work.row[:n, ...], y[:n, ...]
    loss_out[0] = loss.value_(xp, a_out, y_n, err, row)
    d = loss.delta_(xp, a_out, y_n, err, row, act if loss.output_activation else None)
    beta = 1.0 if accumulate else 0.0
    for l in range(L - 1, -1, -1):
        a_in = x[:n, ...] if l == 0 else work.acts[l - 1][:n, ...]
        back = None
        if accumulate and l > 0:  # gws[l] may be ws[l]: use the weights before they change
            back = work.scratch_like(n, a_in.shape[1])
            ops.gemm(xp, d, _t(xp, ws[l]), back)
        ops.gemm(xp, _t(xp, a_in), d, gws[l], alpha=scale, beta=beta)
        if gbs[l] is not None:  # None: the bias's gradient came out of the GEMM above (see forward)
            ops.gemm(xp, work.ones[:, :n], d, _row(xp, gbs[l]), alpha=scale, beta=beta)
        if layer_done is not None:
            layer_done(l)  # before the input gradient, so sending overlaps that GEMM
        if back is not None:
            d = act.delta_(xp, a_in, back)
        elif l > 0:  # the input gradient, in blocks of rows: at most a block of scratch at any batch size
            w_t = _t(xp, ws[l])
            for lo in range(0, n, work.block):
                hi = min(n, lo + work.block)
                back = work.scratch_like(hi - lo, a_in.shape[1])
                ops.matmul(xp, d[lo:hi, ...], w_t, out=back)
                act.delta_(xp, a_in[lo:hi, ...], back)
            d = a_in


def _row(xp: ModuleType, v: Array) -> Array:
    """A 1-D array as a 1 x n view (what a GEMM writes the bias gradient into)."""
    return v[None, :] if ops.has_out(xp) else xp.reshape(v, (1, -1))


def _t(xp: ModuleType, a: Array) -> Array:
    """Transposed view; BLAS reads it with a transpose flag, no copy."""
    if ops.has_out(xp):
        return a.T  # numpy/CuPy: the attribute, not the Python-level wrapper (a few us per call)
    return xp.matrix_transpose(a) if hasattr(xp, "matrix_transpose") else a.T


def predict_into(xp: ModuleType, ws: list[Array], bs: list[Array], x: Array, work: Workspace, n: int,
                 act: Activation = SIGMOID, loss: Loss = MSE) -> Array:
    """Predicted class of each of the first n rows (the largest output: softmax keeps the order of the logits)."""
    return xp.argmax(forward(xp, ws, bs, x, work, n, act, loss), axis=1)
