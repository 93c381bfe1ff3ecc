"""Reducers, one module each, behind one factory: `make(cfg, comm, layout, xp)`.

    blocking    one Allreduce of the whole buffer                    (blocking.py)
    overlap     an Iallreduce per layer during the backward pass    (overlap.py)
    shm         node-wide shared memory, each rank updates a slice  (shm.py)
    shared_batch  the node's ranks share a batch's activations; each rank
                computes and updates its slice of the gradient       (shared_batch.py)
    cuda-aware / staged / nccl   device buffers, chosen by parallel.gpu_reducer (device.py)

The interface is base.Reducer. Modules are imported only when their reducer is made (this
package imports neither MPI nor CuPy). To add one: a module with a subclass of base.Reducer
and a line in HOST below, or `register(name, cls)` from a test or plugin; `parallel.reducer`
then accepts its name.
"""

from __future__ import annotations

from typing import Any

from pbp_hpc.registry import Registry

HOST = Registry("reducer", {
    "blocking": "pbp_hpc.parallel.reducers.blocking:BlockingReducer",
    "overlap": "pbp_hpc.parallel.reducers.overlap:OverlapReducer",
    "shm": "pbp_hpc.parallel.reducers.shm:SharedMemoryReducer",
    "shared_batch": "pbp_hpc.parallel.reducers.shared_batch:SharedBatchReducer",
})
DEVICE = Registry("device reducer", {
    "cuda-aware": "pbp_hpc.parallel.reducers.device:CudaAwareReducer",
    "staged": "pbp_hpc.parallel.reducers.device:StagedReducer",
    "nccl": "pbp_hpc.parallel.reducers.device:NcclReducer",
})
register = HOST.register

# The reducer's buffer is [gradients | extras]: scalars that ride along with the sum (base.py)
EXTRAS = 3  # slots after the gradients
LOSS_SLOT = 0  # offsets within the extras: the summed loss,
STOP_SLOT = 1  # the count of ranks asked to stop (a signal),
NOISE_SLOT = 2  # and this rank's mean-gradient norm^2 on the steps the noise scale is estimated (parallel/noise_scale.py)


def names() -> list[str]:
    """What `parallel.reducer` accepts: "auto" and every registered host reducer."""
    return ["auto", *HOST.names()]


# auto: at most this many rows of the batch per rank, a node's ranks compute each batch together
SHARED_BATCH_ROWS = 64


def choose_auto(grid: Any, rows_per_rank: int = SHARED_BATCH_ROWS + 1) -> tuple[str, str]:
    """`parallel.reducer: auto`: shared memory where ranks share a node, else one Allreduce; and why.

    Measured here (Net-1h, batch 1024, 2 cores): shm 0.47 s per epoch against blocking's 0.59 at
    4 ranks, 0.95 against 1.14 at 16 (oversubscribed), and never slower in the benchmark. On
    several nodes shm is the hierarchical path (node windows, then an Allreduce across nodes
    of 1/P of the buffer per rank). With one rank per node, or unequal ranks per node, there
    is no memory to share evenly: the blocking Allreduce (every rank decides alike, from the grid).

    Where ranks share a node and each has at most SHARED_BATCH_ROWS rows of the batch, they
    compute the batch together (shared_batch): measured here, 2 ranks, s/epoch, shm against
    shared_batch, in interleaved pairs: Net-2h at batch 128 (64 rows per rank) 7.68/8.18
    against 6.21/7.20; Net-1h at 128 2.67/2.31 against 2.37/2.58 (even); at batch 512 (256
    rows) Net-2h 4.40/5.15 against 4.57/4.57 (even) and Net-1h 1.40/1.43 against 1.70/1.68
    (shm ahead: its first layer runs on the active inputs in the forward pass too).
    """
    if grid.data.size == 1:
        return "blocking", "auto: one rank, nothing to combine"
    sizes = grid.node_sizes
    if not grid.equal_nodes:
        return "blocking", f"auto: unequal ranks per node ({min(sizes)}..{max(sizes)}), so no even shared-memory split"
    if sizes[0] == 1:
        return "blocking", "auto: one rank per node, no memory to share"
    nodes = grid.nodes
    across = f", then an Allreduce across {nodes} nodes" if nodes > 1 else ""
    if rows_per_rank <= SHARED_BATCH_ROWS:
        return "shared_batch", (f"auto: {sizes[0]} ranks share each node's memory and, at {rows_per_rank} rows "
                                f"of the batch per rank (<= {SHARED_BATCH_ROWS}), compute each batch together{across}")
    return "shm", f"auto: {sizes[0]} ranks share each node's memory{across}"


