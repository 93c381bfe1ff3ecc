"""`parallel.grid: auto` (the default): the data x tensor x pipeline split of the world, chosen by a cost model.

It chooses where parallel.tensor and parallel.pipeline are left at 1 (sizes above 1 are the grid
as given), keeps a resumed checkpoint's grid, and leaves data parallelism only for a grid
predicted at least 10% and 50 us a step faster (MARGIN, MIN_SAVING_S), and splits units only
within a node (within_nodes).

For each grid (D, T, S) with D x T x S = P (T x S grids too: each pipeline stage's layers split
over its tensor group), the model predicts a step's time from measurements taken here, at
start-up, on this job:

    step = compute + data + tensor + pipeline
    compute  = the measured time of the first layer's three GEMMs at this grid's shape
               (ceil(B / D) rows, n_out / T columns; the largest layer of every network here),
               times the whole network's flops over the first layer's; with S stages, M
               microbatches of the busiest stage's share of the work (volumes.work_share) in
               the pipeline's bubble (M + S - 1) / M
    data, tensor, pipeline = the messages' alpha-beta times, parallel/volumes.comm_seconds (one
               place for those formulas, shared with analyze's model of a grid, analyze/gridmodel.py)

alpha and beta are fitted from the fastest of several timed Allreduces over the world (8 bytes
and 1 MB): the network's own cost, not the waits for a partner to be scheduled on a shared
machine, so that the choice does not follow the load. Every rank takes rank 0's measurements, so all
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
from threadpoolctl import threadpool_limits

from pbp_hpc.engine import model
from pbp_hpc.parallel import reducers, volumes


def measure_network(comm: MPI.Comm) -> tuple[float, float]:
    """(alpha seconds, beta seconds per byte) of this world's Allreduce, rank 0's, on every rank."""
    if comm.size == 1:
        return 0.0, 0.0
    small, big = np.zeros(1), np.zeros(1 << 17)  # 8 bytes and 1 MB of float64
    times = []
    for buf, reps in ((small, 20), (big, 20)):
        comm.Allreduce(MPI.IN_PLACE, buf)  # warm
        best = math.inf
        for _ in range(reps):
            # the fastest call, not the mean: on a shared machine a call's time is mostly the wait
            # for the partner to be scheduled, which would make the choice depend on the load
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf)
            best = min(best, time.perf_counter() - t)
        times.append(best)
    P = comm.size
    alpha = times[0] / (2 * math.log2(P))
    beta = max(0.0, times[1] - times[0]) / (2 * (P - 1) / P * big.nbytes)
    return comm.bcast((alpha, beta), root=0)


# Rows beyond which the GEMMs are timed at this many and scaled: a GEMM's rate no longer grows
# there, and a large batch (16,384 rows and more) would otherwise allocate and time hundreds of MB
# at start-up.
TIMED_ROWS = 1024


def first_layer_seconds(sizes: list[int], rows: int, T: int, dtype: str) -> float:
    """The measured time of the first layer's forward and weight-gradient GEMMs (and an input-
    gradient-sized third) at rows x sizes[0] by sizes[1] / T; the best of three (above
    TIMED_ROWS rows, timed at TIMED_ROWS and scaled by the rows)."""
    if rows > TIMED_ROWS:
        return first_layer_seconds(sizes, TIMED_ROWS, T, dtype) * rows / TIMED_ROWS
    cols = max(1, sizes[1] // T)
    rng = np.random.default_rng(0)
    a = rng.random((rows, sizes[0]), dtype=np.float32).astype(dtype)
    w = rng.random((sizes[0], cols)).astype(dtype)
    z = np.empty((rows, cols), dtype=dtype)
    g = np.empty_like(w)
    best = math.inf
    with threadpool_limits(limits=1, user_api="blas"):  # every candidate alike, and no threads oversubscribing the cores
        for _ in range(3):
            t = time.perf_counter()
            np.matmul(a, w, out=z)
            np.matmul(a.T, z, out=g)
            np.matmul(a, w, out=z)
            best = min(best, time.perf_counter() - t)
    return best


def candidates(P: int, sizes: list[int], allowed: bool) -> list[tuple[int, int, int]]:
    return volumes.grids(P, sizes) if allowed else [(P, 1, 1)]


def node_sum_seconds(n: int, dtype: str) -> float:
    """The measured time of one pass adding n values into n (the best of three): what summing a
    gradient of n values in node-shared memory costs a rank, each summing its 1/P of P ranks'
    rows (reducers shm and shared_batch, which reducer auto picks for data parallelism on one node)."""
    a, b = np.ones(n, dtype=dtype), np.ones(n, dtype=dtype)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t)
    return best


# Where all data runs as reducer shared_batch (one node, reducer auto, at most
# reducers.SHARED_BATCH_ROWS rows a rank), its compute is priced this many times its GEMMs timed
# alone: its ranks run their GEMMs together over node-shared activations and whole weight
# matrices, and wait at two barriers a step. Profiled (Net-1h, batch 128, 2 ranks) its GEMMs took
# 1.6x their time alone; over whole runs (2 ranks, batch 128, 2026-12-07) the model, pricing them
# alone, put data/tensor at 1.01-1.10 (Net-2h) and 1.08-1.10 (Net-1h) where the runs measured
# 1.14-1.19 and 1.23-1.39, and auto kept data parallelism (its margin, MARGIN) in some runs of
# each: those runs imply corrections of 1.04-1.29, and 1.2 is within them.
SHARED_BATCH_SLOWDOWN = 1.2


def predict(sizes: list[int], B: int, grid: tuple[int, int, int], M: int, itemsize: int, alpha: float, beta: float,
            dtype: str, node_sum: Optional[float] = None) -> float:
    """A step's predicted seconds on this grid. node_sum: where all data ranks share one node and
    the reducer is auto, the data group's sum is in shared memory (no message): that pass's measured
    time and two barriers' latency replace the Allreduce's alpha-beta time."""
    D, T, S = grid
    rows = -(-B // D)
    M = min(M, rows)  # empty microbatches are skipped
    pairs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    whole_over_first = (2 * sum(pairs) + 2 * sum(pairs) + 2 * sum(pairs[1:])) / (6 * pairs[0])
    compute = first_layer_seconds(sizes, max(1, volumes.microbatch_rows(rows, M) if S > 1 else rows), T, dtype) * whole_over_first
    if S > 1:  # M microbatches of the busiest stage's layers, in the bubble's time
        compute = compute * M * volumes.work_share(sizes, 1, S) * volumes.bubble(M, S)
    comm = volumes.comm_seconds(sizes, grid, rows, M, itemsize, alpha, beta)
    if node_sum is not None and grid[0] > 1 and grid[1] == grid[2] == 1:
        comm["data"] = node_sum + 2 * 2 * math.log2(grid[0]) * alpha
        if rows <= reducers.SHARED_BATCH_ROWS:
            compute *= SHARED_BATCH_SLOWDOWN
    return compute + sum(comm.values())


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


# How much faster (predicted) another grid must be than all-data before auto leaves data
# parallelism: the model's inputs are a few timed calls, and where two grids are close the
# simpler one, whose gradient exchange every reducer and strategy supports, is the safer pick.
MARGIN = 0.9
# ... and by at least this much a step: below it (small networks, where every term is a few
# microseconds) the prediction is within the jitter of the timed calls it is made of, and a run
# would change grids from one start to the next for nothing.
MIN_SAVING_S = 50e-6


def checkpoint_grid(cfg: Any, comm: MPI.Comm) -> Optional[tuple[int, int, int]]:
    """The grid of the checkpoint this run resumes, where it has one and fits this world
    (rank 0 reads it; collective). A resumed run keeps its grid so that it continues bit for
    bit; the checkpoint's other fields are checked when it is read."""
    if not cfg.checkpoint.resume:
        return None
    found = None
    if comm.rank == 0:
        from pbp_hpc import checkpoint, resume

        grid = checkpoint.meta_field(resume.checkpoint_path(cfg), "grid")
        if isinstance(grid, list) and len(grid) == 3 and all(isinstance(x, int) and x >= 1 for x in grid) \
                and math.prod(grid) == comm.size:
            found = tuple(grid)
    return comm.bcast(found, root=0)


