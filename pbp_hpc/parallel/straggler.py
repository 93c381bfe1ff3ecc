"""A straggler on purpose: the study setting that slows one rank, to measure strategies against.

On idle identical cores synchronous training loses little to waiting; on a shared cluster one
slow node (a noisy neighbour, thermal throttling, a failing disk) makes every Allreduce wait.
`study.straggler_factor` f > 1 makes a rank's local steps take f times as long: after each
local step it sleeps (f - 1) times what that step's computation took. Which rank:

    study.straggler: fixed    study.straggler_rank (default: the last rank), every step
    study.straggler: random   one rank per global step, drawn from (train.seed, step): the same
                              draw on every rank and in every strategy

A fixed straggler favours fully asynchronous updates (the others never wait for it); a random
one is where bounded staleness should shine (everyone is sometimes slow, so averaging over a
few steps hides it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class Straggler:
    def __init__(self, cfg: Any, comm: Any):
        st = cfg.study
        self.factor, self.mode, self.seed = st.straggler_factor, st.straggler, cfg.train.seed
        self.rank, self.size = comm.rank, comm.size
        self.fixed = st.straggler_rank if st.straggler_rank is not None else comm.size - 1
        self.active = self.factor > 1.0 and comm.size > 1
        self.slept_s = 0.0

    def is_slow(self, global_step: int) -> bool:
        """Whether this rank is the slow one at this global step."""
        if not self.active:
            return False
        if self.mode == "random":
            return int(np.random.default_rng([self.seed, global_step, 0x51]).integers(self.size)) == self.rank
        return self.rank == self.fixed

    def after(self, global_step: int, compute_s: float) -> None:
        """Called after a local step that took compute_s: sleep if this rank is slow there."""
        if self.is_slow(global_step):
            pause = (self.factor - 1.0) * compute_s
            time.sleep(pause)
            self.slept_s += pause