def make(cfg: Any, grid: Any, layout: Any, xp: Any, watch: Any = None) -> Any:
    """The reducer the config asks for, for buffers of namespace xp (collective).

    Host (numpy): parallel.reducer, "auto" resolved by choose_auto. Any other namespace takes the device path:
    parallel.gpu_reducer, resolved by what MPI can do (pbp_hpc.parallel.gpu.choose_reducer);
    the record of that choice lands in the reducer's describe(). grid: the run's parallel.grid.Grid
    (its data group is the reducer's communicator), or a bare communicator (tests). watch: the
    run's stall check (parallel.stall), which the reducer's waits report to.
    """
    import numpy as np

    from pbp_hpc.parallel.grid import Grid

    comm, grid = (grid.data, grid) if isinstance(grid, Grid) else (grid, None)  # a bare communicator: tests
    if xp is not np:
        reducer = make_device(cfg, comm, layout, xp)
        reducer.watch = reducer.watch if watch is None else watch
        return reducer
    from pbp_hpc.parallel import strategies

    name, why = cfg.parallel.reducer, "parallel.reducer"
    if name == "auto" and not strategies.STRATEGIES.load(cfg.parallel.strategy).sums_gradients:
        name, why = "blocking", (f"auto: strategy {cfg.parallel.strategy} exchanges parameters its own way; "
                                 "its buffers are private (blocking)")
    elif name == "auto":
        # shared_batch batches the node's examples together: not for the one-at-a-time baseline
        rows = -(-cfg.train.batch_size // comm.size) if cfg.algorithm == "batched" else SHARED_BATCH_ROWS + 1
        name, why = choose_auto(grid if grid is not None else _grid_of(comm), rows)
    reducer = HOST.load(name)(comm, layout, getattr(xp, cfg.model.dtype), xp, grid)
    reducer.choice = {"reducer_reason": why}
    reducer.watch = reducer.watch if watch is None else watch
    try:
        configure(reducer, cfg.parallel)
    except BaseException:
        reducer.close()
        raise
    return reducer


def _grid_of(comm: Any) -> Any:
    """The default grid over a bare communicator, its communicators freed (only its facts are read)."""
    from pbp_hpc.parallel.grid import make_grid

    grid = make_grid(comm)
    grid.close()
    return grid


def configure(reducer: Any, parallel: Any) -> None:
    """parallel.compression and parallel.fusion_bytes on a host reducer; the record says what it sends."""
    if parallel.compression != "none":
        reducer.use_compression(parallel.compression, parallel.error_feedback)
    if parallel.fusion_bytes:
        reducer.fuse(parallel.fusion_bytes)
    reducer.choice.update(compression=parallel.compression, error_feedback=parallel.error_feedback,
                          fusion_bytes=parallel.fusion_bytes, wire_bytes_per_step=reducer.wire_bytes())


def make_device(cfg: Any, comm: Any, layout: Any, xp: Any) -> Any:
    """The device path of make(), for any namespace (numpy stands in for CuPy in the CPU tests)."""
    from pbp_hpc.parallel import gpu

    name, record = gpu.choose_reducer(cfg.parallel.gpu_reducer, comm, xp)
    reducer = DEVICE.load(name)(comm, layout, getattr(xp, cfg.model.dtype), xp)
    reducer.choice = record
    return reducer
