"""Whole models from the parts ranks hold, and back: the one place that assembles them.

A rank's parameters (and any buffer laid out like them: optimizer state, a gradient) follow its
engine.layout.Layout, which may hold only part of each layer. Checkpoints, train.save_model,
evaluation and return_params want the whole model, in the whole layout's flat order:

    whole = gather_whole(layout, local, grid.model)          # on every rank of grid.model
    whole = gather_whole(layout, local, grid.model, root=0)  # on its rank 0 only (None elsewhere)
    scatter_whole(layout, whole, local)                      # each rank takes its part

Where every rank holds everything (today's replicated layout, grid.model is COMM_SELF) the
gather is the rank's own buffer, with no communication and no copy.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.layout import Layout, put, take


def gather_whole(layout: Layout, local: Any, comm: MPI.Comm, root: Optional[int] = None) -> Optional[np.ndarray]:
    """The whole model's flat vector from the parts the ranks of comm hold (collective over comm).

    Each rank sends its layout's parts (a few small objects) and its buffer; the receiver puts
    every rank's buffer in its place. A parameter two ranks hold (a replicated bias) is written
    by both, with the same value. Raises ValueError if some parameter is held by no rank."""
    local = np.asarray(local)
    if comm.size == 1:
        if not layout.is_whole:
            raise ValueError("a single rank holds only part of the model: nothing to gather the rest from")
        return local
    everyone = root is None
    parts = comm.allgather(layout.parts) if everyone else comm.gather(layout.parts, root=root)
    counts = comm.allgather(local.shape[0]) if everyone else comm.gather(local.shape[0], root=root)
    receiving = everyone or comm.rank == root
    recv = np.empty(sum(counts), dtype=local.dtype) if receiving else None
    spec = [recv, counts] if receiving else None
    if everyone:
        comm.Allgatherv(local, spec)
    else:
        comm.Gatherv(local, spec, root=root)
    if not receiving:
        return None
    full = Layout(layout.sizes)
    whole = np.empty(full.n_params, dtype=local.dtype)
    held = np.zeros(full.n_params, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for r, p in enumerate(parts):
        lay = Layout(layout.sizes, p)
        put(lay, recv[offsets[r] : offsets[r + 1]], whole)
        put(lay, np.ones(lay.n_params, dtype=bool), held)
    if not held.all():
        raise ValueError(f"{int((~held).sum())} of {full.n_params} parameters are held by no rank of the group")
    return whole


def scatter_whole(layout: Layout, whole: np.ndarray, local: Any, xp: Any = np) -> None:
    """Fill this rank's buffer (of namespace xp) from the whole model's host vector, which every
    rank has (the checkpoint is broadcast): no communication."""
    if layout.is_whole:
        local[...] = xp.asarray(whole)
        return
    host = np.empty(layout.n_params, dtype=whole.dtype)
    take(layout, whole, host)
    local[...] = xp.asarray(host)
