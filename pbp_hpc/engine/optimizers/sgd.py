"""Plain SGD: theta <- theta - lr * (g / B + weight_decay * theta), the report's update (no decay)."""

from __future__ import annotations

from typing import Any, Callable

from pbp_hpc.engine import ops
from pbp_hpc.engine.optimizers.base import Optimizer


class SGD(Optimizer):
    name = "sgd"

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        super().__init__(cfg, theta, state_buffer, xp)
        # (not with a weight average: it needs a step whose update the strategy sees)
        self.fusable = self.weight_decay == 0.0 and not cfg.train.ema_decay

    def apply(self, span: slice, parts: list[Any], lr: float, batch: int) -> None:
        theta = self.view(self.theta, span)
        rest = parts
        if self.weight_decay:  # the decay and the first part in one pass (BLAS axpby)
            ops.axpby_(self.xp, -lr / batch, parts[0], 1.0 - lr * self.weight_decay, theta)
            rest = parts[1:]
        for g in rest:  # one BLAS axpy pass each
            ops.axpy_(self.xp, -lr / batch, g, theta)
