"""Whether a tensor group splits its odd output layer by columns or replicates it: the cheaper one.

A network with an odd number of layers ends, after its (column, row) pairs, with one layer whose
input is whole on every rank of the tensor group (engine/tensor_layout.py). Either every rank
computes it whole (replicated: no message, but T - 1 of the T ranks repeat its GEMMs), or rank t
computes its block of output columns (split: one Allgather of B x n_out so that the loss sees
whole rows, and, where a layer lies below, one Allreduce of B x n_in of its input gradient's
partial sums). Per step of B rows on each rank:

    replicated = (T - 1) / T x f x B x n_in x n_out x (seconds per flop)
                 f = 6 (forward, weight gradient, input gradient: 2 flops a multiply-add each),
                 4 where no layer lies below (no input gradient)
    split      = T_ag(T, B n_out bytes) + T_ar(T, B n_in bytes)      (the second only with a layer below)
    T_ag(P, n) = log2(P) alpha + (P - 1) / P n beta,  T_ar as in parallel/grid_auto.py

Seconds per flop come from timing the layer's own forward GEMM (at B rows, 256 at least), alpha
and beta from two timed Allreduces over the world (grid_auto.measure_network); world rank 0
measures and every rank takes its numbers, so all choose alike (the data-parallel groups must
hold the same parts). For Net-2h's 1024 x 10 output the replicated layer costs ~60 kflop an
example against a message of 1024 values an example: replicated wins; for a wide output
(512 x 784) the repeated GEMMs cost more than the messages.
`parallel.tensor_output: split | replicated` forces either; the header says which and why.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.parallel import volumes
from pbp_hpc.parallel.grid_auto import measure_network


def costs(n_in: int, n_out: int, below: bool, T: int, rows: int, itemsize: int, flop_s: float, alpha: float,
          beta: float) -> tuple[float, float]:
    """(replicated, split) predicted seconds a step of the output layer's extra work (see the module docstring)."""
    flops = (6 if below else 4) * rows * n_in * n_out
    replicated = (T - 1) / T * flops * flop_s
    split = (volumes.allgather_seconds(T, rows * n_out * itemsize, alpha, beta)
             + (volumes.allreduce_seconds(T, rows * n_in * itemsize, alpha, beta) if below else 0.0))
    return replicated, split


def splits_output(sizes: list[int], T: int) -> bool:
    """Whether the layout has an output layer to choose for: an odd number of layers, at least T outputs."""
    return T > 1 and (len(sizes) - 1) % 2 == 1 and sizes[-1] >= T


def choose(mode: str, sizes: list[int], T: int, rows: int, itemsize: int, flop_s: float, alpha: float,
           beta: float, below: Optional[bool] = None) -> tuple[bool, str]:
    """(split the output layer?, the header's words for it) for parallel.tensor_output = mode.
    below: whether a layer lies below the output layer (default: one does in `sizes`)."""
    n_in, n_out = sizes[-2], sizes[-1]
    below = len(sizes) > 2 if below is None else below
    msgs = f"an Allgather of B x {n_out}" + (f" and an Allreduce of B x {n_in}" if below else "")
    if mode != "auto":
        split = mode == "split"
        return split, (f"the odd last layer is split by columns ({msgs} a step; parallel.tensor_output split)" if split
                       else f"the odd last layer is replicated (parallel.tensor_output replicated; splitting it would add {msgs} a step)")
    rep, spl = costs(n_in, n_out, below, T, rows, itemsize, flop_s, alpha, beta)
    split = spl < rep
    said = (f"predicted {1e3 * rep:.3g} ms a step for the replicated GEMMs against {1e3 * spl:.3g} ms for {msgs}, "
            f"at B = {rows}, {flop_s * 1e12:.3g} ps/flop, alpha {alpha * 1e6:.3g} us, beta {beta * 1e9:.3g} ns/byte")
    return split, (f"the odd last layer is split by columns (auto: {said})" if split
                   else f"the odd last layer is replicated (auto: {said})")


def flop_seconds(n_in: int, n_out: int, rows: int, dtype: str) -> float:
    """Seconds per flop of the layer's forward GEMM at rows x n_in by n_out (the best of three),
    with at least 256 rows: the throughput, not a small call's fixed cost, which every rank pays
    whether the layer is split or not (so a tiny layer is not mistaken for an expensive one)."""
    rows = max(rows, 256)
    rng = np.random.default_rng(0)
    a, w = rng.random((rows, n_in)).astype(dtype), rng.random((n_in, n_out)).astype(dtype)
    z = np.empty((rows, n_out), dtype=dtype)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, w, out=z)
        best = min(best, time.perf_counter() - t)
    return best / (2 * rows * n_in * n_out)


def decide(mode: str, nets: list[tuple[list[int], bool]], T: int, rows: int, dtype: str,
           world: MPI.Comm) -> list[tuple[bool, Optional[str]]]:
    """For each (sizes, below) in nets, the layers a tensor group holds (the whole model, or each
    pipeline stage's) and whether a layer lies below them: (split its odd last layer?, the
    header's words; None where there is nothing to choose). With mode auto, measured on world
    rank 0 (alpha and beta once) and taken by every rank (collective over world)."""
    rows = max(1, rows)
    choosing = [splits_output(sizes, T) for sizes, _ in nets]  # (a forced split of too few outputs: refused by the checks)
    alpha, beta, flops = 0.0, 0.0, [0.0] * len(nets)
    if mode == "auto" and any(choosing):
        alpha, beta = measure_network(world)
        if world.rank == 0:
            flops = [flop_seconds(sizes[-2], sizes[-1], rows, dtype) if c else 0.0 for (sizes, _), c in zip(nets, choosing)]
        flops = world.bcast(flops, root=0)
    out: list[tuple[bool, Optional[str]]] = []
    for (sizes, below), c, flop_s in zip(nets, choosing, flops):
        if c:
            out.append(choose(mode, sizes, T, rows, np.dtype(dtype).itemsize, flop_s, alpha, beta, below))
        else:
            out.append((False, "the odd last layer is replicated (fewer outputs than tensor ranks)"
                        if T > 1 and (len(sizes) - 1) % 2 == 1 else None))
    return out
