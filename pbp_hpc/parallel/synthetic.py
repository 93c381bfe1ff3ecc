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

The module is not checkpointed: a resumed run starts it at zero again (the stage's layers and
their optimizer state are resumed as always; the module relearns within a few steps).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from mpi4py import MPI

from pbp_hpc.engine import ops


class SyntheticGradient:
    """g_hat = h A + c, trained against the true gradient; one flat buffer (A then c) and one for its gradient."""

    def __init__(self, xp: Any, width: int, dtype: Any, lr: float, data: Optional[MPI.Comm] = None):
        """data: the stage's data-parallel group (its error sums are added over it), or None."""
        self.xp, self.width, self.lr = xp, width, lr
        self.flat = xp.zeros(width * width + width, dtype=dtype)  # A (row-major) then c: zero, as the paper
        self.A = self.flat[: width * width].reshape(width, width)
        self.c = self.flat[width * width:]
        # the error sums, in the same order, and the count of rows they came from (the global
        # minibatch, once summed over the data group: the Allreduce carries it for free)
        self.gflat = xp.zeros(self.flat.shape[0] + 1, dtype=dtype)
        self.gA = self.gflat[: width * width].reshape(width, width)
        self.gc = self.gflat[width * width: -1]
        self.count = self.gflat[-1:]
        self.ones = xp.ones((1, 1), dtype=dtype)
        self.data = data if data is not None and data.size > 1 else None
        self.pending = False  # error sums added since the last apply
        self.seconds = 0.0  # time in the data group's Allreduce of the error sums
        self.sent_bytes = 0

    def predict(self, h: Any, out: Any) -> Any:
        """out <- h A + c (n x width)."""
        ops.linear_(self.xp, h, self.A, self.c, out=out)
        return out

    def add_error(self, h: Any, pred: Any, g: Any) -> None:
        """Add the squared error's gradient of one microbatch: pred <- pred - g (used as scratch),
        gA += h^T (pred - g), gc += sum of its rows."""
        xp, n = self.xp, h.shape[0]
        if n == 0:
            return
        pred -= g
        beta = 1.0 if self.pending else 0.0
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
