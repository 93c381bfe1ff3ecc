"""Local SGD: each rank takes k steps on its own shares, then the ranks average their parameters.

Rank r's local minibatches are its shares of the global minibatches (the same data per epoch
as allreduce), and each local step is the optimizer's update from that share alone, lr over
the mean share's size (the minibatch's size / P, its own size when P divides the minibatch). Every `parallel.local_steps` = k global steps, and at every block's end
(the epoch's end, an evaluation), one Allreduce averages the parameters and the optimizer's
state, which live packed in one buffer [parameters | state... | loss, stop] so that one
collective moves them all, the loss and the stop requests riding along. Optimizer state thus
lives on every worker and is averaged with the parameters.

With k = 1 it computes what allreduce computes (up to rounding) for sgd, momentum and
nesterov alike, whatever the batch: their updates are linear in the
gradient, so the average of the ranks' updates is the update of the average gradient.
With k > 1 there are k times fewer collectives, at the price of ranks drifting apart between
averages.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import ops, optimizers
from pbp_hpc.errors import DivergenceError
from pbp_hpc.parallel.strategies.base import BlockResult, LrOf, StopOf, Strategy, my_share

_LOSS, _STOP = 0, 1  # the extras after the parameters and state


class LocalSGD(Strategy):
    name = "local_sgd"

    def __init__(self, cfg: Any, comm: Any, xp: Any):
        super().__init__(cfg, comm, xp)
        self.k = cfg.parallel.local_steps
        self.n_state = len(optimizers.OPTIMIZERS.load(cfg.optimizer.name).state_names)
        self.averages = 0
        self.comm_seconds = 0.0

    def parameters(self, reducer: Any, fill: Callable[[Any], Any]) -> Any:
        n = reducer.n
        self.packed = np.zeros(n * (1 + self.n_state) + 2, dtype=reducer.dtype)
        self.averaged = self.packed[: n * (1 + self.n_state)]
        self.extras = self.packed[n * (1 + self.n_state) :]
        self._handed = 0
        theta = self.packed[:n]
        fill(theta)
        return theta

    def state_buffer(self, reducer: Any) -> Callable[[], Any]:
        n = reducer.n

        def next_buffer() -> Any:
            self._handed += 1
            if self._handed > self.n_state:
                raise RuntimeError(f"optimizer {self.cfg.optimizer.name} asked for more state buffers than its "
                                   f"state_names ({self.n_state}) say")
            return self.packed[n * self._handed : n * (self._handed + 1)]

        return next_buffer

    def block_end(self, first: int, limit: int, steps: int, epoch: int) -> int:
        g = epoch * steps + first
        return min(limit, first + self.k - g % self.k)  # averages after global steps k-1, 2k-1, ...

    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: LrOf, stop_of: StopOf
                  ) -> BlockResult:
        B, n_train, P, r = self.cfg.train.batch_size, order.shape[0], self.comm.size, self.comm.rank
        stop = False
        for s in range(first, end):
            g = epoch * steps + s
            stop = stop_of(g) or stop
            lo_s, hi_s = s * B, min((s + 1) * B, n_train)
            lo, hi = my_share(hi_s - lo_s, P, r)
            tc = time.perf_counter()
            self.local(order[lo_s + lo : lo_s + hi])
            if self.after_local is not None:
                self.after_local(g)
            self.extras[_LOSS] += self.loss[0]
            # the update from this share alone, scaled as if by a mean share (the minibatch's size / P):
            # the average of the ranks' updates is then allreduce's, whether or not P divides it
            self.optimizer.apply(self.whole, [self.grad], lr_of(g), (hi_s - lo_s) / P)
            self.straggler.after(g, time.perf_counter() - tc)
            self.compute_s += time.perf_counter() - tc
        examples = min(end * B, n_train) - first * B
        self._average(epoch, end - 1, stop)
        loss, stop_ranks = float(self.extras[_LOSS]), int(self.extras[_STOP])
        self.extras[...] = 0
        return loss, examples, end, stop_ranks

    def _average(self, epoch: int, step: int, stop: bool) -> None:
        """One Allreduce: parameters and state averaged, the losses summed, the stop requests counted."""
        self.extras[_STOP] = 1.0 if stop else 0.0
        t = time.perf_counter()
        if self.comm.size > 1:
            self.reducer.watch.enter()
            try:
                self.comm.Allreduce(MPI.IN_PLACE, self.packed, op=MPI.SUM)
            finally:
                self.reducer.watch.leave()
            ops.scale_(self.xp, 1.0 / self.comm.size, self.averaged)
        self.comm_seconds += time.perf_counter() - t
        self.averages += 1
        loss = float(self.extras[_LOSS])
        if not math.isfinite(loss):
            raise DivergenceError(f"training diverged at epoch {epoch} step {step}: loss is {loss} "
                                  f"(learning rate is likely too high)", epoch, step)

    @property
    def comm_s(self) -> float:
        return self.comm_seconds

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "local_steps": self.k, "averages": self.averages}
