"""The node's ranks compute one batch together; each sums the gradient of its own slice.

With this reducer the local step is engine.shared_batch.SharedBatchStep: each rank writes its
rows' activations and deltas into node-shared buffers (node_batch()), and after finish()'s
barrier computes the gradient of its own slice of every layer over all the node's rows in
phase 2 (SharedBatchStep.complete, which the strategy calls; then sum_across()), so the sum over a node's examples happens inside the GEMMs and no rank writes or
reads a whole gradient (see that module for why this is faster at small batches). The
parameters and optimizer state are one node-shared copy, as with shm; each rank updates its
slices and updated() is the barrier after which every rank reads the new parameters. On several
nodes, the ranks owning the same slice on every node add their slices with one Allreduce
(optionally compressed, parallel.compression).

Per step: two barriers (as shm), and across nodes one Allreduce of 1/P of the gradient per rank.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import model
from pbp_hpc.engine.shared_batch import NodeBatch, flat_span, node_buffers, spans
from pbp_hpc.parallel.reducers import compression
from pbp_hpc.parallel.reducers.base import EXTRAS
from pbp_hpc.parallel.reducers.shm import NodeCopyReducer, SharedRows


class SharedBatchReducer(NodeCopyReducer):
    name = "shared_batch"

    def __init__(self, comm: MPI.Comm, layout: model.Layout, dtype: Any, xp: Any, grid: Any = None):
        if xp is not np:
            raise ValueError("parallel.reducer=shared_batch works on host (numpy) buffers")
        super().__init__(comm, layout, dtype, xp, grid)
        self.step = 0
        self.compressed: Optional[compression.CompressedSum] = None
        if self.shared is None:  # one rank: nothing to share, a plain reducer
            return
        node = self.shared.local
        self.slices = spans(layout, node.size, node.rank)
        size = sum((r.stop - r.start) * layout.sizes[l + 1] + (c.stop - c.start) for l, r, c in self.slices)
        self.own_grad = np.zeros(size, dtype=dtype)  # this rank's slices of the gradient, one buffer
        self.views, self._shares, off = [], [], 0
        for l, rows, cols in self.slices:
            w_span, b_span = flat_span(layout, l, rows, cols)
            nw, nb = w_span.stop - w_span.start, b_span.stop - b_span.start
            gw = self.own_grad[off : off + nw].reshape(rows.stop - rows.start, layout.sizes[l + 1])
            gb = self.own_grad[off + nw : off + nw + nb].reshape(1, nb)
            self.views.append((gw, gb))
            self._shares += [(w_span, [gw.reshape(-1)]), (b_span, [gb.reshape(-1)])]
            off += nw + nb

    def allocate(self, size: int) -> Any:
        if self.comm.size == 1:
            return super().allocate(size)
        # the windows: each rank's extras and their mailboxes (no gradient row: see shares())
        self.shared = SharedRows(self.node_grid(), 0, self.dtype, self.name)
        # The whole-gradient buffer the interface promises is never written here but for its
        # extras: np.empty's untouched pages cost no memory.
        grad = np.empty(size, dtype=self.dtype)
        grad[self.n :] = 0
        return grad

    def node_batch(self, rows_per_rank: int) -> Optional[NodeBatch]:
        if self.shared is None:
            return None
        node = self.shared.local
        batch = node_buffers(self.layout, rows_per_rank, node.rank, node.size, self.shared.node_buffer)
        self.shared.sync_barrier()
        return batch

    @property
    def one_node(self) -> bool:
        """Whether every rank is on this node: then the node's sum is the whole sum."""
        return self.shared is not None and self.shared.cross is None

    def use_compression(self, kind: str, feedback: bool) -> None:
        """Only the Allreduce across nodes sends anything: it is the one compressed."""
        if self.shared is not None and self.shared.cross is not None:
            self.compressed = compression.CompressedSum(self.shared.cross, self.own_grad.shape[0], kind, feedback)

    def wire_bytes(self) -> int:
        if self.shared is None:
            return super().wire_bytes()
        if self.shared.cross is None:
            return 0
        nodes, item = self.shared.cross.size, self.own_grad.itemsize
        extras = compression.allreduce_bytes(nodes, EXTRAS, item)
        if self.compressed is not None:
            return self.compressed.wire_bytes() + extras
        return compression.allreduce_bytes(nodes, self.own_grad.shape[0], item) + extras

    def finish(self) -> None:
        """Every rank's rows are in the node's buffers; the extras (loss, stop) are global."""
        shared = self.shared
        if shared is None:
            return self._timed_allreduce(self.grad)
        t = time.perf_counter()
        shared.add_extras(self.extras, self.step, self.watch)  # alternating mailboxes: see shm.py
        self.step += 1
        if shared.cross is not None:
            self._watched(lambda: shared.cross.Allreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM))
        self.seconds += time.perf_counter() - t

    def sum_across(self) -> None:
        """Phase 2 wrote this rank's slices of its node's gradient (SharedBatchStep.complete):
        on several nodes, add them up with the ranks owning the same slices there."""
        cross = self.shared.cross if self.shared is not None else None
        if cross is None:
            return
        t = time.perf_counter()
        if self.compressed is not None:
            self.compressed.blocking(self.own_grad, self._watched)
        else:
            self._watched(lambda: cross.Allreduce(MPI.IN_PLACE, self.own_grad, op=MPI.SUM))
        self.seconds += time.perf_counter() - t
