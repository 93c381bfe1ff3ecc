"""A non-blocking Allreduce per layer, started as soon as that layer's gradient is final.

The top layer is finished first, so its bucket also carries the extras (the loss is known
after the forward pass). Whether the sends really proceed while the next GEMM runs depends on
the MPI library's progress engine (MPICH: MPIR_CVAR_ASYNC_PROGRESS=1).
"""

from __future__ import annotations

import time
from typing import Any

from mpi4py import MPI

from pbp_hpc.parallel.reducers.base import Reducer


class OverlapReducer(Reducer):
    name = "overlap"

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any):
        super().__init__(comm, layout, dtype, xp)
        spans = [layout.layer_slice(l) for l in range(layout.n_layers)]
        spans[-1] = slice(spans[-1].start, self.grad.shape[0])
        self.buckets = [self.grad[s] for s in spans]  # views made once, not per step
        self.requests: list[MPI.Request] = []

    def layer_done(self, l: int) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buckets[l], op=MPI.SUM))
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        if not self.requests:
            return
        t = time.perf_counter()
        self.watch.wait(self.requests)  # MPI_Waitall, with the stall check
        self.requests.clear()
        self.seconds += time.perf_counter() - t
