"""The gradient sum through node-wide shared memory: no message, no copy.

Every rank's gradient buffer is a row of one MPI-3 shared window, and the node holds one copy
of the parameters (and of any optimizer state). finish(): each rank posts its extras (loss,
stop flag) to its mailbox; after a barrier every rank adds up the mailboxes into its own row.
shares(): each of the node's P ranks updates its 1/P slice of the shared parameters from every
rank's row of that slice, in rank order (so the bits do not depend on who sums); updated() is
a barrier, after which every rank sees the new parameters (and no rank writes its gradient
again before every rank has read it). Two barriers per step, no buffer for the sum. Per rank
and step that reads the gradients once and updates 1/P of theta, where MPI_Allreduce copies
the buffer through MPI's cells and back and every rank then updates all of theta. On several
nodes, a slice's node sum is allreduced among the ranks owning that slice on every node (1/P
of the buffer each); each node keeps a copy.

The mailboxes alternate between steps: a rank a step ahead posts to the other one, so it
cannot overwrite extras a slower rank is still adding up.

After finish() this rank's buffer holds the global extras but its own gradient: the global
gradient is only ever seen slice by slice, through shares().
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel.reducers import compression
from pbp_hpc.parallel.reducers.base import EXTRAS, Fill, Reducer


class SharedRows:
    """One gradient row per rank and the node's parameter-shaped buffers, in shared windows."""

    def __init__(self, grid: Any, n: int, dtype: Any, reducer: str = "shm"):
        """grid: the run's (parallel.grid): its node communicator holds the windows, its across
        communicator joins the ranks owning the same slice on every node."""
        if not grid.equal_nodes:
            sizes = grid.node_sizes
            raise ConfigError(f"parallel.reducer={reducer} needs the same number of ranks on every node, got {sorted(set(sizes))} "
                              "(a node's slices of the buffer must match across nodes): launch as many ranks on "
                              "every node (mpiexec -ppn, srun --ntasks-per-node), or choose parallel.reducer=auto, "
                              "which takes blocking here")
        self.local = grid.node
        self.cross: Optional[MPI.Comm] = None if grid.one_node else grid.across
        self.dtype, self.item = dtype, np.dtype(dtype).itemsize
        # each rank's row: its buffer [gradients | extras], then two mailboxes for its extras
        width = n + 3 * EXTRAS
        self.win = MPI.Win.Allocate_shared(width * self.item, self.item, comm=self.local)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the run; Sync() orders loads and stores
        full = [np.frombuffer(self.win.Shared_query(r)[0], dtype=dtype, count=width) for r in range(self.local.size)]
        self.rows = [f[: n + EXTRAS] for f in full]
        self.mailboxes = [[f[n + EXTRAS + k * EXTRAS : n + EXTRAS + (k + 1) * EXTRAS] for f in full] for k in (0, 1)]
        full[self.local.rank][...] = 0
        self.wins = [self.win]

    def node_buffer(self, n: int) -> np.ndarray:
        """n values in a window of their own, one copy per node, zeroed (collective)."""
        win = MPI.Win.Allocate_shared(n * self.item if self.local.rank == 0 else 0, self.item, comm=self.local)
        win.Lock_all(MPI.MODE_NOCHECK)
        self.wins.append(win)
        buf = np.frombuffer(win.Shared_query(0)[0], dtype=self.dtype, count=n)
        if self.local.rank == 0:
            buf[...] = 0
        return buf

    def filled(self, n: int, fill: Fill) -> np.ndarray:
        """The node's one copy of n values, filled by the node's first rank (collective)."""
        buf = self.node_buffer(n)
        if self.local.rank == 0:
            fill(buf)
        self.sync_barrier()
        return buf

    def zeroed(self, n: int) -> np.ndarray:
        """The node's one copy of n zeros, every rank past its allocation (collective)."""
        buf = self.node_buffer(n)
        self.sync_barrier()
        return buf

    def add_extras(self, extras: np.ndarray, step: int, watch: Any) -> None:
        """extras <- the sum of every node rank's extras, through the mailboxes of `step`, after
        a barrier (which also orders every rank's earlier writes to the windows)."""
        mail = self.mailboxes[step % 2]
        mail[self.local.rank][...] = extras
        self.sync_barrier(watch)
        sum_parts(mail, extras)  # only this rank reads or writes its own row's extras

    def sync_barrier(self, watch: Any = None) -> None:
        """A barrier that also orders every rank's loads and stores to the windows around it."""
        for w in self.wins:
            w.Sync()
        if watch is None:
            self.local.Barrier()
        else:
            with watch:  # the stall check
                self.local.Barrier()
        for w in self.wins:
            w.Sync()

    def free(self) -> None:
        for w in self.wins:
            w.Unlock_all()
            w.Free()
        self.wins = []


