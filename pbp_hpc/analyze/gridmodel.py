"""The alpha-beta model of a training step on a grid: data D x tensor T x pipeline S ranks.

perfmodel.py models data parallelism alone; this is its generalisation to the grids of issue
27, from the same two kinds of measurement: one rank's compute time per example, and the
network's alpha (seconds per message) and beta (seconds per byte). A step of global batch B
with M microbatches takes, on the busiest rank (n = ceil(B / D) rows, m = ceil(n / M)):

    compute  = n w_T c(n w_T)                            (S = 1)
             = (M + S - 1) m w_S c(m w_S)                (S > 1: the GPipe/1F1B bubble)
    data     = T_ar(D, the gradient of a shard (T) or stage (S), + 3 extras)
    tensor   = sum over the tensor Allreduces of T_ar(T, their bytes)
    pipeline = 2 (M + S - 2) (alpha + m x the widest cut x itemsize x beta) + T_ar(S, extras)
    T_ar(P, bytes) = 2 log2(P) alpha + 2 (P - 1) / P bytes beta           (Rabenseifner)

w_T and w_S are the busiest rank's share of the multiply-adds; c(r) is one rank's measured
seconds per example at batch r (log-log interpolation between the measured batches, the
nearest one beyond them, c(1) below 1). A rank runs at the rate one rank has for the same work
per step: n rows of 1/T of the units as n/T rows of all of them, so neither data nor tensor
parallelism is credited with a GEMM efficiency the other is denied. The message volumes and
times are parallel/volumes.py's, the formulas the runs count their bytes with, so the model's
bytes are the counted ones (tests say so). An epoch sums its steps (the last batch smaller).
ASSUMPTIONS lists what the model leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from pbp_hpc.analyze.perfmodel import AlphaBeta
from pbp_hpc.parallel import volumes

Grid = tuple[int, int, int]

ASSUMPTIONS = (
    "compute: one rank's measured time per example at the same work per step (rows x the busiest rank's share "
    "of the multiply-adds: a tensor shard's weights with the odd last layer whole, a pipeline stage's layers), "
    "interpolated log-log between the measured batches, the 1-row rate below one row; per-step overheads split too",
    "a pipeline's bubble (M + S - 1) / M of its microbatches' compute",
    "no overlap of computation and communication, in any group",
    "every Allreduce (data group's gradient, tensor group's activations) Rabenseifner: 2 log2(P) alpha + "
    "2 (P-1)/P bytes beta; a pipeline message alpha + bytes beta, 2 (M + S - 2) of them on the critical path",
    "one network (alpha, beta) for every group; a tensor group inside a node would see that node's values",
    "the data group reduces with a blocking Allreduce (on one node pbp_hpc's shm and shared_batch reducers "
    "send no message: their measured runs carry no such cost)",
    "one rank per core; threads within a rank (1 rank x 2 threads) are not modelled",
)


@dataclass(frozen=True)
class Rate:
    """One rank's compute seconds per example as a function of its batch (rows a GEMM has)."""

    batches: tuple[int, ...]  # measured batches, ascending
    seconds: tuple[float, ...]  # seconds per example at each

    def __call__(self, rows: float) -> float:
        if len(self.batches) == 1:
            return self.seconds[0]
        x = math.log(max(1.0, rows))
        return float(np.exp(np.interp(x, np.log(self.batches), np.log(self.seconds))))

    @classmethod
    def of(cls, measured: dict[int, float]) -> "Rate":
        keys = sorted(b for b, c in measured.items() if c and c > 0)
        if not keys:
            raise ValueError("no measured compute time per example")
        return cls(tuple(keys), tuple(measured[b] for b in keys))


def step_seconds(sizes: Sequence[int], grid: Grid, batch: int, M: int, itemsize: int, rate: Rate,
                 ab: AlphaBeta) -> dict[str, float]:
    """Predicted seconds of one step of a global batch, by part: compute, data, tensor, pipeline."""
    D, T, S = grid
    sizes = list(sizes)
    n = -(-batch // D)
    if S > 1:
        m, M = volumes.microbatch_rows(n, M), min(M, n)  # empty microbatches are skipped
        work = m * volumes.work_share(sizes, 1, S)
        compute = M * volumes.bubble(M, S) * work * rate(work)
    else:
        work = n * volumes.work_share(sizes, T, 1)
        compute = work * rate(work)
    comm = volumes.comm_seconds(sizes, grid, n, M, itemsize, ab.alpha_s, ab.beta_s_per_byte)
    return {"compute": compute, **comm}


def epoch_seconds(sizes: Sequence[int], grid: Grid, batch: int, M: int, examples: int, itemsize: int, rate: Rate,
                  ab: AlphaBeta) -> dict[str, float]:
    """Predicted seconds of an epoch of `examples` by part, and their sum under "total"."""
    parts = {"compute": 0.0, "data": 0.0, "tensor": 0.0, "pipeline": 0.0}
    for b, k in volumes.batches_of_epoch(examples, batch):
        for key, v in step_seconds(sizes, grid, b, M, itemsize, rate, ab).items():
            parts[key] += k * v
    return {**parts, "total": sum(parts.values())}


def microbatch_choices(batch: int, D: int, S: int) -> list[int]:
    """M to try for a pipeline: powers of two from S up to the rows a data rank has (1 without a pipeline)."""
    if S == 1:
        return [1]
    n = -(-batch // D)
    out = [m for m in (2 ** k for k in range(11)) if S <= m <= n]
    return out or [max(1, min(S, n))]


@dataclass(frozen=True)
class Prediction:
    grid: Grid
    microbatches: int
    seconds: float  # per epoch
    parts: dict[str, float]

    @property
    def name(self) -> str:
        return grid_name(self.grid, self.microbatches)


def grid_name(grid: Grid, M: Optional[int] = None) -> str:
    """`data 4 x tensor 2`, `pipeline 2 (M=8)`, `1 rank`."""
    parts = [f"{kind} {n}" for kind, n in zip(("data", "tensor", "pipeline"), grid) if n > 1]
    return (" x ".join(parts) or "1 rank") + (f" (M={M})" if grid[2] > 1 and M else "")


def best_of(sizes: Sequence[int], grid: Grid, batch: int, examples: int, itemsize: int, rate: Rate, ab: AlphaBeta,
            M: Optional[int] = None) -> Prediction:
    """The grid's predicted epoch at the given M, or at its best M."""
    rows = -(-batch // grid[0])
    choices = [min(M, rows)] if M else microbatch_choices(batch, grid[0], grid[2])  # empty microbatches are skipped
    preds = [Prediction(grid, m, (e := epoch_seconds(sizes, grid, batch, m, examples, itemsize, rate, ab))["total"], e)
             for m in choices]
    return min(preds, key=lambda p: p.seconds)


def project(sizes: Sequence[int], ranks: int, batch: int, examples: int, itemsize: int, rate: Rate,
            ab: AlphaBeta) -> list[Prediction]:
    """Every grid of `ranks` ranks that pbp_hpc builds for this network (volumes.grids), each at
    its best M, fastest first."""
    preds = [best_of(sizes, g, batch, examples, itemsize, rate, ab) for g in volumes.grids(ranks, list(sizes))]
    return sorted(preds, key=lambda p: p.seconds)


def family(grid: Grid) -> str:
    """Which parallelism a grid adds to data: `data`, `tensor`, `pipeline`."""
    return "tensor" if grid[1] > 1 else "pipeline" if grid[2] > 1 else "data"
