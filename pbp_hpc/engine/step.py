"""One rank's part of a training step: the summed gradient and loss of its examples.

The variant is chosen once per run (make_local_step), and each owns its buffers:

    BatchedStep      the report's batched GEMMs; the gradient sum into the gradient buffer
    CompactedStep    the same, the first layer on the batch's nonzero input columns only
                     (active_inputs: ~20% less work on MNIST); image data on the CPU
    PerExampleStep   the naive baseline, one example at a time
    fused=True       one rank, plain SGD: the update happens inside the gradient GEMMs
                     (BLAS alpha/beta), so there is no gradient buffer pass and no update pass

A share with no examples (more ranks than examples in a batch) contributes zeros. Every variant
calls layer_done(l) as soon as layer l's gradient is final (from the top layer down), so a
reducer may send it while the layers below are computed. The loss sum is written first.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pbp_hpc.data import datasets, device as device_data
from pbp_hpc.engine import activations, active_inputs, losses, model, naive, ops, shared_batch
from pbp_hpc.protocols import LocalStep, Reducer

LayerDone = Callable[[int], None]


class BatchedStep:
    """Batched forward and backward passes over a Workspace sized for this rank's largest share."""

    def __init__(self, layout: model.Layout, theta: Any, grad: Any, loss_out: Any, source: Any, xp: Any,
                 max_batch: int, layer_done: LayerDone, fused: bool = False,
                 activation: str = "sigmoid", loss: str = "mse"):
        self.layout, self.theta, self.grad, self.loss, self.source, self.xp = layout, theta, grad, loss_out, source, xp
        self.activation, self.loss_name = activation, loss  # model.activation, model.loss
        self.act, self.loss_fn = activations.get(activation), losses.get(loss)
        self.applies_update = fused  # the caller must then skip the optimizer for this step
        self.layer_done = layer_done
        self.ws, self.bs = model.views(theta, layout, xp)
        self.gws, self.gbs = model.views(grad, layout, xp)
        self.params_grad = grad[: layout.n_params]
        self.work = model.Workspace(layout, max_batch, xp, theta.dtype, full_scratch=fused)
        self.rows = np.arange(self.work.max_batch)  # for the one-hot scatter, made once

    def complete(self, reducer: Any) -> bool:
        """After the ranks met: nothing is left to compute; True where the GEMMs applied the update."""
        return self.applies_update

    def __call__(self, idx: Any, scale: float = 0.0) -> None:
        """The gradient sum and loss of examples idx into the gradient buffer.

        scale: -lr / B, used only where applies_update (the update is made in the GEMMs).
        """
        if idx.shape[0] == 0:
            self.params_grad[...] = 0
            self.loss[...] = 0
            for l in reversed(range(self.layout.n_layers)):
                self.layer_done(l)
            return
        self.run(idx, scale)

    def run(self, idx: Any, scale: float) -> None:
        n = idx.shape[0]
        datasets.fill_batch(self.source, idx, self.work.x, self.work.y, self.xp, self.rows)
        model.forward(self.xp, self.ws, self.bs, self.work.x, self.work, n, self.act, self.loss_fn)
        self.backward(self.ws, self.bs, self.work.x, n, scale, self.gws, self.gbs, self.layer_done)

    def backward(self, ws: list[Any], bs: list[Any], x: Any, n: int, scale: float,
                 gws: list[Any], gbs: list[Any], layer_done: LayerDone) -> None:
        if self.applies_update:  # gradients of ws land in ws itself: theta += scale * gradient, in the GEMMs
            model.backward_sum(self.xp, ws, ws, bs, x, self.work.y, self.work, n, self.loss, layer_done,
                               scale=scale, accumulate=True, act=self.act, loss=self.loss_fn)
        else:
            model.backward_sum(self.xp, ws, gws, gbs, x, self.work.y, self.work, n, self.loss, layer_done,
                               act=self.act, loss=self.loss_fn)

    def batch_x(self, n: int) -> Any:
        """An n x d buffer for a batch of inputs (evaluation fills it)."""
        return self.work.x

    def own_bytes(self) -> int:
        """Bytes of the buffers this variant holds beside the workspace (the benchmark's memory budget)."""
        return 0

    def count_correct(self, source: Any, idx: Any) -> Any:
        """How many of examples idx the current parameters classify correctly (a device scalar on a GPU)."""
        x = self.batch_x(self.work.max_batch)
        datasets.fill_batch(source, idx, x, self.work.y, self.xp, self.rows)
        pred = model.predict_into(self.xp, self.ws, self.bs, x, self.work, idx.shape[0], self.act, self.loss_fn)
        return device_data.count_correct(source, pred, idx)


class PerExampleStep(BatchedStep):
    """The naive implementation: each example's gradient on its own, summed (no batched GEMMs)."""

    def run(self, idx: Any, scale: float) -> None:
        n = idx.shape[0]
        datasets.fill_batch(self.source, idx, self.work.x, self.work.y, self.xp, self.rows)
        self.params_grad[...] = 0
        self.loss[0] = naive.example_grad_sum(self.theta, self.layout, self.work.x[:n], self.work.y[:n], self.params_grad,
                                              self.activation, self.loss_name)
        for l in reversed(range(self.layout.n_layers)):
            self.layer_done(l)