class NodeCopyReducer(Reducer):
    """A reducer whose node holds one copy of the parameters and optimizer state, in shared
    windows (shm, shared_batch); with one rank, a plain reducer (shared stays None)."""

    shared: Optional[SharedRows] = None  # made by the subclass's allocate()
    _own_grid: Any = None  # made on a bare communicator (tests): this reducer frees it

    def node_grid(self) -> Any:
        """The run's grid, or one of its own over comm where it was made on a bare communicator."""
        if self.grid is None:
            from pbp_hpc.parallel.grid import make_grid

            self.grid = self._own_grid = make_grid(self.comm)
        return self.grid
    slice_sums, slice_sum_bytes = 0, 0  # the optimizer's reductions of per-layer norms (slice_sum)

    def parameters(self, fill: Fill) -> Any:
        """The node's one copy of the parameters, filled by the node's first rank."""
        if self.shared is None:
            return super().parameters(fill)
        return self.shared.filled(self.n, fill)

    def state_buffer(self) -> Any:
        if self.shared is None:
            return super().state_buffer()
        return self.shared.zeroed(self.n)

    def updated(self) -> None:
        if self.shared is None:
            return
        t = time.perf_counter()
        self.shared.sync_barrier(self.watch)  # the whole of theta is new before any rank's next forward pass
        self.seconds += time.perf_counter() - t

    def slice_sum(self) -> Optional[Any]:
        return None if self.shared is None else self._sum_over_node

    def _sum_over_node(self, buf: np.ndarray) -> None:
        """buf <- its sum over the node's ranks (whose slices make up the parameters): one small
        Allreduce, timed as communication and counted (slice_sums, the run's record)."""
        t = time.perf_counter()
        self._watched(lambda: self.shared.local.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        self.seconds += time.perf_counter() - t
        self.slice_sums += 1
        self.slice_sum_bytes = buf.nbytes

    def close(self) -> None:
        """Free the windows (collective). Without it they live until MPI_Finalize."""
        self.watch.close()
        if self.shared is not None:
            self.shared.free()
            self.shared = None
        if self._own_grid is not None:
            self._own_grid.close()
            self._own_grid = None


class SharedMemoryReducer(NodeCopyReducer):
    name = "shm"
    sums_in_update = True
    ALIGN = 16  # slice boundaries on 64-byte lines (float32), so no two ranks write one line

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any, grid: Any = None):
        if xp is not np:
            raise ValueError("parallel.reducer=shm works on host (numpy) buffers")
        super().__init__(comm, layout, dtype, xp, grid)  # calls allocate(), which makes the windows
        if self.shared is None:  # one rank: a plain buffer, and nothing to share
            return
        n, P, r = self.n, self.shared.local.size, self.shared.local.rank
        lo, hi = (min(n, n * k // P // self.ALIGN * self.ALIGN) if k < P else n for k in (r, r + 1))
        parts = [row[lo:hi] for row in self.shared.rows]  # this rank's slice of every rank's gradient
        self.step = 0
        # several nodes: the slice's sum is needed whole, for the Allreduce across nodes
        self.acc = np.empty(hi - lo, dtype=dtype) if self.shared.cross is not None else None
        self.parts = parts
        self.compressed: Optional[compression.CompressedSum] = None
        self._shares = [(slice(lo, hi), parts if self.acc is None else [self.acc])]

    def use_compression(self, kind: str, feedback: bool) -> None:
        """Only the Allreduce across nodes sends anything: it is the one compressed."""
        if self.shared is not None and self.shared.cross is not None:
            self.compressed = compression.CompressedSum(self.shared.cross, self.acc.shape[0], kind, feedback)

    def wire_bytes(self) -> int:
        """Across nodes only: within a node the gradients are read from shared memory."""
        if self.shared is None or self.shared.cross is None:
            return 0
        nodes, item = self.shared.cross.size, self.acc.itemsize
        extras = compression.allreduce_bytes(nodes, EXTRAS, item)
        if self.compressed is not None:
            return self.compressed.wire_bytes() + extras
        return compression.allreduce_bytes(nodes, self.acc.shape[0], item) + extras

    def allocate(self, size: int) -> Any:
        if self.comm.size == 1:
            return super().allocate(size)
        self.shared = SharedRows(self.node_grid(), self.n, self.dtype)
        return self.shared.rows[self.shared.local.rank]


    def finish(self) -> None:
        shared = self.shared
        if shared is None:
            return
        t = time.perf_counter()
        shared.add_extras(self.extras, self.step, self.watch)  # and every rank's gradient is in its row
        self.step += 1
        if shared.cross is not None:
            sum_parts(self.parts, self.acc)
            if self.compressed is not None:
                extras = shared.cross.Iallreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)
                self.compressed.blocking(self.acc, self._watched)
                self.watch.wait(extras)
            else:
                with self.watch:
                    shared.cross.Allreduce(MPI.IN_PLACE, self.acc, op=MPI.SUM)
                    shared.cross.Allreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)
        self.seconds += time.perf_counter() - t



def sum_parts(parts: list[Any], out: Any) -> None:
    if len(parts) == 1:
        out[...] = parts[0]
        return
    np.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out += part
