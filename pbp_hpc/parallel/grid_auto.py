"""`parallel.grid: auto`: the data x tensor x pipeline split of the world, chosen by a cost model.

For each grid (D, T, S) with D x T x S = P (T x S grids too: each pipeline stage's layers split
over its tensor group), the model predicts a step's time from measurements taken here, at
start-up, on this job:

    step = compute + data + tensor + pipeline
    compute  = the measured time of the first layer's three GEMMs at this grid's shape
               (ceil(B / D) rows, n_out / T columns; the largest layer of every network here),
               times the whole network's flops over the first layer's, over S stages, times
               the pipeline's bubble (M + S - 1) / M
    data     = T_ar(D, the gradient's bytes / (T S))       (skipped where D = 1)
    tensor   = sum of T_ar(T, each tensor Allreduce's bytes) (parallel/tensor_step.activation_values);
               with S > 1 at a microbatch's rows, M times a step, over S stages
    pipeline = 2 M (S - 1) / S x (alpha + a microbatch's boundary activations x beta)
    T_ar(P, n) = 2 log2(P) alpha + 2 (P - 1) / P n beta   (analyze/perfmodel.py)

alpha and beta are fitted from two timed Allreduces over the world (8 bytes and 1 MB), so a
loaded machine, where a rank waits for its partner to be scheduled, shows as a large alpha and
favours the grid with the fewest messages. Every rank takes rank 0's measurements, so all
choose alike. The header prints the chosen grid and each candidate's predicted step time.
T or S above 1 is considered only where the combination rules (parallel/combinations.py) allow
it for the rest of the config; otherwise the grid is all data.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import model
from pbp_hpc.engine.tensor_layout import ShardLayout
from pbp_hpc.parallel.tensor_step import activation_values


def t_ar(P: int, nbytes: float, alpha: float, beta: float) -> float:
    if P <= 1:
        return 0.0
    return 2 * math.log2(P) * alpha + 2 * (P - 1) / P * nbytes * beta


def measure_network(comm: MPI.Comm) -> tuple[float, float]:
    """(alpha seconds, beta seconds per byte) of this world's Allreduce, rank 0's, on every rank."""
    if comm.size == 1:
        return 0.0, 0.0
    small, big = np.zeros(1), np.zeros(1 << 17)  # 8 bytes and 1 MB of float64
    times = []
    for buf, reps in ((small, 20), (big, 3)):
        comm.Allreduce(MPI.IN_PLACE, buf)  # warm
        t = time.perf_counter()
        for _ in range(reps):
            comm.Allreduce(MPI.IN_PLACE, buf)
        times.append((time.perf_counter() - t) / reps)
    P = comm.size
    alpha = times[0] / (2 * math.log2(P))
    beta = max(0.0, times[1] - times[0]) / (2 * (P - 1) / P * big.nbytes)
    return comm.bcast((alpha, beta), root=0)


def first_layer_seconds(sizes: list[int], rows: int, T: int, dtype: str) -> float:
    """The measured time of the first layer's forward and weight-gradient GEMMs (and an input-
    gradient-sized third) at rows x sizes[0] by sizes[1] / T; the best of three."""
    cols = max(1, sizes[1] // T)
    rng = np.random.default_rng(0)
    a = rng.random((rows, sizes[0])).astype(dtype)
    w = rng.random((sizes[0], cols)).astype(dtype)
    z = np.empty((rows, cols), dtype=dtype)
    g = np.empty_like(w)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, w, out=z)
        np.matmul(a.T, z, out=g)
        np.matmul(a, w, out=z)
        best = min(best, time.perf_counter() - t)
    return best


def candidates(P: int, sizes: list[int], allowed: bool) -> list[tuple[int, int, int]]:
    """(D, T, S) grids of P ranks: all data first, then tensor, pipeline, and tensor x pipeline ones."""
    out = [(P, 1, 1)]
    if not allowed:
        return out
    tensors = [T for T in range(2, P + 1) if P % T == 0 and all(n >= T for n in sizes[1:-1])]
    pipes = [S for S in range(2, min(P, len(sizes) - 1) + 1) if P % S == 0]
    out += [(P // T, T, 1) for T in tensors] + [(P // S, 1, S) for S in pipes]
    out += [(P // (T * S), T, S) for T in tensors for S in pipes if P % (T * S) == 0]
    return out


def predict(sizes: list[int], B: int, grid: tuple[int, int, int], M: int, itemsize: int, alpha: float, beta: float,
            dtype: str) -> float:
    D, T, S = grid
    rows = -(-B // D)
    pairs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    whole_over_first = (2 * sum(pairs) + 2 * sum(pairs) + 2 * sum(pairs[1:])) / (6 * pairs[0])
    compute = first_layer_seconds(sizes, max(1, -(-rows // (M if S > 1 else 1))), T, dtype) * whole_over_first
    if S > 1:
        compute = compute * (M if S > 1 else 1) / S * (M + S - 1) / M
    n_params = model.Layout(sizes).n_params
    data = t_ar(D, n_params * itemsize / (T * S), alpha, beta)
    tensor = 0.0
    if T > 1:  # with S stages: each stage's share of the Allreduces, at a microbatch's rows, M times
        micro, times = (-(-rows // M), M / S) if S > 1 else (rows, 1.0)
        values = activation_values(ShardLayout(sizes, T, 0), micro)
        tensor = times * sum(t_ar(T, c * itemsize, alpha, beta) for c in values)
    pipe = 2 * M * (S - 1) / S * (alpha + -(-rows // M) * max(sizes[1:-1] or [0]) * itemsize * beta) if S > 1 else 0.0
    return compute + data + tensor + pipe


def build_parts(st: Any) -> None:
    """train.State's fields where the grid splits the model (tensor or pipeline groups); the
    grid is closed if building fails."""
    from pbp_hpc.parallel import pipeline, tensor

    try:
        (pipeline if st.grid.S > 1 else tensor).build(st)  # a T x S grid: pipeline stages split over tensor groups
    except BaseException:
        st.grid.close()
        raise


def _goes_with(cfg: Any, key: str) -> bool:
    """Whether parallel.<key> = 2 goes with the rest of the config (the combination rules, not a
    second list of them)."""
    from pbp_hpc.parallel import combinations

    trial = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"grid": "manual", key: 2})})
    return combinations.violation(trial) is None


def choose(cfg: Any, comm: MPI.Comm) -> tuple[Any, Optional[str]]:
    """With parallel.grid auto: the config with parallel.tensor and parallel.pipeline set by the
    model, and the header's line saying why (collective). Otherwise (cfg, None)."""
    if cfg.parallel.grid != "auto":
        return cfg, None
    p = cfg.parallel
    allowed = all(_goes_with(cfg, key) for key in ("tensor", "pipeline"))
    sizes, B = cfg.model.layers, cfg.train.batch_size
    grids = candidates(comm.size, sizes, allowed)
    if len(grids) == 1:
        why = "one rank" if comm.size == 1 else "only data parallelism goes with these settings"
        return cfg, f"pbp_hpc: grid auto: data {comm.size} ({why})"
    alpha, beta = measure_network(comm)
    itemsize = np.dtype(cfg.model.dtype).itemsize
    times = None
    if comm.rank == 0:
        times = [predict(sizes, B, g, p.microbatches, itemsize, alpha, beta, cfg.model.dtype) for g in grids]
    times = comm.bcast(times, root=0)
    D, T, S = grids[int(np.argmin(times))]
    shown = ", ".join(f"{d}x{t}x{s} {1e3 * x:.3g} ms" for (d, t, s), x in zip(grids, times))
    why = (f"pbp_hpc: grid auto: data {D} x tensor {T} x pipeline {S}, the least predicted step time of (data x tensor x "
           f"pipeline) {shown}; measured alpha {alpha * 1e6:.3g} us, beta {beta * 1e9:.3g} ns/byte")
    chosen = cfg.model_copy(update={"parallel": p.model_copy(update={"tensor": T, "pipeline": S})})
    return chosen, why
