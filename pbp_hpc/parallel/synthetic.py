"""The synthetic-gradient module of a decoupled pipeline stage (parallel.pipeline_schedule: decoupled).

Jaderberg et al. 2017, "Decoupled Neural Interfaces using Synthetic Gradients": a stage that is
not the last does not wait for the gradient of its output to come back from the stages above;
it predicts it from its output activations h with a small linear module,

    dL/dh  ~  g_hat = h A + c          (A: width x width, c: width)

and runs its backward pass and update with g_hat at once. A and c start at zero, as the paper
initialises its linear synthetic-gradient models, so that training begins as if the stage's
layers were frozen (their gradient is zero) and the module learns what the true gradient looks
like. When the true gradient g of a microbatch arrives from the next stage, the module takes one
step of plain gradient descent on the squared error 1/2 |g_hat - g|^2 of its rows:

    A <- A - synthetic_lr / B * h^T (g_hat - g),   c <- c - synthetic_lr / B * sum of rows (g_hat - g)

with B the global minibatch (so the rate does not depend on how the batch is cut). The error's
sums are added over the microbatches of a step and, where a stage has a data-parallel group
(D > 1), summed over that group in one Allreduce before the step is applied: the module stays
identical on every rank of the stage, as the stage's own parameters do.

With parallel.synthetic_rank r > 0 the module is low rank, A = U V (U: width x r, V: r x
width): U starts random (uniform, +-1/sqrt(width)) and V at zero, so that A is still zero at the
start but its gradient is not (U = V = 0 would be a saddle); a prediction costs 2 n width r
multiply-adds instead of n width^2, its training 4 n width r (h U again, and three products) instead of n width^2. Both U and V
take the descent step on the same squared error.

The module is not checkpointed: a resumed run starts it at zero again (the stage's layers and
their optimizer state are resumed as always; the module relearns within a few steps).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import ops


class SyntheticGradient:
    """g_hat = h A + c, trained against the true gradient; one flat buffer (A then c) and one for its gradient."""

    def __init__(self, xp: Any, width: int, dtype: Any, lr: float, data: Optional[MPI.Comm] = None,
                 rank: int = 0, seed: int = 0):
        """data: the stage's data-parallel group (its error sums are added over it), or None;
        rank: 0 for a whole width x width A, else A = U V of that rank (U from seed)."""
        self.xp, self.width, self.lr = xp, width, lr
        self.r = r = rank if 0 < rank < width else 0
        shapes = [(width, width)] if not r else [(width, r), (r, width)]
        sizes = [a * b for a, b in shapes]
        n = sum(sizes)
        self.flat = xp.zeros(n + width, dtype=dtype)  # A (or U, V) row-major, then c: A zero, as the paper
        # the error sums, in the same order, and the count of rows they came from (the global
        # minibatch, once summed over the data group: the Allreduce carries it for free)
        self.gflat = xp.zeros(n + width + 1, dtype=dtype)
        cut = [0, sizes[0], n]
        mats = [self.flat[cut[i]:cut[i + 1]].reshape(shp) for i, shp in enumerate(shapes)]
        grads = [self.gflat[cut[i]:cut[i + 1]].reshape(shp) for i, shp in enumerate(shapes)]
        self.c, self.gc, self.count = self.flat[n:], self.gflat[n:-1], self.gflat[-1:]
        if r:
            (self.U, self.V), (self.gU, self.gV) = mats, grads
            rng = np.random.default_rng(seed)
            self.U[...] = xp.asarray(rng.uniform(-1.0, 1.0, size=(width, r)) / np.sqrt(width))
            self.t = xp.zeros((1, r), dtype=dtype)  # h U of the rows being predicted or trained on
            self.eV = xp.zeros((1, r), dtype=dtype)
        else:
            (self.A,), (self.gA,) = mats, grads
        self.ones = xp.ones((1, 1), dtype=dtype)
        self.data = data if data is not None and data.size > 1 else None
        self.pending = False  # error sums added since the last apply
        self.seconds = 0.0  # time in the data group's Allreduce of the error sums
        self.sent_bytes = 0

    def predict(self, h: Any, out: Any) -> Any:
        """out <- h A + c (n x width)."""
        if not self.r:
            ops.linear_(self.xp, h, self.A, self.c, out=out)
            return out
        ops.linear_(self.xp, self._hU(h), self.V, self.c, out=out)
        return out

    def _hU(self, h: Any) -> Any:
        n = h.shape[0]
        if self.t.shape[0] < n:
            self.t = self.xp.zeros((n, self.r), dtype=self.flat.dtype)
            self.eV = self.xp.zeros((n, self.r), dtype=self.flat.dtype)
        ops.matmul(self.xp, h, self.U, out=self.t[:n])
        return self.t[:n]

    def add_error(self, h: Any, pred: Any, g: Any) -> None:
        """Add the squared error's gradient of one microbatch: pred <- pred - g (used as scratch),
        gA += h^T (pred - g), gc += sum of its rows."""
        xp, n = self.xp, h.shape[0]
        if n == 0:
            return
        pred -= g
        beta = 1.0 if self.pending else 0.0
        if self.r:  # d/dV = (h U)^T e, d/dU = h^T (e V^T)
            t, eV = self._hU(h), self.eV[:n]
            ops.gemm(xp, t.T, pred, self.gV, beta=beta)
            ops.matmul(xp, pred, self.V.T, out=eV)
            ops.gemm(xp, h.T, eV, self.gU, beta=beta)
        else:
            ops.gemm(xp, h.T, pred, self.gA, beta=beta)
        if self.ones.shape[1] < n:
            self.ones = xp.ones((1, n), dtype=self.flat.dtype)
        ops.gemm(xp, self.ones[:, :n], pred, self.gc[None, :], beta=beta)
        self.count[0] = n + (self.count[0] if self.pending else 0)
        self.pending = True

    def apply(self) -> None:
        """One descent step on the error sums added since the last (summed over the data group
        first), at synthetic_lr over the rows they came from (the global minibatch)."""
        if self.data is not None:  # every rank of the stage calls this once a step, pending or not
            if not self.pending:
                self.gflat[:] = 0
            t = time.perf_counter()
            self.data.Allreduce(MPI.IN_PLACE, self.gflat, op=MPI.SUM)
            self.seconds += time.perf_counter() - t
            self.sent_bytes += self.gflat.nbytes
            self.pending = True
        if self.pending and self.count[0] > 0 and self.lr:
            g = self.gflat[:-1]
            g *= self.lr / float(self.count[0])  # in place: no temporary of the module's size
            self.flat -= g
        self.pending = False
