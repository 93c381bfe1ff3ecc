"""One rank's part of a step when consecutive layers live on consecutive ranks (a pipeline).

Stage s of S holds layers lo_s .. hi_s - 1 whole (engine.model's layout of that sub-network,
one flat buffer). Each share of a global minibatch is cut into M microbatches (contiguous
rows, sizes differing by at most one; an empty one is skipped by every stage alike). A
microbatch's activations travel up with MPI_Isend / MPI_Irecv, its gradients (dL/d of the
stage's input) travel down the same way, and each stage adds its layers' gradient sums over
the microbatches, so the update is the one a single rank makes.

Schedules (parallel.pipeline_schedule), both running the backward passes in microbatch order
0, 1, .., M-1 so that they add the gradients in the same order and give identical parameters:

    gpipe   every forward pass, then every backward pass: M microbatches' activations held
    1f1b    S - s - 1 forwards to fill the pipe, then one forward and one backward in turn,
            then the remaining backwards: at most min(M, S) microbatches' activations held
    decoupled  a stage that is not the last runs each microbatch's forward and, at once, its
            backward with a synthetic gradient of its output (parallel/synthetic.py), never
            waiting for the stages above; the true gradients come back with nonblocking
            receives, each trains the synthetic module when it has arrived (tested after each
            microbatch; the rest waited for at the step's end). The last stage runs as 1f1b.
            With parallel.synthetic_every k, only microbatches 0, k, 2k, .. of a step send their
            input gradient down (the others skip the GEMM that makes it).
            Not the one-rank update: the stages below the last follow their synthetic gradient.

The loss (on the last stage) and the stop flag reach every stage in one Allreduce of the two
extras over the pipeline group at the end of the step. Communicators are passed in.

With a tensor group (a grid of T x S ranks per model), each stage's layers are split over the
stage's T ranks as engine/tensor_layout.py splits a whole network, and a microbatch's forward
and backward pass through the stage are parallel/tensor_step.TensorStep's, on the slot's own
buffers. A stage's output is whole on every tensor rank (its last layer is row-split, or its
odd last layer replicated or split with its outputs gathered), so tensor rank t of stage s
sends to tensor rank t of stage s + 1 (the pipeline communicator joins exactly those) and gets
the delta back; a stage whose first layer is column-split (or a split odd layer) completes its
input gradient's partial sums over the tensor group before sending it down. The end-of-step
Allreduce of the extras then runs over the model group (T x S ranks; the loss from tensor rank
0 only), so that a stop flag on any rank reaches all.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from pbp_hpc.data import datasets, device as device_data
from pbp_hpc.engine import activations, losses, model, ops
from pbp_hpc.parallel.strategies.base import my_share

LayerDone = Callable[[int], None]


class _Slot:
    """The buffers of one microbatch in flight on this stage."""

    def __init__(self, xp: Any, rows: int, n_in: int, widths: list[int], dtype: Any, tp: Any = None,
                 synthetic: bool = False):
        self.x = xp.zeros((rows, n_in), dtype=dtype)  # this stage's input: the data, or what came from below
        # the layers' activations: whole (engine.model's layers) or, in a tensor group, the tensor step's flat buffers
        self.acts = [xp.zeros((rows, w), dtype=dtype) for w in widths] if tp is None else None
        self.flat = None if tp is None else tp.activation_buffers(rows)
        self.g_out = xp.zeros((rows, widths[-1]), dtype=dtype)  # dL/d(output), from the stage above
        self.g_in = xp.zeros((rows, n_in), dtype=dtype)  # dL/d(input), sent to the stage below
        self.y = xp.zeros((rows, widths[-1]), dtype=dtype)  # targets (last stage)
        self.sent: Any = None  # the Isend of this microbatch's output, to finish before its delta overwrites it
        if synthetic:  # decoupled: the output kept for the module, its prediction, the true gradient
            self.h = xp.zeros((rows, widths[-1]), dtype=dtype)
            self.pred = xp.zeros((rows, widths[-1]), dtype=dtype)
            self.g_true = xp.zeros((rows, widths[-1]), dtype=dtype)


class PipelineStep:
    """A pipeline stage's local step (engine.step's interface): the gradient sums of its layers."""

    applies_update = False
    skip = None

    def __init__(self, layout: Any, theta: Any, grad: Any, loss_out: Any, source: Any, xp: Any,
                 max_batch: int, layer_done: LayerDone, pipe: MPI.Comm, first_layer: int, n_layers: int,
                 microbatches: int, schedule: str, activation: str, loss: str, tp: Any = None,
                 extras_comm: Any = None, synthetic: Any = None, synthetic_every: int = 1):
        """tp: the stage's tensor step (TensorStep over its layers' shard) where a tensor group holds
        the stage; extras_comm: the communicator of the end-of-step extras (the model group then);
        synthetic: the stage's synthetic-gradient module (schedule decoupled, a stage below the last)."""
        self.layout, self.theta, self.grad, self.loss, self.source, self.xp = layout, theta, grad, loss_out, source, xp
        self.pipe, self.s, self.S = pipe, pipe.rank, pipe.size
        self.first_layer, self.global_last = first_layer, first_layer + layout.n_layers == n_layers
        self.M, self.schedule = microbatches, schedule
        self.act, self.loss_fn = activations.get(activation), losses.get(loss)
        self.layer_done = layer_done
        if tp is None:
            self.ws, self.bs = model.views(theta, layout, xp)
            self.gws, self.gbs = model.views(grad, layout, xp)
        self.extras = grad[layout.n_params:]
        self.rows_per = rows = max(1, -(-max(1, max_batch) // microbatches))  # a microbatch's rows at most
        slots = microbatches if schedule in ("gpipe", "decoupled") else min(microbatches, self.S)
        self.synthetic = synthetic if schedule == "decoupled" and not self.global_last else None
        self.every = synthetic_every
        dtype = theta.dtype
        self.tp = tp
        self.extras_comm = pipe if extras_comm is None else extras_comm
        if tp is not None:  # the tensor step's layers end the model only on the last stage
            tp.ends_model, tp.carries_stop = self.global_last, False
            tp.layer_done = _nothing  # the reducer hears of the layers once a step, below
        self.slots = [_Slot(xp, rows, layout.sizes[0], layout.sizes[1:], dtype, tp, self.synthetic is not None)
                      for _ in range(slots)]
        self.scratch = xp.zeros((rows * max(layout.sizes),), dtype=dtype)
        self.ones = xp.ones((1, rows), dtype=dtype)
        self.row = xp.zeros((rows, 1), dtype=dtype)
        self.rows = np.arange(rows)
        self.max_batch = rows  # evaluation's chunks: one microbatch's buffers
        self.work = self
        self.watch = contextlib.nullcontext()  # the run's stall check (parallel.stall), set by the builder
        self.wait_s = 0.0  # time waiting for the neighbours' messages
        self.sent_bytes = 0
        self.steps = 0
        self._pending: list[Any] = []  # sends of gradients not known to be finished

    @property
    def seconds(self) -> float:
        """Time in this stage's messages: the neighbours' and, in a tensor group, the group's."""
        return (self.wait_s + (self.tp.seconds if self.tp is not None else 0.0)
                + (self.synthetic.seconds if self.synthetic is not None else 0.0))

    # -- arithmetic of one microbatch --------------------------------------------------------------
    def _forward(self, slot: _Slot, n: int, train: bool = True) -> Any:
        if self.tp is not None:
            return self.tp.forward(self.tp.ws, self.tp.bs, slot.x, n, train, flat=slot.flat)
        xp, act = self.xp, self.act
        a = slot.x[:n]
        last = self.layout.n_layers - 1
        for l in range(self.layout.n_layers):
            z = slot.acts[l][:n]
            activated = not (self.global_last and l == last) or self.loss_fn.output_activation
            ops.linear_(xp, a, self.ws[l], self.bs[l], out=z, scale=act.pre_scale if activated else 1.0)
            if activated:
                act.fast_forward_(xp, z)
            a = z
        return a

    def _backward(self, slot: _Slot, n: int, beta: float, input_grad: bool = True) -> float:
        """Gradient sums of this microbatch added (beta 1) or written (beta 0) into grad; dL/d(input)
        into slot.g_in where a stage lies below. Returns the microbatch's loss sum (last stage) or 0."""
        if self.tp is not None:
            tp = self.tp
            return float(tp.backward(tp.ws, slot.x, n, tp.gws, tp.gbs, 1.0, _nothing, flat=slot.flat,
                                     g_out=None if self.global_last else slot.g_out[:n],
                                     g_in=slot.g_in if self.s > 0 else None, beta=beta, y=slot.y))
        xp, L = self.xp, self.layout.n_layers
        a_out = slot.acts[L - 1][:n]
        loss = 0.0
        if self.global_last:
            err = xp.reshape(self.scratch[: n * a_out.shape[1]], (n, -1))
            row, y = self.row[:n], slot.y[:n]
            loss = float(self.loss_fn.value_(xp, a_out, y, err, row))
            d = self.loss_fn.delta_(xp, a_out, y, err, row, self.act if self.loss_fn.output_activation else None)
        else:
            d = self.act.delta_(xp, a_out, slot.g_out[:n])
        for l in range(L - 1, -1, -1):
            a_in = slot.x[:n] if l == 0 else slot.acts[l - 1][:n]
            if l > 0:
                back = xp.reshape(self.scratch[: n * a_in.shape[1]], (n, -1))
                ops.matmul(xp, d, self.ws[l].T, out=back)
            elif self.s > 0 and input_grad:
                ops.matmul(xp, d, self.ws[0].T, out=slot.g_in[:n])
            ops.gemm(xp, a_in.T, d, self.gws[l], beta=beta)
            ops.gemm(xp, self.ones[:, :n], d, self.gbs[l][None, :], beta=beta)
            if l > 0:
                self.act.delta_(xp, a_in, back)
                d = a_in
        return loss

    # -- messages ------------------------------------------------------------------------------
    def _wait(self, req: Any) -> None:
        t = time.perf_counter()
        with self.watch:  # a neighbour stopped or hung is named, as in the data group's reduction
            req.Wait()
        self.wait_s += time.perf_counter() - t

    def _send(self, buf: Any, dest: int, tag: int) -> Any:
        self.sent_bytes += buf.nbytes
        return self.pipe.Isend(buf, dest=dest, tag=tag)

    # -- the local step's interface ---------------------------------------------------------------
    def __call__(self, idx: Any, scale: float = 0.0) -> None:
        self.steps += 1
        n = idx.shape[0]
        bounds = [my_share(n, self.M, m) for m in range(self.M)]
        micro = [m for m, (lo, hi) in enumerate(bounds) if hi > lo]
        if not micro:
            self.grad[: self.layout.n_params] = 0
            self.loss[0] = 0.0
            if self.synthetic is not None:  # (its data group's Allreduce: every rank, every step)
                self.synthetic.apply()
        elif self.synthetic is not None:
            self.loss[0] = self._decoupled(idx, bounds, micro)
        else:
            self.loss[0] = self._schedule(idx, bounds, micro)
        for l in reversed(range(self.layout.n_layers)):
            self.layer_done(l)
        if self.tp is not None and self.tp.tensor.rank > 0:  # the loss once per model: tensor rank 0's
            self.loss[0] = 0.0
        if self.S > 1:  # the loss (last stage) and the stop flags, to every stage (and tensor rank)
            t = time.perf_counter()
            with self.watch:
                self.extras_comm.Allreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)
            self.wait_s += time.perf_counter() - t

    def _schedule(self, idx: Any, bounds: list[tuple[int, int]], micro: list[int]) -> float:
        K = len(self.slots)
        recvs: dict[tuple[str, int], Any] = {}
        up, down = self.s + 1 < self.S, self.s > 0

        def post(i: int) -> None:  # the receives of the i-th microbatch, into its slot
            m, slot = micro[i], self.slots[i % K]
            rows = bounds[m][1] - bounds[m][0]
            if down:
                recvs["x", i] = self.pipe.Irecv(slot.x[:rows], source=self.s - 1, tag=2 * m)
            if up:
                recvs["g", i] = self.pipe.Irecv(slot.g_out[:rows], source=self.s + 1, tag=2 * m + 1)

        def forward(i: int) -> None:
            m, slot = micro[i], self.slots[i % K]
            lo, hi = bounds[m]
            part = idx[lo:hi]
            if down:
                self._wait(recvs.pop(("x", i)))
            else:
                datasets.fill_batch(self.source, part, slot.x, slot.y, self.xp, self.rows)
            if not up:
                datasets.fill_targets(self.source, part, slot.y, self.rows)
            out = self._forward(slot, hi - lo)
            if up:
                slot.sent = self._send(out, self.s + 1, 2 * m)

        loss = 0.0

        def backward(i: int) -> None:
            nonlocal loss
            m, slot = micro[i], self.slots[i % K]
            rows = bounds[m][1] - bounds[m][0]
            if up:
                self._wait(recvs.pop(("g", i)))
                self._wait(slot.sent)  # (delivered already: the gradient of it came back)
            wanted = self._returns(i)  # (decoupled: only the microbatches whose true gradient trains a module)
            loss += self._backward(slot, rows, 0.0 if i == 0 else 1.0, wanted)
            if down and wanted:
                self._pending.append(self._send(slot.g_in[:rows], self.s - 1, 2 * m + 1))
            if i + K < len(micro):
                self._finish_sends()  # the slot's g_in is reused by microbatch i + K
                post(i + K)

        for i in range(min(K, len(micro))):
            post(i)
        n_micro = len(micro)
        if self.schedule == "gpipe":
            for i in range(n_micro):
                forward(i)
            for i in range(n_micro):
                backward(i)
        else:
            warm = min(self.S - self.s - 1, n_micro)
            for i in range(warm):
                forward(i)
            for i in range(n_micro - warm):
                forward(warm + i)
                backward(i)
            for i in range(n_micro - warm, n_micro):
                backward(i)
        self._finish_sends()
        return loss

    def _decoupled(self, idx: Any, bounds: list[tuple[int, int]], micro: list[int]) -> float:
        """A stage below the last, schedule decoupled: each microbatch forward, sent up, and
        backward with the synthetic gradient at once; the true gradients train the module as
        they arrive. One slot per microbatch (its output is kept until its true gradient came)."""
        sg, down = self.synthetic, self.s > 0
        xs, gs, trained = [], {}, 0
        for i, m in enumerate(micro):  # every receive posted at once: a slot per microbatch
            slot, (lo, hi) = self.slots[i], bounds[m]
            if down:
                xs.append(self.pipe.Irecv(slot.x[:hi - lo], source=self.s - 1, tag=2 * m))
            if self._returns(i):
                gs[i] = self.pipe.Irecv(slot.g_true[:hi - lo], source=self.s + 1, tag=2 * m + 1)
        back = sorted(gs)  # the microbatches whose true gradient comes back, in order

        def train(j: int) -> None:  # the j-th microbatch's true gradient has arrived
            slot, (lo, hi) = self.slots[j], bounds[micro[j]]
            sg.add_error(slot.h[:hi - lo], slot.pred[:hi - lo], slot.g_true[:hi - lo])

        for i, m in enumerate(micro):
            slot, (lo, hi) = self.slots[i], bounds[m]
            n = hi - lo
            if down:
                self._wait(xs[i])
            else:
                datasets.fill_batch(self.source, idx[lo:hi], slot.x, slot.y, self.xp, self.rows)
            out = self._forward(slot, n)
            slot.h[:n] = out  # sent from this copy: the backward pass overwrites `out`
            self._pending.append(self._send(slot.h[:n], self.s + 1, 2 * m))
            sg.predict(slot.h[:n], slot.pred[:n])
            slot.g_out[:n] = slot.pred[:n]  # (the backward pass uses its incoming gradient as scratch)
            self._backward(slot, n, 0.0 if i == 0 else 1.0, self._returns(i))
            if down and self._returns(i):
                self._pending.append(self._send(slot.g_in[:n], self.s - 1, 2 * m + 1))
            while trained < len(back) and back[trained] <= i and gs[back[trained]].Test():  # those here so far
                train(back[trained])
                trained += 1
        for j in back[trained:]:  # the rest, at the step's end
            self._wait(gs[j])
            train(j)
        sg.apply()
        self._finish_sends()
        return 0.0

    def _returns(self, i: int) -> bool:
        """Whether the i-th microbatch's input gradient goes down to the stage below: always, but
        in the decoupled schedule only one microbatch in parallel.synthetic_every (it only trains
        the module below, and the GEMM that makes it is then saved too)."""
        return self.schedule != "decoupled" or i % self.every == 0

    def _finish_sends(self) -> None:
        if self._pending:
            t = time.perf_counter()
            with self.watch:
                MPI.Request.Waitall(self._pending)
            self.wait_s += time.perf_counter() - t
            self._pending = []

    def complete(self, reducer: Any) -> bool:
        """After the ranks met: nothing is left to compute; True where the GEMMs applied the update."""
        return self.applies_update

    def count_correct(self, source: Any, idx: Any) -> Any:
        """How many of examples idx the model classifies correctly (collective over the pipeline)."""
        n, slot = idx.shape[0], self.slots[0]
        if self.s == 0:
            datasets.fill_batch(source, idx, slot.x, slot.y, self.xp, self.rows)
        else:
            self.pipe.Recv(slot.x[:n], source=self.s - 1, tag=0x7E)
        out = self._forward(slot, n, train=False)
        correct = 0
        if self.s + 1 < self.S:
            self.pipe.Send(out, dest=self.s + 1, tag=0x7E)
        else:
            correct = int(device_data.count_correct(source, self.xp.argmax(out, axis=1), idx))
        return self.pipe.bcast(correct, root=self.S - 1)

    def batch_x(self, n: int) -> Any:
        return self.slots[0].x

    def own_bytes(self) -> int:
        return 0

    def bytes_per_step(self) -> float:
        """Activation bytes this rank sent per training step, counted: to its neighbours, and in its tensor group."""
        sent = self.sent_bytes + (self.tp.sent_bytes if self.tp is not None else 0)
        return sent / self.steps if self.steps else 0.0

    def synthetic_bytes(self) -> dict[str, float]:
        """Schedule decoupled: the bytes a step of the synthetic module's data-group Allreduce sends."""
        if self.schedule != "decoupled":
            return {}
        sent = self.synthetic.sent_bytes if self.synthetic is not None else 0
        return {"synthetic_module": sent / self.steps if self.steps else 0.0}


def _nothing(l: int) -> None:
    """A layer_done that does nothing (the pipeline tells the reducer once a step)."""
