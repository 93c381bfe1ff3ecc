"""Algorithm 5 of the report: every step, the ranks' gradient sums are added and every rank
applies the same update.

Each rank takes its contiguous share of the global minibatch, computes the sum of its
examples' gradients (and loss), the reducer adds the sums over ranks, and the optimizer
applies lr / B times the sum to the spans the reducer gives this rank. Parameters thus stay
identical on every rank without ever being broadcast, and P ranks compute what one rank
computes with the same global batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import math
import time
from typing import Any, ContextManager, Optional

from pbp_hpc.engine.backend import to_host
from pbp_hpc.engine.ema import WeightAverage
from pbp_hpc.errors import DivergenceError
from pbp_hpc.parallel import gpu
from pbp_hpc.parallel.reducers.base import LOSS_SLOT, STOP_SLOT
from pbp_hpc.parallel.strategies.base import Strategy, my_share


class AllreduceStrategy(Strategy):
    name = "allreduce"
    fusable = True

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        super().attach(local, reducer, optimizer)
        self.extras = reducer.extras
        self.sync = gpu.stream_sync(self.xp)  # GPU kernels run asynchronously: compute time must hold them
        optimizer.node_sum = reducer.slice_sum()  # per-layer norms over the node's slices (lars, lamb)
        self.ema: Optional[WeightAverage] = None
        if self.cfg.train.ema_decay:  # a buffer shaped like theta, shared where theta is (collective)
            self.ema = WeightAverage(self.cfg.train.ema_decay, self.theta, reducer.state_buffer(), reducer.spans(),
                                     self.xp, reducer.updated)

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        B = gidx.shape[0]
        lo, hi = my_share(B, self.comm.size, self.comm.rank)
        self.extras[STOP_SLOT] = 1.0 if stop else 0.0
        tc = time.perf_counter()
        self.local(gidx[lo:hi], -lr / B)
        if self.after_local is not None:
            self.after_local(at[2])
        self.sync()
        if self.straggler.active:  # study.straggler_*: a slow rank's compute (so it counts as compute)
            self.straggler.after(at[2], time.perf_counter() - tc)
        self.reducer.watch.step = at[2]
        t_reduce = time.perf_counter()
        self.reducer.finish()
        tu = time.perf_counter()
        extras = to_host(self.extras)  # the one host sync per step: loss and stop flag
        loss = float(extras[LOSS_SLOT])
        if not math.isfinite(loss):
            raise DivergenceError(f"training diverged at epoch {at[0]} step {at[1]}: loss is {loss} "
                                  f"(learning rate {lr} is likely too high)", at[0], at[1])
        if not self.local.applies_update:
            self.update(lr, B)
        self.compute_s += (t_reduce - tc) + (time.perf_counter() - tu)
        return loss, int(extras[STOP_SLOT])

    def update(self, lr: float, batch: int) -> None:
        """The same update on every rank: each applies the optimizer to the spans the reducer gives it."""
        t = time.perf_counter()
        self.optimizer.apply_all(self.reducer.shares(), lr, batch)
        if self.reducer.sums_in_update:  # the summation an Allreduce would do, fused with the update
            self.reducer.seconds += time.perf_counter() - t
        if self.ema is not None:  # (computation: not in the reducer's time)
            self.ema.update()
        self.reducer.updated()

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
