"""The timed epochs of our code: pbp_hpc.train's step (OurRun) and its GEMMs alone (GemmReplay).

Each epoch's time is the slowest rank's (pbp_hpc.parallel.runtime.slowest), as in pbp_hpc.train.
MPI and the engine are imported where they are used: the parent process never loads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pbp_hpc.bench.cases import LEARNING_RATE
from pbp_hpc.parallel.strategies.base import my_share

Clock = Callable[[], float]


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    comm: list[float] = field(default_factory=list)  # the reducer's fraction of each epoch


class OurRun:
    """pbp_hpc.train's step on one State: the strategy's step, exactly as train runs it."""

    def __init__(self, st: Any):
        self.st = st

    def step(self, gidx: np.ndarray) -> float:
        return self.st.strategy.step(gidx, LEARNING_RATE, False, (0, 0, -1))[0]

    def epoch(self, order: np.ndarray, batch: int, steps: int, clock: Clock) -> tuple[float, float]:
        from pbp_hpc.parallel.runtime import slowest

        st = self.st
        comm0 = st.reducer.seconds
        st.comm.Barrier()
        t0, w0 = clock(), time.perf_counter()
        for s in range(steps):
            self.step(order[s * batch : (s + 1) * batch])
        t, wall = clock() - t0, time.perf_counter() - w0
        # the reducer's share of the wall time (its seconds are wall seconds, whatever the clock)
        t, frac = slowest(st.comm, [t, (st.reducer.seconds - comm0) / wall if wall > 0 else 0.0]).tolist()
        return t, frac


class GemmReplay:
    """The matmuls of one epoch alone: recorded from real steps, replayed into the same buffers.

    Every ops.gemm and ops.matmul call of a step is recorded (ops.recording_gemms) with its
    operands (views of the State's buffers) and its alpha and beta; an epoch replays the
    full-batch step's list for each full batch and the last step's list once. Where the GEMMs
    update the parameters in place (one rank, the fused step) they are saved before and
    restored after, untimed.
    """

    def __init__(self, run: OurRun, batch: int, n: int):
        st = run.st
        self.st, self.comm = st, st.comm
        self.n_full, rest = n // batch, n % batch
        # a data rank's share: the ranks of a tensor group or pipeline compute the same rows together
        D, d = st.grid.D, st.grid.d
        self.full = self._record(run, batch, my_share(batch, D, d))
        self.last = self._record(run, rest, my_share(rest, D, d)) if rest else []
        self.saved = np.empty_like(st.theta)

    @staticmethod
    def _record(run: OurRun, batch: int, share: tuple[int, int]) -> list[tuple[Any, ...]]:
        from pbp_hpc.engine import ops

        theta = run.st.theta.copy()
        try:
            with ops.recording_gemms() as calls:
                run.st.local(np.arange(share[0], share[1]), -LEARNING_RATE / batch)
        finally:
            run.st.theta[...] = theta
        run.st.reducer.finish()  # a reducer may have started sends in layer_done
        return calls

    def epoch(self, steps: int, clock: Clock) -> tuple[float, float]:
        from pbp_hpc.engine.ops import gemm
        from pbp_hpc.parallel.runtime import slowest

        self.saved[...] = self.st.theta
        self.comm.Barrier()
        t0 = clock()
        with np.errstate(over="ignore", invalid="ignore"):  # replayed into the same buffers, values grow: no matter
            for s in range(steps):
                for a, b, out, alpha, beta in (self.full if s < self.n_full else self.last):
                    if beta == 0.0 and alpha == 1.0:
                        np.matmul(a, b, out=out)
                    else:
                        gemm(np, a, b, out, alpha, beta)
        t = clock() - t0
        self.st.theta[...] = self.saved
        t, frac = slowest(self.comm, [t, 0.0]).tolist()
        return t, frac
