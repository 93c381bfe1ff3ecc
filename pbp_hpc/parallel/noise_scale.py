"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei et al. 2018,
"An empirical model of large-batch training", appendix A.1): the batch size beyond which a larger
batch stops paying -- estimated almost for free in data-parallel training.

Every rank holds the gradient of its share of the batch (B_small = B / P examples) before the
sum, and the summed gradient of the whole batch (B_big = B) after it. With |G_small|^2 the mean
over ranks of |g_r / b_r|^2 and |G_big|^2 = |G / B|^2, unbiased estimates of the true gradient's
squared norm and of the trace of the per-example covariance are

    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

each noisy alone; their exponential moving averages (decay EMA per estimate) give B_noise =
S_ema / |G|^2_ema. The local norm rides in the reduction's extras (NOISE_SLOT: summed over ranks
by the same Allreduce, no extra message); the global one is a dot product after it. Both cost a
pass over the gradient, so it is estimated every `train.noise_scale_every` steps (0: never).

Needs the local gradient whole before the sum and the global one whole after it, on every rank:
the reducers that sum the buffer in place (blocking, with or without compression, and the device
reducers). With overlap (the sum starts during the backward pass), shm and shared_batch (each rank
holds only its span of the sum), and the strategies that do not sum gradients, it is not estimated
and the log says why.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from pbp_hpc.parallel.reducers import NOISE_SLOT

SUPPORTED = ("blocking", "cuda-aware", "staged", "nccl")
EMA = 0.9  # weight of the past, per estimate: ~10 estimates of memory


class NoiseScale:
    """The running estimate; before() and after() bracket the reduction of a step."""

    def __init__(self, every: int, ranks: int, grad: Any, extras: Any):
        self.every, self.ranks = every, ranks
        self.grad, self.extras = grad, extras  # views: this rank's gradient sum, the reduction's extras
        self.g2_ema = self.s_ema = 0.0
        self.weight = 0.0  # bias correction of the EMAs (as Adam's): their start is not 0
        self.due = False
        self.seconds = 0.0  # what it cost (the record's noise_scale_cost_s)
        self.estimates = 0

    def before(self, global_step: int, local_batch: int) -> None:
        """After the local step: this rank's mean-gradient norm^2 into the extras (0 off its steps)."""
        self.due = global_step % self.every == 0 and local_batch > 0
        if not self.due:
            self.extras[NOISE_SLOT] = 0.0
            return
        t = time.perf_counter()
        self.extras[NOISE_SLOT] = float(self.grad @ self.grad) / (local_batch * local_batch)
        self.seconds += time.perf_counter() - t

    def after(self, extras: Any, batch: int) -> None:
        """After the reduction (extras: on the host): the global norm, and the two estimates."""
        if not self.due:
            return
        t = time.perf_counter()
        big = float(self.grad @ self.grad) / (batch * batch)
        small = float(extras[NOISE_SLOT]) / self.ranks
        b_small, b_big = batch / self.ranks, float(batch)
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        s = (small - big) / (1.0 / b_small - 1.0 / b_big)
        if math.isfinite(g2) and math.isfinite(s):
            self.g2_ema = EMA * self.g2_ema + (1 - EMA) * g2
            self.s_ema = EMA * self.s_ema + (1 - EMA) * s
            self.weight = EMA * self.weight + (1 - EMA)
            self.estimates += 1
        self.seconds += time.perf_counter() - t

    @property
    def value(self) -> Optional[float]:
        """B_noise in examples; None before the first estimate or while |G|^2 is not positive."""
        if self.weight == 0.0 or self.g2_ema <= 0.0:
            return None
        return self.s_ema / self.g2_ema  # the bias corrections cancel in the ratio


def make(cfg: Any, comm: Any, strategy: Any, reducer: Any) -> tuple[Optional[NoiseScale], str]:
    """The estimator for this run, or None and why not."""
    every = cfg.train.noise_scale_every
    if not every:
        return None, "off (train.noise_scale_every 0)"
    if comm.size < 2:
        return None, "not estimated: one rank has no smaller batch to compare with"
    if strategy.name != "allreduce" or reducer.name not in SUPPORTED:
        return None, (f"not estimated with strategy {strategy.name}, reducer {reducer.name}: it needs every rank's "
                      f"whole gradient before and after the sum (allreduce with reducer {', '.join(SUPPORTED)})")
    return NoiseScale(every, comm.size, reducer.grad[: reducer.n], reducer.extras), \
        f"estimated every {every} steps from the local and summed gradients' norms"
