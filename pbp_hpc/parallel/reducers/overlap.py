"""A non-blocking Allreduce per layer, started as soon as that layer's gradient is final.

The top layer is finished first, so its bucket also carries the extras (the loss is known
after the forward pass). Whether the sends really proceed while the next GEMM runs depends on
the MPI library's progress engine (MPICH: MPIR_CVAR_ASYNC_PROGRESS=1).

parallel.fusion_bytes (Horovod's tensor fusion): consecutive layers are combined into one
message until it holds at least that many bytes, so a deep net of small layers does not pay
one latency per layer; the message starts when its lowest layer is final (the layers of a
bucket are contiguous in the buffer, so combining them copies nothing). 0: a message per layer.

parallel.compression: each bucket's gradients travel as 16-bit words (compression.py); its
first half is started with the bucket, the rest waits for finish(); the extras go in their own
full-precision message.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from mpi4py import MPI

from pbp_hpc.parallel.reducers import compression
from pbp_hpc.parallel.reducers.base import EXTRAS, Reducer


class OverlapReducer(Reducer):
    name = "overlap"

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any, grid: Any = None):
        super().__init__(comm, layout, dtype, xp, grid)
        self.fusion_bytes = 0
        self.kind: Optional[str] = None  # the compression, if any
        self.feedback = False
        self.requests: list[MPI.Request] = []
        self._plan()

    def fuse(self, fusion_bytes: int) -> None:
        self.fusion_bytes = fusion_bytes
        self._plan()

    def use_compression(self, kind: str, feedback: bool) -> None:
        if self.comm.size > 1:
            self.kind, self.feedback = kind, feedback
            self._plan()

    def _plan(self) -> None:
        """The buckets: runs of layers from the top down, each at least fusion_bytes (the last may be less)."""
        groups: list[list[int]] = [[]]
        size = 0
        for l in reversed(range(self.layout.n_layers)):
            if groups[-1] and size >= self.fusion_bytes:
                groups.append([])
                size = 0
            groups[-1].append(l)
            s = self.layout.layer_slice(l)
            size += (s.stop - s.start) * self.grad.itemsize
        top = self.n if self.kind else self.grad.shape[0]  # uncompressed, the top bucket carries the extras
        spans = [slice(self.layout.layer_slice(g[-1]).start, top if g[0] == self.layout.n_layers - 1
                       else self.layout.layer_slice(g[0]).stop) for g in groups]
        self.buckets = [self.grad[s] for s in spans]  # views made once, not per step
        self.starts = {g[-1]: i for i, g in enumerate(groups)}  # the layer whose gradient completes bucket i
        self.sums = [compression.CompressedSum(self.comm, b.shape[0], self.kind, self.feedback) for b in self.buckets] \
            if self.kind else []
        self.started: list[int] = []

    def wire_bytes(self) -> int:
        P, item = self.comm.size, self.grad.itemsize
        if not self.sums:
            return sum(compression.allreduce_bytes(P, b.shape[0], item) for b in self.buckets)
        return sum(s.wire_bytes() for s in self.sums) + compression.allreduce_bytes(P, EXTRAS, item)

    def layer_done(self, l: int) -> None:
        if self.comm.size == 1 or l not in self.starts:
            return
        t = time.perf_counter()
        i = self.starts[l]
        if not self.sums:
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buckets[i], op=MPI.SUM))
        else:
            if not self.started:  # the first bucket of the step: the loss is known
                self.requests.append(self._start_extras())
            self.sums[i].start(self.buckets[i])
            self.started.append(i)
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        if not self.requests and not self.started:
            return
        t = time.perf_counter()
        if self.started:
            compression.run([self.sums[i] for i in self.started], [self.buckets[i] for i in self.started], self.watch.wait)
            self.started = []
        self.watch.wait(self.requests)  # MPI_Waitall, with the stall check
        self.requests.clear()
        self.seconds += time.perf_counter() - t
