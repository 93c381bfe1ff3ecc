"""What a training step on a grid (data D x tensor T x pipeline S) sends, and where it splits the work.

One place for each formula, shared by the runs' own counts (tensor_step, pipeline, the
reducers' wire bytes), `parallel.grid: auto` (grid_auto) and analyze's alpha-beta model of a
grid (analyze/gridmodel.py), so that the model's volumes are the counted ones by construction,
and the tests say so. Pure arithmetic: no MPI (analyze imports it on a login node).

    Allreduce of n values over P ranks (Rabenseifner: reduce-scatter by recursive halving, then
    allgather by recursive doubling): 2 log2 P message rounds, 2 (P - 1) / P n values moved;
    a rank sends 2 (P - 1) ceil(n / P) values of its own.
    tensor group: per step over n rows, each row-split layer's n x n_out partial sums (the last
    pair's + 1: the stop flag), then each column-split layer above the first, n x n_in; a rank
    with no rows sends the stop flag alone (one float64).
    pipeline: per step, each stage boundary carries M activation messages up and M delta messages
    down, microbatch m's rows x the boundary's width; a stage sends its own direction's.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Optional

import numpy as np

from pbp_hpc.engine import model
from pbp_hpc.engine.tensor_layout import COL, OUT, ROW, ShardLayout
from pbp_hpc.parallel.reducers import EXTRAS

# A tensor rank with no rows this step (more data groups than examples) sends the stop flag alone,
# as one float64 (tensor_step's stop_buf).
STOP_ITEMSIZE = 8


def allreduce_bytes(ranks: int, count: int, itemsize: int) -> int:
    """Bytes a rank sends in an MPI_Allreduce of count values at best (reduce-scatter + allgather)."""
    return 2 * (ranks - 1) * -(-count // ranks) * itemsize


def allreduce_terms(ranks: Any, nbytes: Any) -> tuple[Any, Any]:
    """(message rounds, bytes moved) of one Rabenseifner Allreduce of nbytes over P ranks: time =
    rounds x alpha + moved x beta. Scalars or numpy arrays; (0, 0) at P = 1."""
    p = np.asarray(ranks, dtype=np.float64)
    return 2.0 * np.log2(p), 2.0 * (p - 1.0) / p * np.asarray(nbytes, dtype=np.float64)


def allreduce_seconds(ranks: int, nbytes: float, alpha: float, beta: float) -> float:
    """Predicted seconds of one Allreduce of nbytes over P ranks (0 at P <= 1)."""
    if ranks <= 1:
        return 0.0
    rounds, moved = allreduce_terms(ranks, nbytes)
    return float(rounds * alpha + moved * beta)


# -- tensor parallelism ---------------------------------------------------------------------------
def activation_values(shard: ShardLayout, n: int, stop: bool = True, input_grad: bool = False) -> list[int]:
    """The sizes of the tensor group's Allreduces in a training step over n rows, in order:
    forward, each row-split layer's n x n_out (with stop, the last one + 1: the stop flag);
    backward, each column-split layer above the first (a split output layer's too), n x n_in,
    and with input_grad (a pipeline stage above the first) the first layer's too. With stop and
    no row-split layer the stop flag has an Allreduce of its own (1 value)."""
    kinds, sizes = shard.kinds, shard.sizes
    rows = [l for l, k in enumerate(kinds) if k == ROW]
    fwd = [n * sizes[l + 1] + (1 if stop and l == rows[-1] else 0) for l in rows] if rows or not stop else [1]
    low = 0 if input_grad else 1
    bwd = [n * sizes[l] for l in reversed(range(len(kinds))) if kinds[l] in (COL, OUT) and l >= low]
    return fwd + bwd


def gathered_values(shard: ShardLayout, n: int) -> int:
    """The size of the split output layer's Allgather (n x n_out) in a step over n rows; 0 without one."""
    return n * shard.sizes[-1] if shard.kinds[-1] == OUT else 0


def allgather_bytes(ranks: int, count: int, itemsize: int) -> int:
    """Bytes a rank sends in an MPI_Allgather of count values in all (a ring: T - 1 blocks of count / T)."""
    return (ranks - 1) * -(-count // ranks) * itemsize


def activation_bytes(shard: ShardLayout, n: int, itemsize: int, stop: bool = True, input_grad: bool = False) -> int:
    """Bytes a rank sends in its tensor group per training step over n rows (the formula the
    count is tested against); stop, input_grad: as activation_values. A stop flag with no
    forward Allreduce to ride (no rows this step, or no row-split layer) travels alone as one
    float64."""
    if shard.T == 1:
        return 0
    if stop and n == 0:
        return allreduce_bytes(shard.T, 1, STOP_ITEMSIZE)
    alone = stop and ROW not in shard.kinds
    values = activation_values(shard, n, stop and not alone, input_grad)
    return (sum(allreduce_bytes(shard.T, c, itemsize) for c in values)
            + (allreduce_bytes(shard.T, 1, STOP_ITEMSIZE) if alone else 0)
            + allgather_bytes(shard.T, gathered_values(shard, n), itemsize))


# -- pipeline parallelism -------------------------------------------------------------------------
def split_layers(sizes: list[int], S: int, given: Optional[list[int]] = None) -> list[tuple[int, int]]:
    """Each stage's layers (lo, hi): the given counts, or the contiguous split whose most
    expensive stage is cheapest (a layer costs n_in x n_out multiply-adds; ties: the earlier cut)."""
    L = len(sizes) - 1
    if given is not None:
        counts = list(given)
    else:
        cost = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
        best: Optional[tuple[int, tuple[int, ...]]] = None
        for cuts in itertools.combinations(range(1, L), S - 1):
            bounds = (0, *cuts, L)
            worst = max(sum(cost[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
            if best is None or worst < best[0]:
                best = (worst, cuts)
        assert best is not None
        bounds = (0, *best[1], L)
        counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    edges = [0, *itertools.accumulate(counts)]
    return list(zip(edges[:-1], edges[1:]))


def boundary_widths(sizes: list[int], stages: list[tuple[int, int]]) -> list[int]:
    """The width (units) of each cut between consecutive stages: the activations crossing it."""
    return [sizes[hi] for _, hi in stages[:-1]]


def pipeline_sent_bytes(sizes: list[int], stages: list[tuple[int, int]], s: int, n: int, itemsize: int) -> int:
    """Bytes stage s sends point to point in a step over n rows (its microbatches' rows add up
    to n): its output up (not the last stage), its input's delta down (not the first)."""
    widths = boundary_widths(sizes, stages)
    up = widths[s] if s + 1 < len(stages) else 0
    down = widths[s - 1] if s > 0 else 0
    return n * (up + down) * itemsize


def microbatch_rows(n: int, M: int) -> int:
    """The largest microbatch's rows when n rows are cut into M (parallel.strategies.base.my_share's split)."""
    return -(-n // M) if n else 0


# -- the whole grid -------------------------------------------------------------------------------
def rows_of(batch: int, D: int, d: int = 0) -> int:
    """Rows data rank d of D computes of a global batch (my_share's contiguous split)."""
    return batch * (d + 1) // D - batch * d // D


def gradient_values(sizes: list[int], T: int = 1, S: int = 1, t: int = 0, s: int = 0) -> int:
    """Values in the data group's Allreduce of tensor rank t of stage s: its parameters' gradient
    and the reducer's extras (loss, stop flag, ...)."""
    if T > 1:
        return ShardLayout(list(sizes), T, t).n_params + EXTRAS
    lo, hi = split_layers(sizes, S)[s] if S > 1 else (0, len(sizes) - 1)
    return model.Layout(list(sizes[lo:hi + 1])).n_params + EXTRAS


def work_share(sizes: list[int], T: int = 1, S: int = 1) -> float:
    """The busiest rank's share of one example's multiply-adds (n_in x n_out per layer): a
    tensor rank holds its shard's weights (the replicated odd last layer whole), a pipeline
    stage its layers'; a grid with neither is 1."""
    return _work_share(tuple(sizes), T, S)


@functools.lru_cache(maxsize=4096)
def _work_share(sizes: tuple[int, ...], T: int, S: int) -> float:  # a projection asks for the same few many times
    cost = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    if T > 1:
        return max(sum(math.prod(x) for x in ShardLayout(list(sizes), T, t).shapes) for t in range(T)) / sum(cost)
    if S > 1:
        return max(sum(cost[lo:hi]) for lo, hi in split_layers(list(sizes), S)) / sum(cost)
    return 1.0


def bytes_per_step(sizes: list[int], grid: tuple[int, int, int], batch: int, itemsize: int) -> dict[str, int]:
    """What world rank 0 (data rank 0, tensor rank 0, stage 0) sends in one training step of a
    global batch, by kind, as the run counts it: activations (the tensor group's Allreduces, or
    stage 0's point-to-point messages; the pipeline's 2-value loss Allreduce is not counted) and
    gradients (the data group's blocking Allreduce at best)."""
    D, T, S = grid
    n = rows_of(batch, D)
    if T > 1:
        act = activation_bytes(ShardLayout(list(sizes), T, 0), n, itemsize)
    elif S > 1:
        act = pipeline_sent_bytes(sizes, split_layers(sizes, S), 0, n, itemsize)
    else:
        act = 0
    return {"activations": act, "gradients": allreduce_bytes(D, gradient_values(sizes, T, S), itemsize)}


def batches_of_epoch(examples: int, batch: int) -> list[tuple[int, int]]:
    """(global batch, how many steps take it) in an epoch of `examples`: full ones, then the rest."""
    full, rest = divmod(int(examples), batch)
    return [(batch, full)] + ([(rest, 1)] if rest else [])


def mean_bytes_per_step(sizes: list[int], grid: tuple[int, int, int], batch: int, examples: int,
                        itemsize: int) -> dict[str, float]:
    """bytes_per_step's mean over an epoch's steps (the last batch smaller): what a run records."""
    parts = batches_of_epoch(examples, batch)
    steps = sum(k for _, k in parts)
    return {kind: sum(k * bytes_per_step(sizes, grid, b, itemsize)[kind] for b, k in parts) / steps
            for kind in ("activations", "gradients")}


def grids(P: int, sizes: list[int]) -> list[tuple[int, int, int]]:
    """The grids (D, T, S) of P ranks that pbp_hpc builds for this network: all data first, then
    data x tensor (T up to the narrowest hidden layer), data x pipeline (S up to the layers), and
    data x tensor x pipeline (each stage's layers split over its tensor group)."""
    tensors = [T for T in range(2, P + 1) if P % T == 0 and all(n >= T for n in sizes[1:-1])]
    pipes = [S for S in range(2, min(P, len(sizes) - 1) + 1) if P % S == 0]
    return ([(P, 1, 1)] + [(P // T, T, 1) for T in tensors] + [(P // S, 1, S) for S in pipes]
            + [(P // (T * S), T, S) for T in tensors for S in pipes if P % (T * S) == 0])


# -- the alpha-beta time of those messages --------------------------------------------------------
def allgather_seconds(P: int, nbytes: float, alpha: float, beta: float) -> float:
    """An MPI_Allgather of nbytes in all over P ranks (recursive doubling): log2(P) alpha + (P - 1) / P bytes beta."""
    if P <= 1:
        return 0.0
    return math.log2(P) * alpha + (P - 1) / P * nbytes * beta


def comm_seconds(sizes: list[int], grid: tuple[int, int, int], n: int, M: int, itemsize: int,
                 alpha: float, beta: float) -> dict[str, float]:
    """Seconds a step over n rows (one data rank's) spends in each group's messages, with no
    overlap of computation and communication:

        data      T_ar(D, the gradient of a rank's shard or stage, + extras)
        tensor    sum of T_ar(T, each tensor Allreduce)              (activation_values)
        pipeline  2 (M + S - 2) (alpha + ceil(n / M) x the widest cut x itemsize x beta)
                  + T_ar(S, the loss and stop extras)

    The pipeline's messages on the critical path: the first microbatch crosses S - 1 cuts up
    and S - 1 down, each of the other M - 1 adds one message up and one down (the rest hide
    behind other stages' compute, which the bubble (M + S - 1) / M of the compute already
    counts). T_ar(P, bytes) = 2 log2(P) alpha + 2 (P - 1) / P bytes beta."""
    D, T, S = grid
    data = allreduce_seconds(D, gradient_values(sizes, T, S) * itemsize, alpha, beta)
    tensor = 0.0
    if T > 1:  # with S stages: a stage's share of the Allreduces, at a microbatch's rows, M times a step
        micro, times = (microbatch_rows(n, M), M / S) if S > 1 else (n, 1.0)
        tensor = times * sum(allreduce_seconds(T, c * itemsize, alpha, beta)
                             for c in activation_values(ShardLayout(list(sizes), T, 0), micro))
    pipe = 0.0
    if S > 1:
        width = max(boundary_widths(sizes, split_layers(sizes, S)))
        pipe = (2 * (M + S - 2) * (alpha + microbatch_rows(n, M) * width * itemsize * beta)
                + allreduce_seconds(S, EXTRAS * itemsize, alpha, beta))
    return {"data": data, "tensor": tensor, "pipeline": pipe}


def bubble(M: int, S: int) -> float:
    """A pipeline's compute time over its busiest stage's work: (M + S - 1) / M (1 without a pipeline)."""
    return (M + S - 1) / M if S > 1 else 1.0
