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

import time
from typing import Any, Callable

import numpy as np

from pbp_hpc.engine import ops, optimizers
from pbp_hpc.parallel.strategies.base import BlockResult, LrOf, StopOf, Strategy, every_k, mean_share, share_indices

_LOSS, _STOP = 0, 1  # the extras after the parameters and state


class LocalSGD(Strategy):
    name = "local_sgd"
    keys = ("local_steps",)
    host_only = True

    def __init__(self, cfg: Any, grid: Any, xp: Any):
        super().__init__(cfg, grid, xp)
        self.k = cfg.parallel.local_steps
        self.n_state = len(optimizers.OPTIMIZERS.load(cfg.optimizer.name).state_names)
        self.averages = 0

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
        return every_k(self.k, first, limit, steps, epoch)  # averages after global steps k-1, 2k-1, ...

    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: LrOf, stop_of: StopOf
                  ) -> BlockResult:
        B, P, r = self.cfg.train.batch_size, self.comm.size, self.comm.rank
        stop = False
        for s in range(first, end):
            g = epoch * steps + s
            stop = stop_of(g) or stop
            # the update from this share alone, scaled as if by a mean share (the minibatch's size / P):
            # the average of the ranks' updates is then allreduce's, whether or not P divides it
            self.compute(share_indices(order, B, s, r, P), g, lr=lr_of(g), batch=mean_share(order, B, s, P))
            self.extras[_LOSS] += self.loss[0]
        examples = min(end * B, order.shape[0]) - first * B
        self._average(stop)
        loss, stop_ranks = float(self.extras[_LOSS]), int(self.extras[_STOP])
        self.extras[...] = 0
        self.check(loss, epoch, end - 1)
        return loss, examples, end, stop_ranks

    def _average(self, stop: bool) -> None:
        """One Allreduce: parameters and state averaged, the losses summed, the stop requests counted."""
        from mpi4py import MPI

        self.extras[_STOP] = 1.0 if stop else 0.0
        t = time.perf_counter()
        if self.comm.size > 1:
            with self.watch:
                self.comm.Allreduce(MPI.IN_PLACE, self.packed, op=MPI.SUM)
            ops.scale_(self.xp, 1.0 / self.comm.size, self.averaged)
        self.exchange_s += time.perf_counter() - t
        self.averages += 1

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "averages": self.averages}