def _oversubscribed(comm: MPI.Comm) -> bool:
    """Whether this rank's node runs more ranks than the cores its ranks may use together."""
    from pbp_hpc.parallel.provenance import cpu_set

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.size > len(set().union(*node.allgather(set(cpu_set()))))
    finally:
        node.Free()


def within_nodes(comm: MPI.Comm, grids: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The grids whose tensor groups (T consecutive world ranks, parallel/grid.py) each lie on one
    node (collective): a tensor group exchanges activations several times a step, which a node's
    memory carries and a network between nodes would make the slowest part of every step; data
    and pipeline groups may span nodes, as on a cluster (Megatron-LM places them the same way)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leaders = comm.allgather(node.allreduce(comm.rank, op=MPI.MIN))  # each rank's node, named by its lowest rank
    node.Free()
    return [g for g in grids if all(len(set(leaders[i:i + g[1]])) == 1 for i in range(0, comm.size, g[1]))]


def choose(cfg: Any, comm: MPI.Comm, n_train: Optional[int] = None) -> tuple[Any, Optional[str]]:
    """With parallel.grid auto and tensor and pipeline left at 1: the config with parallel.tensor
    and parallel.pipeline set by the model, and the header's line saying why (collective).
    Otherwise (cfg, None): the grid as given. n_train: the training examples (a batch larger than
    them is their number of rows)."""
    p = cfg.parallel
    if p.grid != "auto" or p.tensor > 1 or p.pipeline > 1:
        return cfg, None
    allowed = all(_goes_with(cfg, key) for key in ("tensor", "pipeline"))
    sizes, B = cfg.model.layers, min(cfg.train.batch_size, n_train or cfg.train.batch_size)
    grids = within_nodes(comm, candidates(comm.size, sizes, allowed)) if comm.size > 1 else [(1, 1, 1)]
    if len(grids) == 1:
        why = "one rank" if comm.size == 1 else "only data parallelism goes with these settings"
        return cfg, f"pbp_hpc: grid auto: data {comm.size} ({why})"
    kept = checkpoint_grid(cfg, comm)
    if kept in grids:
        D, T, S = kept
        why = (f"pbp_hpc: grid auto: data {D} x tensor {T} x pipeline {S}, the grid of the checkpoint it resumes "
               "(so that the run continues bit for bit)")
        return cfg.model_copy(update={"parallel": p.model_copy(update={"tensor": T, "pipeline": S})}), why
    if comm.allreduce(_oversubscribed(comm), op=MPI.LOR):
        return cfg, (f"pbp_hpc: grid auto: data {comm.size} (more ranks than cores on a node: start-up timings would "
                     "measure the ranks' contention for the cores, not the grids)")
    alpha, beta = measure_network(comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = comm.allreduce(node.size, op=MPI.MIN) == comm.size
    node.Free()
    itemsize = np.dtype(cfg.model.dtype).itemsize
    times = None
    if comm.rank == 0:
        node_sum = node_sum_seconds(model.Layout(sizes).n_params, cfg.model.dtype) if one_node and p.reducer == "auto" else None
        times = [predict(sizes, B, g, p.microbatches, itemsize, alpha, beta, cfg.model.dtype, node_sum) for g in grids]
    times = comm.bcast(times, root=0)
    best = int(np.argmin(times))
    if times[best] > MARGIN * times[0] or times[0] - times[best] < MIN_SAVING_S:
        best = 0  # grids[0] is all data
    D, T, S = grids[best]
    shown = ", ".join(f"{d}x{t}x{s} {1e3 * x:.3g} ms" for (d, t, s), x in zip(grids, times))
    rule = (f"the least predicted step time" if best else
            f"no other grid predicted {100 * (1 - MARGIN):.0f}% and {MIN_SAVING_S * 1e6:.0f} us a step faster than all data")
    why = (f"pbp_hpc: grid auto: data {D} x tensor {T} x pipeline {S}, {rule} of (data x tensor x "
           f"pipeline) {shown}; measured alpha {alpha * 1e6:.3g} us, beta {beta * 1e9:.3g} ns/byte"
           " (parallel.grid manual keeps all data)")
    chosen = cfg.model_copy(update={"parallel": p.model_copy(update={"tensor": T, "pipeline": S})})
    return chosen, why
