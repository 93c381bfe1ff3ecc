"""Checkpoints taken while training runs: every N steps or seconds (checkpoint.every_steps,
checkpoint.every_seconds), decided the same on every rank, and what each costs.

The loop asks due() at each block's end (one step for allreduce; local_sgd's average and the
asynchronous strategies' meeting otherwise, where every rank holds the same parameters) and
write() when it is. A run that dies loses at most the interval, plus the block in progress.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from pbp_hpc import resume


def due(st: Any, loop: Any, begun: int, reached: int) -> bool:
    """Whether to checkpoint after the block of global steps begun..reached-1 (the same on every rank).

    every_steps: a block that reached or crossed a multiple of it. every_seconds: rank 0's clock
    since loop.last_checkpoint, broadcast at the block's end (one byte, only when it is set), so
    that every rank writes after the same step."""
    c = st.cfg.checkpoint
    answer = bool(c.every_steps) and reached // c.every_steps > begun // c.every_steps
    if c.every_seconds and st.comm.size > 1:
        flag = np.array([time.monotonic() - loop.last_checkpoint >= c.every_seconds], dtype=np.int8)
        with st.watch:  # a rank lost here is found by the stall check, as in a step
            st.comm.Bcast(flag, root=0)
        answer = answer or bool(flag[0])
    elif c.every_seconds:
        answer = answer or time.monotonic() - loop.last_checkpoint >= c.every_seconds
    return answer


def write(st: Any, loop: Any, epoch: int, step: int, train_s: Optional[float] = None) -> float:
    """Checkpoint at (epoch, step) with the loop's records; returns its seconds (added to
    loop.checkpoint_s). train_s: the training time so far, where the loop's own count stops at
    the last finished epoch (mid-epoch)."""
    t = time.perf_counter()
    extra = loop.extra()
    if train_s is not None:
        extra["train_s"] = train_s
    resume.save(st, epoch, step, loop.records, extra, loop.arrays())
    cost = time.perf_counter() - t
    loop.checkpoint_s += cost
    loop.last_checkpoint = time.monotonic()
    return cost
