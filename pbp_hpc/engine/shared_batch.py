"""One node's minibatch computed by its ranks together (parallel.reducer: shared_batch).

Plain data parallelism at a small batch spends the cores on memory traffic: at B = 128 on 2
ranks, each rank's weight-gradient GEMMs have an inner dimension of 64 and write a whole
gradient (7.4 MB for Net-2h), which the reducer then reads back to add it up. Here the ranks of
a node split a step's work two ways:

  1. forward and back: each rank runs the forward pass and the backward deltas of its own rows
     of the batch, into node-shared buffers (activations A_l and deltas D_l, one row per
     example of the node's batch, each rank at a fixed offset);
  2. weight gradients: after a barrier, each rank computes the gradient of its own slice of
     every layer (rows of W_l, columns of b_l) over all the node's rows at once,
         dW_l[rows_k] = A_{l-1}[:, rows_k]^T D_l,        db_l[cols_k] = 1^T D_l[:, cols_k],
     so the sum over the node's examples happens inside the GEMM (inner dimension: the node's
     batch) and each gradient value is written once, by the rank that updates it.

With plain SGD on one node (fused), phase 2 adds -lr/B times each slice's gradient straight
into the parameters (the GEMMs' alpha and beta, as one rank's fused step does): no gradient
buffer is written and there is no update pass.

The result is the same sum as every other reducer's, up to the order of floating-point adds.
A rank whose share is short (the epoch's last batch) zeroes its unused rows, which then add
nothing. The parameters themselves are the reducer's node-shared copy: a barrier after the
deltas (no rank changes a weight another still reads) and one after the update bracket phase 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from pbp_hpc.data import datasets, device as device_data
from pbp_hpc.engine import activations, active_inputs, losses, model, ops

Array = Any


def spans(layout: model.Layout, parts: int, part: int) -> list[tuple[int, slice, slice]]:
    """Part `part` of `parts` of every layer: (layer, its rows of W_l, its columns of b_l), as
    index ranges within the layer. Contiguous rows of a row-major W_l are a contiguous span of
    the flat buffer, so each becomes one optimizer span."""
    out = []
    for l, (n_in, n_out) in enumerate(zip(layout.sizes[:-1], layout.sizes[1:])):
        rows = slice(n_in * part // parts, n_in * (part + 1) // parts)
        cols = slice(n_out * part // parts, n_out * (part + 1) // parts)
        out.append((l, rows, cols))
    return out


def flat_span(layout: model.Layout, l: int, rows: slice, cols: slice) -> tuple[slice, slice]:
    """Where a layer's rows of W and columns of b lie in the flat parameter buffer."""
    n_out = layout.sizes[l + 1]
    w0, b0 = layout.w_slices[l].start, layout.b_slices[l].start
    return slice(w0 + rows.start * n_out, w0 + rows.stop * n_out), slice(b0 + cols.start, b0 + cols.stop)


@dataclass
class NodeBatch:
    """The node-shared buffers of a step (made by the reducer, in its shared windows).

    x: the node's inputs (rows x d); acts[l]: layer l's activations; deltas[l]: layer l's
    deltas (the top layer's overwrite its activations, which phase 2 does not read). Rank k of
    the node's P owns rows k*m .. k*m + m, m the largest share.
    """

    x: Array
    acts: list[Array]
    deltas: list[Array]
    rows_per_rank: int
    offset: int  # where this rank's rows start
    part: int  # this rank's index among the node's ranks (which slice of every layer it computes)
    parts: int


def node_buffers(layout: model.Layout, rows_per_rank: int, part: int, parts: int,
                 shared: Callable[[int], np.ndarray]) -> NodeBatch:
    """A NodeBatch in buffers from shared(n) (n values, node-shared, zeroed; collective)."""
    K = rows_per_rank * parts
    x = shared(K * layout.sizes[0]).reshape(K, layout.sizes[0])
    acts = [shared(K * w).reshape(K, w) for w in layout.sizes[1:]]
    deltas = [shared(K * w).reshape(K, w) for w in layout.sizes[1:-1]] + [acts[-1]]
    return NodeBatch(x, acts, deltas, rows_per_rank, part * rows_per_rank, part, parts)


