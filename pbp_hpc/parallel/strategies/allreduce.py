"""Algorithm 5 of the report: every step, the ranks' gradient sums are added and every rank
applies the same update.

Each rank takes its contiguous share of the global minibatch, computes the sum of its
examples' gradients (and loss), the reducer adds the sums over ranks, and the optimizer
applies lr / B times the sum to the spans the reducer gives this rank. Parameters thus stay
identical on every rank without ever being broadcast, and P ranks compute what one rank
computes with the same global batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import time
from typing import Any, ContextManager, Optional

from pbp_hpc.engine.backend import to_host
from pbp_hpc.engine.ema import WeightAverage
from pbp_hpc.parallel.reducers import LOSS_SLOT, STOP_SLOT
from pbp_hpc.parallel.strategies.base import Strategy, my_share


class AllreduceStrategy(Strategy):
    name = "allreduce"
    sums_gradients = True
    fusable = True

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        super().attach(local, reducer, optimizer)
        self.extras = reducer.extras
        optimizer.node_sum = reducer.slice_sum()  # per-layer norms over the node's slices (lars, lamb)
        self.ema: Optional[WeightAverage] = None
        if self.cfg.train.ema_decay:  # a buffer shaped like theta, shared where theta is (collective)
            self.ema = WeightAverage(self.cfg.train.ema_decay, self.theta, reducer.state_buffer(), reducer.spans(),
                                     self.xp, reducer.updated)

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        B = gidx.shape[0]
        lo, hi = my_share(B, self.comm.size, self.comm.rank)
        self.extras[STOP_SLOT] = 1.0 if stop else 0.0
        t0, c0, in_comm = time.perf_counter(), self.compute_s, self.reducer.seconds
        self.compute(gidx[lo:hi], at[2], -lr / B)  # this rank's gradient sum (and its chores)
        if self.noise is not None:  # the gradient noise scale: this rank's norm rides in the extras
            self.noise.before(at[2], hi - lo)
        self.reducer.finish()  # the ranks meet: the extras are global, the shares sum to the gradient
        extras = to_host(self.extras)  # the one host sync per step: loss and stop flag
        if self.noise is not None:
            self.noise.after(extras, B)
        self.check(float(extras[LOSS_SLOT]), at[0], at[1])
        if not self.local.complete(self.reducer):  # shared_batch's phase 2; True: the GEMMs applied the update
            self.update(lr, B)
        self.reducer.updated()  # every rank sees the new parameters before its next forward pass
        # all but the communication counts as compute, wherever it ran (overlap's sends in the
        # backward pass, shm's sums in the update): an epoch's parts then add up (parallel/accounting.py)
        self.compute_s = c0 + (time.perf_counter() - t0) - (self.reducer.seconds - in_comm)
        return float(extras[LOSS_SLOT]), int(extras[STOP_SLOT])

    def update(self, lr: float, batch: int) -> None:
        """The same update on every rank: each applies the optimizer to the spans the reducer gives it."""
        t = time.perf_counter()
        self.optimizer.apply_all(self.reducer.shares(), lr, batch)
        if self.reducer.sums_in_update:  # the summation an Allreduce would do, fused with the update
            self.reducer.seconds += time.perf_counter() - t
        if self.ema is not None:  # (computation: not in the reducer's time)
            self.ema.update()

    def evaluated(self) -> ContextManager[None]:
        return super().evaluated() if self.ema is None else self.ema.swapped()

    def state(self) -> dict[str, Any]:
        return {**super().state(), **(self.ema.state() if self.ema is not None else {})}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        # lars, lamb under shm/shared_batch: the per-layer norms' reductions over the node's ranks
        for key in ("slice_sums", "slice_sum_bytes"):
            if getattr(self.reducer, key, 0):
                out[key] = getattr(self.reducer, key)
        return out
