"""One rank's part of a step when a tensor group of T ranks holds each layer's units in slices.

The layout is engine.tensor_layout's: (column-split, row-split) pairs, the odd last layer
replicated or split by columns (OUT: its block of outputs, then one Allgather of B x n_out makes
them whole; backward, its input gradient's partial sums take one Allreduce of B x n_in where a
layer lies below). Every rank of a tensor group takes the same examples (its data-parallel share);
the forward pass completes each pair with one Allreduce of the row-split layer's B x n_out
partial sums (the bias added by tensor rank 0 alone, before it, so once), the backward pass
sends one Allreduce of B x n_in per column-split layer that has a layer below it. The output,
the loss and the output delta are whole and bit-identical on every rank, so the softmax of
cross-entropy sees whole rows and no rank needs another's parameters.

The loss goes into the gradient buffer's extras as for every local step (each tensor rank
holds the same value; the data-parallel reducer sums over the data group only). The stop
flag, which a signal may raise on one rank alone, rides in one extra slot of the last
pair's forward Allreduce, so that every rank of the world learns of it with no message of
its own; the data-parallel reduction then counts it over the data group.

A pipeline stage held by a tensor group (parallel/pipeline_step.py) calls forward and backward
directly, with each microbatch's own activation buffers (`flat`), the delta from the stage
above (`g_out`) instead of the loss, and `g_in` for the input gradient it sends down.

Communicators are passed in (PyTorch's process-group style): `tensor` is this rank's tensor
group. Buffers are allocated once; a step allocates nothing but array views (and, with a split
output layer, the Allgather's two lists of T counts).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from pbp_hpc.data import datasets, device as device_data
from pbp_hpc.engine import activations, active_inputs, layout, losses, ops
from pbp_hpc.engine.tensor_layout import COL, OUT, ROW, ShardLayout
from pbp_hpc.parallel.reducers import STOP_SLOT
from pbp_hpc.parallel.reducers.compression import allreduce_bytes
from pbp_hpc.parallel.volumes import activation_bytes, activation_values, allgather_bytes, gathered_values  # noqa: F401  (the formulas: one place, shared with the models)

LayerDone = Callable[[int], None]


class TensorStep:
    """A tensor-parallel local step over a shard of the parameters (engine.step's interface).

    fused: plain SGD where the shard's gradient sum is complete on this rank (a data-parallel
    group of one): the update happens inside the gradient GEMMs (BLAS alpha and beta), as on
    one rank (engine.step), with no gradient buffer pass and no update pass. skip_zero_inputs:
    the first layer's GEMMs on the batch's nonzero input columns (engine.active_inputs), as on
    one rank: its weight block is W_1[:, cols_t], whose rows are gathered as theirs are.
    """

    def __init__(self, shard: ShardLayout, theta: Any, grad: Any, loss_out: Any, source: Any, xp: Any,
                 max_batch: int, layer_done: LayerDone, tensor: MPI.Comm, activation: str, loss: str,
                 fused: bool = False, skip_zero_inputs: bool = False):
        self.shard, self.theta, self.grad, self.loss, self.source, self.xp = shard, theta, grad, loss_out, source, xp
        self.tensor, self.T = tensor, tensor.size
        self.act, self.loss_fn = activations.get(activation), losses.get(loss)
        self.layer_done = layer_done
        self.applies_update = fused  # the strategy then skips the optimizer
        self.kinds = shard.kinds
        self.ws, self.bs = shard.views(theta, xp)
        self.gws, self.gbs = shard.views(grad, xp)
        self.params_grad = grad[: shard.n_params]
        self.extras = grad[shard.n_params:]
        self.rows_of = [l for l, k in enumerate(self.kinds) if k == ROW]
        self.max_batch = mb = max(1, max_batch)
        blocks = shard.widths()
        # each layer's activations on this rank: its block, but whole after a split output's Allgather
        self.widths = widths = [shard.sizes[-1] if k == OUT else w for k, w in zip(self.kinds, blocks)]
        dtype, d = theta.dtype, shard.sizes[0]
        self.carries_stop = True  # the last row-split layer's forward Allreduce carries the stop flag
        self.ends_model = True  # the last layer is the model's output (not: a pipeline stage below the last)
        # each layer's activations (then its delta), as flat buffers with one slot to spare: the
        # last row-split layer's Allreduce carries the stop flag in the slot after its n rows
        self.flat = self.activation_buffers(mb)
        self.scratch = xp.zeros((mb * max(widths),), dtype=dtype)
        if self.kinds[-1] == OUT:  # a split output layer: its block of outputs (then delta), the gathered blocks
            self.out_blocks = [layout.Part("cols", *layout.split_units(shard.sizes[-1], self.T, r)) for r in range(self.T)]
            self.block = xp.zeros((mb * blocks[-1],), dtype=dtype)
            self.gathered = xp.zeros((mb * shard.sizes[-1],), dtype=dtype)
        self.x = xp.zeros((mb, d), dtype=dtype)
        self.y = xp.zeros((mb, shard.sizes[-1]), dtype=dtype)
        self.ones = xp.ones((1, mb), dtype=dtype)
        self.row = xp.zeros((mb, 1), dtype=dtype)
        self.rows = np.arange(mb)
        self.skip = active_inputs.ActiveInputs(d, blocks[0]) if skip_zero_inputs else None
        if self.skip is not None:
            self.wc = np.empty((d + 1) * blocks[0], dtype=dtype)  # gathered rows of the first weight block, then b
            self.xc = np.empty(mb * (d + 1), dtype=dtype)  # the batch, compacted or not
            self.g0 = grad[shard.layer_slice(0)]
        self.stop_buf = np.zeros(1, dtype=np.float64)  # an empty share's own stop reduction
        self.work = self  # what evaluation reads: work.max_batch
        self.watch = contextlib.nullcontext()  # the run's stall check (parallel.stall), set by the builder
        self.seconds = 0.0  # time in the tensor group's Allreduces (communication)
        self.sent_bytes = 0  # bytes sent in them by training steps, counted
        self.steps = 0

    # -- pieces ---------------------------------------------------------------------------------
    def activation_buffers(self, rows: int) -> list[Any]:
        """Each layer's activation buffer for `rows` rows (flat, one slot to spare for the stop flag)."""
        return [self.xp.zeros((rows * w + 1,), dtype=self.theta.dtype) for w in self.widths]

    def _act(self, l: int, n: int, flat: Any = None) -> Any:
        return self.xp.reshape((self.flat if flat is None else flat)[l][: n * self.widths[l]], (n, -1))

    def _allreduce(self, buf: Any, count: bool) -> None:
        t = time.perf_counter()
        with self.watch:  # a partner stopped or hung is named, as in the data group's reduction
            self.tensor.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.seconds += time.perf_counter() - t
        if count:
            self.sent_bytes += allreduce_bytes(self.T, buf.shape[0], buf.itemsize)

    def _gather_output(self, z_block: Any, out: Any, n: int, count: bool) -> None:
        """out (n x n_out) <- every rank's block of the split output layer's columns (one Allgather)."""
        counts = [n * (p.hi - p.lo) for p in self.out_blocks]
        offsets = [n * p.lo for p in self.out_blocks]
        recv = self.gathered[: n * out.shape[1]]
        t = time.perf_counter()
        with self.watch:
            self.tensor.Allgatherv(self.block[: n * z_block.shape[1]], [recv, (counts, offsets)])
        self.seconds += time.perf_counter() - t
        if count:
            self.sent_bytes += allgather_bytes(self.T, recv.shape[0], recv.itemsize)
        for p in self.out_blocks:  # rank r's block is n x k_r, row-major, at n * lo_r
            out[:, p.lo : p.hi] = self.xp.reshape(recv[n * p.lo : n * p.hi], (n, -1))

    def forward(self, ws: list[Any], bs: list[Any], x: Any, n: int, train: bool, flat: Any = None) -> Any:
        """Every layer's activations for rows x[:n] (into flat: the step's own buffers by default);
        returns the output (whole on every rank). A bias given as None is inside the product
        (model.forward). train: the messages are counted, and the last pair's Allreduce carries
        the stop flag (where carries_stop)."""
        xp, act, last = self.xp, self.act, self.shard.n_layers - 1
        flat = self.flat if flat is None else flat
        a = x[:n, ...]
        for l, kind in enumerate(self.kinds):
            z = self._act(l, n, flat)
            activated = l < last or not self.ends_model or self.loss_fn.output_activation
            scale = act.pre_scale if activated else 1.0
            if kind == ROW:  # partial sums of the tensor group; rank 0 adds the bias, so it is added once
                ops.linear_(xp, a, ws[l], bs[l] if self.tensor.rank == 0 else None, out=z, scale=scale)
                stop = train and self.carries_stop and l == self.rows_of[-1]
                span = flat[l][: n * z.shape[1] + (1 if stop else 0)]
                if stop:
                    span[-1] = self.extras[STOP_SLOT]
                self._allreduce(span, train)
                if stop:
                    self.extras[STOP_SLOT] = span[-1]
            elif kind == OUT:  # this rank's block of the outputs (activated elementwise), then every block
                zb = xp.reshape(self.block[: n * ws[l].shape[1]], (n, -1))
                ops.linear_(xp, a, ws[l], bs[l], out=zb, scale=scale)
                if activated:
                    act.fast_forward_(xp, zb)
                self._gather_output(zb, z, n, train)
                a = z
                continue
            else:
                ops.linear_(xp, a, ws[l], bs[l], out=z, scale=scale)
            if activated:
                act.fast_forward_(xp, z)
            a = z
        return a

    def backward(self, ws: list[Any], x: Any, n: int, gws: list[Any], gbs: list[Any], scale: float,
                 first_done: LayerDone, flat: Any = None, g_out: Any = None, g_in: Any = None,
                 beta: Any = None, y: Any = None) -> Any:
        """scale x the gradient sums of this rank's parameters into gws/gbs (added to them where
        they are the parameters themselves, the fused update, or where beta is 1), and returns
        the loss sum. g_out: dL/d(output) given (a pipeline stage below the last) instead of the
        loss; g_in: where dL/d(input) goes (a stage above the first), whole on every rank;
        y: the targets (the step's own buffer by default).
        Each layer's input gradient is computed before its weights may change."""
        xp, L = self.xp, self.shard.n_layers
        flat = self.flat if flat is None else flat
        beta = (1.0 if self.applies_update else 0.0) if beta is None else beta
        a_out = self._act(L - 1, n, flat)
        loss = 0.0
        if g_out is None:
            err = xp.reshape(self.scratch[: n * a_out.shape[1]], (n, -1))
            row, y = self.row[:n, ...], (self.y if y is None else y)[:n, ...]
            loss = self.loss_fn.value_(xp, a_out, y, err, row)
            d = self.loss_fn.delta_(xp, a_out, y, err, row, self.act if self.loss_fn.output_activation else None)
        else:
            d = self.act.delta_(xp, a_out, g_out)
        for l in range(L - 1, -1, -1):
            a_in = x[:n, ...] if l == 0 else self._act(l - 1, n, flat)
            if self.kinds[l] == OUT:  # the delta is whole on every rank: this rank's columns of it
                p = self.shard.held.parts[l]
                db = xp.reshape(self.block[: n * (p.hi - p.lo)], (n, -1))
                db[...] = d[:, p.lo : p.hi]
                d = db
            back = None
            if l > 0 or g_in is not None:
                back = xp.reshape(self.scratch[: n * a_in.shape[1]], (n, -1)) if l > 0 else g_in[:n, ...]
                ops.matmul(xp, d, ws[l].T, out=back)
                if self.kinds[l] in (COL, OUT):  # partial sums over this rank's output units: the group completes them
                    self._allreduce(back.reshape(-1), True)
            ops.gemm(xp, a_in.T, d, gws[l], alpha=scale, beta=beta)
            if gbs[l] is not None:  # None: the bias's gradient came out of the GEMM above
                ops.gemm(xp, self.ones[:, :n], d, gbs[l][None, :], alpha=scale, beta=beta)
            (first_done if l == 0 else self.layer_done)(l)
            if l > 0:
                self.act.delta_(xp, a_in, back)
                d = a_in
        return loss

    # -- the local step's interface ---------------------------------------------------------------
    def __call__(self, idx: Any, scale: float = 0.0) -> None:
        """The gradient sum and loss of examples idx (with applies_update: the update, scale = -lr / B)."""
        n = idx.shape[0]
        self.steps += 1
        if n > 0:
            self._run(idx, n, scale if self.applies_update else 1.0)
        else:  # more data groups than examples: this group's share is empty
            self.params_grad[...] = 0
            self.loss[...] = 0
            for l in reversed(range(self.shard.n_layers)):
                self.layer_done(l)
        if self.T > 1 and (n == 0 or not self.rows_of):  # no forward Allreduce carried the stop flag
            self.stop_buf[0] = self.extras[STOP_SLOT]
            self._allreduce(self.stop_buf, True)
            self.extras[STOP_SLOT] = self.stop_buf[0]

    def _run(self, idx: Any, n: int, scale: float) -> None:
        xp, skip, fused = self.xp, self.skip, self.applies_update
        ws, bs = self.ws, self.bs
        gws, gbs = (ws, bs) if fused else (self.gws, self.gbs)
        cols = None
        if skip is None:
            datasets.fill_batch(self.source, idx, self.x, self.y, xp, self.rows)
            x = self.x
        else:
            cols = self.source.active_features_into(idx, self.xc, skip)
            datasets.fill_targets(self.source, idx, self.y, self.rows)
            d = self.shard.sizes[0] if cols is None else cols.shape[0] + 1
            x = self.xc[: n * d].reshape(n, d)
        if cols is None:
            self.forward(ws, bs, x, n, train=True)
            self.loss[0] = self.backward(ws, x, n, gws, gbs, scale, self.layer_done)
            return
        w0 = skip.weights(ws[0], bs[0], self.wc)  # the active rows of the first weight block, then its bias
        ws = [w0, *ws[1:]]
        self.forward(ws, [None, *bs[1:]], x, n, train=True)
        if fused:
            self.loss[0] = self.backward(ws, x, n, ws, [None, *bs[1:]], scale, self.layer_done)
            skip.put_weights(self.ws[0], self.bs[0], w0)  # the updated rows go back
        else:
            self.loss[0] = self.backward(ws, x, n, [skip.rows(self.g0), *gws[1:]], [None, *gbs[1:]], scale,
                                         self._expand_then_done)

    def _expand_then_done(self, l: int) -> None:
        self.skip.expand_gradient(self.g0)  # the compact gradient rows spread over the whole block
        self.layer_done(l)

    def complete(self, reducer: Any) -> bool:
        """After the ranks met: nothing is left to compute; True where the GEMMs applied the update."""
        return self.applies_update

    def count_correct(self, source: Any, idx: Any) -> Any:
        """How many of examples idx the model classifies correctly (collective over the tensor group)."""
        n = idx.shape[0]
        datasets.fill_batch(source, idx, self.x, self.y, self.xp, self.rows)
        pred = self.xp.argmax(self.forward(self.ws, self.bs, self.x, n, train=False), axis=1)
        return device_data.count_correct(source, pred, idx)

    def batch_x(self, n: int) -> Any:
        return self.x

    def own_bytes(self) -> int:
        return 0 if self.skip is None else self.wc.nbytes + self.xc.nbytes

    def bytes_per_step(self) -> float:
        """Activation bytes this rank sent per training step, counted (mean over the steps run)."""
        return self.sent_bytes / self.steps if self.steps else 0.0