class CompactedStep(BatchedStep):
    """BatchedStep with the first layer on the batch's active input columns (see active_inputs).

    Owns the compacted batch (n x (k + 1), its last column ones, which carry the first layer's
    bias inside its GEMMs) and the gathered rows of W_1 (then b_1). With several ranks the first
    layer's compact gradient is written into that layer's part of the gradient buffer and
    spread over its rows there, in place, before layer_done(0) lets the reducer read it.
    """

    def __init__(self, layout: model.Layout, theta: Any, grad: Any, loss_out: Any, source: Any, xp: Any,
                 max_batch: int, layer_done: LayerDone, fused: bool = False,
                 activation: str = "sigmoid", loss: str = "mse"):
        super().__init__(layout, theta, grad, loss_out, source, xp, max_batch, layer_done, fused, activation, loss)
        d, h = layout.sizes[0], layout.sizes[1]
        self.skip = active_inputs.ActiveInputs(d, h)
        self.wc = np.empty((d + 1) * h, dtype=theta.dtype)  # gathered W_1 rows and b_1
        self.xc = np.empty(self.work.max_batch * (d + 1), dtype=theta.dtype)  # the batch, compacted or not
        self.g1 = grad[layout.layer_slice(0)]

        def expanding(l: int) -> None:  # made once: the hook that spreads the compact gradient first
            if l == 0:
                self.skip.expand_gradient(self.g1)
            layer_done(l)

        self.layer_done_expanding = expanding

    def run(self, idx: Any, scale: float) -> None:
        n, xp, skip = idx.shape[0], self.xp, self.skip
        cols = self.source.active_features_into(idx, self.xc, skip)
        datasets.fill_targets(self.source, idx, self.work.y, self.rows)
        if cols is None:  # too many active columns to pay: the plain step on the full batch
            x = self.batch_x(n)
            model.forward(xp, self.ws, self.bs, x, self.work, n, self.act, self.loss_fn)
            self.backward(self.ws, self.bs, x, n, scale, self.gws, self.gbs, self.layer_done)
            return
        x = self.xc[: n * (cols.shape[0] + 1)].reshape(n, cols.shape[0] + 1)
        ws = [skip.weights(self.ws[0], self.bs[0], self.wc), *self.ws[1:]]
        bs = [None, *self.bs[1:]]
        model.forward(xp, ws, bs, x, self.work, n, self.act, self.loss_fn)
        if self.applies_update:
            self.backward(ws, bs, x, n, scale, ws, bs, self.layer_done)
            skip.put_weights(self.ws[0], self.bs[0], ws[0])  # the updated rows go back into W_1
            return
        gws = [skip.rows(self.g1), *self.gws[1:]]
        self.backward(ws, bs, x, n, scale, gws, [None, *self.gbs[1:]], self.layer_done_expanding)

    def batch_x(self, n: int) -> Any:
        d = self.layout.sizes[0]
        return self.xc[: n * d].reshape(n, d)

    def own_bytes(self) -> int:
        return self.wc.nbytes + self.xc.nbytes


def make_local_step(cfg: Any, layout: model.Layout, theta: Any, reducer: Reducer, source: Any, xp: Any,
                    max_batch: int, may_fuse: bool) -> LocalStep:
    """The variant for this configuration and data (see the module docstring), with its
    activation and loss (model.activation, model.loss), writing into the reducer's buffer.

    The one place that decides whether the update happens inside the GEMMs (the step's
    applies_update): may_fuse says the strategy and the optimizer allow it (Strategy.fusable and
    Optimizer.fusable); then one rank fuses where can_fuse says so, and a node's ranks that
    compute each batch together (the reducer's node_batch, engine.shared_batch) fuse where they
    are every rank of the run."""
    f = {"activation": cfg.model.activation, "loss": losses.of(cfg.model)}
    skip = xp is np and cfg.train.skip_zero_inputs and datasets.has_active_features(source)
    grad, loss_out = reducer.grad, reducer.loss_out
    node = reducer.node_batch(max_batch)
    if node is not None:
        return shared_batch.SharedBatchStep(layout, theta, loss_out, source, node, **f, skip_zero_inputs=skip,
                                            fused=may_fuse and reducer.one_node)
    fused = may_fuse and can_fuse(cfg, reducer.comm.size, xp, max_batch)
    if cfg.algorithm == "per_example":
        return PerExampleStep(layout, theta, grad, loss_out, source, xp, max_batch, reducer.layer_done, **f)
    if skip:
        return CompactedStep(layout, theta, grad, loss_out, source, xp, max_batch, reducer.layer_done, fused, **f)
    return BatchedStep(layout, theta, grad, loss_out, source, xp, max_batch, reducer.layer_done, fused, **f)


def can_fuse(cfg: Any, world_size: int, xp: Any, max_batch: int) -> bool:
    """Whether one rank's update may happen inside the GEMMs: one rank, a BLAS callable with
    alpha/beta, and a batch whose full-batch scratch costs no more memory than the gradient
    buffer it saves (Workspace.BLOCK_ROWS)."""
    return (world_size == 1 and cfg.algorithm == "batched" and ops.has_gemm(xp)
            and max_batch <= model.Workspace.BLOCK_ROWS)
