"""Learning rate by step: constant, step decay or cosine decay, after an optional linear warm-up,
with the peak rate following the batch size (schedule.scale_with_batch).

    peak  = learning_rate * sqrt(batch_size / base_batch)   (sqrt, the default)
          = learning_rate * batch_size / base_batch         (linear: Goyal et al., 2017,
                                                             "Accurate, Large Minibatch SGD")
          = learning_rate                                   (none)
          the factor at most schedule.max_scale (default 2: sqrt's at 4 x base_batch)
    warm-up, the first warmup_epochs: a linear ramp per step from 0 to the peak (the first
          step at peak / steps)
    then  constant: peak;  step: peak * gamma ** (epochs past warm-up // step_epochs);
          cosine: min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2 over the remaining steps

Why sqrt by default: on real MNIST (Net-1h, the defaults, 8 epochs, 2 ranks; jobs/batch_rule.yaml)
it kept >= 97% test accuracy from B = 32 to 2048 and did best at every batch up to 4096, where the
linear rule's peak was too large from 4096 and a fixed rate too large at 32; docs/training.md
gives the numbers.

A pure function of the global step, so every rank, a resumed run and the PyTorch comparison
compute the same rate without any state to save.
"""

from __future__ import annotations

import math
from typing import Any

from pbp_hpc.errors import ConfigError


def peak_rate(cfg: Any) -> float:
    """The schedule's peak: train.learning_rate scaled to train.batch_size by schedule.scale_with_batch."""
    return cfg.train.learning_rate * _factor(cfg)[0]


def _factor(cfg: Any) -> tuple[float, bool]:
    """The rule's factor on learning_rate, and whether schedule.max_scale capped it."""
    s, t = cfg.schedule, cfg.train
    ratio = t.batch_size / s.base_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio)}.get(s.scale_with_batch, 1.0)
    if s.max_scale is not None and factor > s.max_scale:
        return s.max_scale, True
    return factor, False


def describe(cfg: Any) -> str:
    """The peak rate and the rule that gave it, for the run's header: 'peak lr 0.3536 (sqrt rule: 0.5 x sqrt(512/1024)), cosine'."""
    s, t = cfg.schedule, cfg.train
    peak = peak_rate(cfg)
    if s.scale_with_batch == "none":
        how = "fixed: schedule.scale_with_batch none"
    elif s.scale_with_batch == "sqrt":
        how = f"sqrt rule: {t.learning_rate:g} x sqrt({t.batch_size}/{s.base_batch})"
    else:
        how = f"linear rule: {t.learning_rate:g} x {t.batch_size}/{s.base_batch}"
    if _factor(cfg)[1]:
        how += f", capped at {s.max_scale:g}x (schedule.max_scale)"
    return f"peak lr {peak:.4g} ({how}), {s.name}"


def check_batch(cfg: Any, n_train: int) -> str:
    """Refuse a global batch larger than the training set when it was asked for (a config or
    --set): the header's "batch" would not be the batch trained on. The built-in default batch on a
    smaller set (tests, tiny runs) trains full-batch; the returned note says so, for the header."""
    B = cfg.train.batch_size
    if n_train <= 0 or B <= n_train:
        return ""
    if "batch_size" in cfg.train.model_fields_set:
        raise ConfigError(f"train.batch_size {B} is larger than the {n_train} training examples; "
                          f"full-batch gradient descent is train.batch_size={n_train} (= n_train)")
    return f" (the default batch {B} is more than the {n_train} training examples: each step is full-batch GD)"


# The rule's limit: on MNIST (jobs/batch_rule.yaml, docs/training.md) the defaults kept >= 97% test
# accuracy down to this many steps in all (B = 2048: 25 steps an epoch, 8 epochs) and not below
# (B = 4096, 8 epochs: 104 steps, 96.8%; B = 8192: 56 steps, 94.8%); with the epochs the warning
# names, 4096 (16 epochs) reached 97.5% and 8192 (29 epochs, the capped peak 1.0) 97.2%.
MIN_STEPS = 200


def few_steps_warning(cfg: Any, n_train: int) -> str:
    """A warning for the header when the rule raised the rate above base_batch's and the run has fewer
    steps in all than the rule was found to need."""
    steps = cfg.train.epochs * -(-n_train // max(1, cfg.train.batch_size))
    scaled_up = cfg.schedule.scale_with_batch != "none" and cfg.train.batch_size > cfg.schedule.base_batch
    if n_train <= 0 or steps >= MIN_STEPS or not scaled_up:
        return ""
    need = -(-MIN_STEPS // max(1, -(-n_train // cfg.train.batch_size)))
    return (f"warning: batch {cfg.train.batch_size} leaves {steps} steps in {cfg.train.epochs} epoch(s); the default "
            f"recipe trained well (>= 97% on MNIST) only from {MIN_STEPS} steps: set train.epochs={need} or a "
            f"smaller batch (docs/training.md, \"Changing the batch\")")


class Schedule:
    def __init__(self, cfg: Any, steps_per_epoch: int):
        s, t = cfg.schedule, cfg.train
        self.name, self.gamma, self.min_lr = s.name, s.gamma, s.min_lr
        self.peak = peak_rate(cfg)
        self.per_epoch = max(1, steps_per_epoch)
        self.warmup = int(round(s.warmup_epochs * self.per_epoch))
        self.step_every = max(1, int(round(s.step_epochs * self.per_epoch)))
        self.total = max(1, t.epochs * self.per_epoch - self.warmup)

    def __call__(self, step: int) -> float:
        """The learning rate of global step `step` (from 0)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        k = step - self.warmup
        if self.name == "step":
            return self.peak * self.gamma ** (k // self.step_every)
        if self.name == "cosine":
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, k / self.total)))
        return self.peak
