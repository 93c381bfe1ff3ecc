"""Momentum SGD, heavy ball and Nesterov, in PyTorch's form (so `framework` can check it):

    g' = g / B + weight_decay * theta          (g: the minibatch's gradient sum)
    v  <- mu * v + g'
    theta <- theta - lr * v                    (momentum)
    theta <- theta - lr * (g' + mu * v)        (nesterov)

v is one buffer shaped like the parameters (node-shared under shm, each rank updating its
slice), zero at the start, and checkpointed as "velocity". Every operation is an in-place
axpby or axpy over the span: no temporary, whatever the size, and as few passes over these
buffers (too large for the cache) as BLAS level 1 allows: the velocity in one pass (its decay
and the first gradient part together, axpby), the parameters in two (their decay and g' in
one, then mu v); each further gradient part (shm's ranks) or decay term one more. The same
sums as the formulas above, in another order: equal up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

from pbp_hpc.engine import ops
from pbp_hpc.engine.optimizers.base import Optimizer


class Momentum(Optimizer):
    name = "momentum"
    nesterov = False
    state_names = ("velocity",)

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        super().__init__(cfg, theta, state_buffer, xp)
        self.mu = cfg.optimizer.momentum
        self.velocity = state_buffer()

    def apply(self, span: slice, parts: list[Any], lr: float, batch: int) -> None:
        xp, wd, mu, inv = self.xp, self.weight_decay, self.mu, 1.0 / batch
        theta, v = self.view(self.theta, span), self.view(self.velocity, span)
        ops.axpby_(xp, inv, parts[0], mu, v)  # v = mu v + g'
        for g in parts[1:]:
            ops.axpy_(xp, inv, g, v)
        if wd:
            ops.axpy_(xp, wd, theta, v)
        if not self.nesterov:
            ops.axpy_(xp, -lr, v, theta)
            return
        # theta - lr (g' + mu v): g' read again from its parts (and theta's own decay term)
        if wd:
            ops.axpby_(xp, -lr * inv, parts[0], 1.0 - lr * wd, theta)
        else:
            ops.axpy_(xp, -lr * inv, parts[0], theta)
        for g in parts[1:]:
            ops.axpy_(xp, -lr * inv, g, theta)
        ops.axpy_(xp, -lr * mu, v, theta)

    def state(self) -> dict[str, Any]:
        return {"velocity": self.velocity}


class Nesterov(Momentum):
    name = "nesterov"
    nesterov = True