class SharedBatchStep:
    """The local step over a NodeBatch: phase 1 on call, phase 2 in complete() (weight_gradients)."""

    applies_update = False

    def __init__(self, layout: model.Layout, theta: Array, loss_out: Array, source: Any, node: NodeBatch,
                 activation: str = "sigmoid", loss: str = "mse", skip_zero_inputs: bool = False, fused: bool = False):
        self.layout, self.theta, self.loss, self.source, self.node = layout, theta, loss_out, source, node
        self.act, self.loss_fn = activations.get(activation), losses.get(loss)
        self.ws, self.bs = model.views(theta, layout, np)
        m, lo = node.rows_per_rank, node.offset
        self.x = node.x[lo : lo + m]
        # this rank's rows of the node's activations: what model.forward writes into (evaluation too)
        self.work = SimpleNamespace(acts=[a[lo : lo + m] for a in node.acts], max_batch=m)
        self.own_deltas = [d[lo : lo + m] for d in node.deltas]
        dtype = theta.dtype
        self.y = np.zeros((m, layout.sizes[-1]), dtype=dtype)
        self.err = np.zeros((m, layout.sizes[-1]), dtype=dtype)
        self.row = np.zeros((m, 1), dtype=dtype)
        self.block = min(m, model.Workspace.BLOCK_ROWS)  # the input gradient in blocks of rows, as backward_sum
        self.back = np.zeros(self.block * max(layout.sizes[1:]), dtype=dtype)
        self.rows = np.arange(m)
        self.ones = np.ones((1, m * node.parts), dtype=dtype)
        self.slices = spans(layout, node.parts, node.part)
        self.fused, self.scale = fused, 0.0
        # fused: phase 2 writes into this rank's slices of the parameters themselves
        self.own_params = [(self.ws[l][rows], self.bs[l][None, cols]) for l, rows, cols in self.slices]
        # train.skip_zero_inputs: the first layer's gradient rows only for the input columns that
        # are nonzero somewhere in the node's batch (the others' rows are exactly zero)
        self.skip_zero_inputs = skip_zero_inputs
        if skip_zero_inputs:
            r = self.slices[0][1].stop - self.slices[0][1].start
            self.active = np.zeros(r, dtype=bool)
            self.colsum = np.zeros(r, dtype=dtype)
            self.xc = np.empty(m * node.parts * r, dtype=dtype)
            self.gc = np.empty(r * layout.sizes[1], dtype=dtype)
            # only its counters (compacted steps, columns kept: the run's `active_inputs`), for this rank's slice
            self.skip = active_inputs.ActiveInputs(r, layout.sizes[1])

    def __call__(self, idx: Any, scale: float = 0.0) -> None:
        """Phase 1: this rank's rows of activations and deltas, and its loss sum.

        scale: -lr / B, kept for phase 2 where the update is fused."""
        n = idx.shape[0]
        self.scale = scale
        if n < self.node.rows_per_rank:  # rows past this share add nothing in phase 2
            for d in self.own_deltas:
                d[n:] = 0
        if n == 0:
            self.loss[...] = 0
            return
        datasets.fill_batch(self.source, idx, self.x, self.y, np, self.rows)
        a_out = model.forward(np, self.ws, self.bs, self.x, self.work, n, self.act, self.loss_fn)
        err, row = self.err[:n], self.row[:n]
        self.loss[0] = self.loss_fn.value_(np, a_out, self.y[:n], err, row)
        d = self.loss_fn.delta_(np, a_out, self.y[:n], err, row, self.act if self.loss_fn.output_activation else None)
        for l in range(self.layout.n_layers - 1, 0, -1):
            d_in = self.own_deltas[l - 1][:n]
            d_in[...] = self.work.acts[l - 1][:n]  # the activations stay for phase 2; the delta replaces a copy
            w_t = self.ws[l].T
            width = d_in.shape[1]
            for lo in range(0, n, self.block):
                hi = min(n, lo + self.block)
                back = self.back[: (hi - lo) * width].reshape(hi - lo, width)
                ops.matmul(np, d[lo:hi], w_t, out=back)
                self.act.delta_(np, d_in[lo:hi], back)
            d = d_in

    def count_correct(self, source: Any, idx: Any) -> Any:
        """How many of examples idx (at most rows_per_rank) the current parameters classify
        correctly, computed in this rank's rows of the node's buffers."""
        datasets.fill_batch(source, idx, self.x, self.y, np, self.rows)
        pred = model.predict_into(np, self.ws, self.bs, self.x, self.work, idx.shape[0], self.act, self.loss_fn)
        return device_data.count_correct(source, pred, idx)

    def own_bytes(self) -> int:
        """Bytes this rank holds beside the node-shared buffers (the benchmark's memory budget)."""
        return self.y.nbytes + self.err.nbytes + self.row.nbytes + self.back.nbytes + self.ones.nbytes

    def complete(self, reducer: Any) -> bool:
        """Phase 2, after the ranks met (every rank's phase 1 is in the node's buffers): this rank's
        slices of the gradient over all the node's rows, into the reducer's, summed across nodes
        by it; True where fused (the update is applied already)."""
        if self.weight_gradients(reducer.views):
            return True
        reducer.sum_across()
        return False

    def weight_gradients(self, out: list[tuple[Array, Array]]) -> bool:
        """Phase 2 (after every rank's phase 1): this rank's slice of each layer's gradient,
        summed over the node's rows, into out[i] = (W rows x n_out, 1 x b columns); or, where
        fused, scale times it added to the parameters' slices. True where the update is done."""
        node, fused = self.node, self.fused
        alpha, beta = (self.scale, 1.0) if fused else (1.0, 0.0)
        for (l, rows, cols), (gw, gb), (w, b) in zip(self.slices, out, self.own_params):
            if fused:
                gw, gb = w, b
            a_in = node.x if l == 0 else node.acts[l - 1]
            d = node.deltas[l]
            if l == 0 and self.skip_zero_inputs and gw.size:
                self.first_layer_active(a_in[:, rows], d, gw, alpha, beta)
            elif gw.size:
                ops.gemm(np, a_in[:, rows].T, d, gw, alpha=alpha, beta=beta)
            if gb.size:
                ops.gemm(np, self.ones, d[:, cols], gb, alpha=alpha, beta=beta)
        return fused

    def first_layer_active(self, x: Array, d: Array, gw: Array, alpha: float, beta: float) -> None:
        """gw = alpha x^T d + beta gw, on the columns of x that are nonzero in some row only:
        elsewhere that product is zero (gw's rows there: zeroed, or left as they are for beta 1).

        Data that is compacted is nonnegative (uint8 images, scaled), so a column is active
        where its sum is positive: one GEMV, where np.any would make a boolean per element.
        The active columns are gathered run by run (MNIST's come in runs along image rows;
        numpy's take along a row-major array's columns is several times slower) into one
        compact GEMM, whose rows are then put back."""
        K = x.shape[0]
        sums = self.colsum[: x.shape[1]].reshape(1, -1)
        ops.gemm(np, self.ones[:, :K], x, sums)
        np.greater(sums[0], 0, out=self.active)
        cols = np.flatnonzero(self.active)
        k = cols.shape[0]
        if k > active_inputs.MAX_ACTIVE * x.shape[1]:
            ops.gemm(np, x.T, d, gw, alpha=alpha, beta=beta)
            return
        if k == 0:
            if beta == 0.0:
                gw[...] = 0
            return
        self.skip.steps += 1
        self.skip.kept += k
        xc = self.xc[: K * k].reshape(K, k)
        starts = np.flatnonzero(np.diff(cols) != 1) + 1
        bounds = [0, *starts.tolist(), k]
        runs = [(int(cols[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]  # (column, from, to) in xc
        for c, a, b in runs:
            xc[:, a:b] = x[:, c : c + b - a]
        gc = self.gc[: k * gw.shape[1]].reshape(k, gw.shape[1])
        ops.gemm(np, xc.T, d, gc, alpha=alpha)
        end = 0
        for c, a, b in runs:  # each run's rows back in place (added for beta 1), zeros between runs
            if beta == 0.0:
                gw[end:c] = 0
                gw[c : c + b - a] = gc[a:b]
            else:
                gw[c : c + b - a] += gc[a:b]
            end = c + b - a
        if beta == 0.0:
            gw[end:] = 0
