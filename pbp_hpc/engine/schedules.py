"""Learning rate by step: constant, step decay or cosine decay, after an optional linear warm-up,
with an optional linear scaling rule (Goyal et al., 2017, "Accurate, Large Minibatch SGD").

    peak  = learning_rate * batch_size / base_batch    (schedule.scale_with_batch)
          = learning_rate                              (otherwise)
    warm-up, the first warmup_epochs: a linear ramp per step to the peak, from learning_rate
          when scaling up (Goyal's gradual warm-up; a batch below base_batch starts at its
          smaller peak), else from 0 (the first step at peak / steps)
    then  constant: peak;  step: peak * gamma ** (epochs past warm-up // step_epochs);
          cosine: min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2 over the remaining steps

A pure function of the global step, so every rank, a resumed run and the PyTorch comparison
compute the same rate without any state to save.
"""

from __future__ import annotations

import math
from typing import Any


class Schedule:
    def __init__(self, cfg: Any, steps_per_epoch: int):
        s, t = cfg.schedule, cfg.train
        self.name, self.gamma, self.min_lr = s.name, s.gamma, s.min_lr
        self.base = t.learning_rate
        self.peak = t.learning_rate * (t.batch_size / s.base_batch if s.scale_with_batch else 1.0)
        self.per_epoch = max(1, steps_per_epoch)
        self.warmup = int(round(s.warmup_epochs * self.per_epoch))
        self.start = min(self.base, self.peak) if s.scale_with_batch else 0.0
        self.step_every = max(1, int(round(s.step_epochs * self.per_epoch)))
        self.total = max(1, t.epochs * self.per_epoch - self.warmup)

    def __call__(self, step: int) -> float:
        """The learning rate of global step `step` (from 0)."""
        if step < self.warmup:
            return self.start + (self.peak - self.start) * (step + 1) / self.warmup
        k = step - self.warmup
        if self.name == "step":
            return self.peak * self.gamma ** (k // self.step_every)
        if self.name == "cosine":
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, k / self.total)))
        return self.peak
