"""Gradient reducers: how the ranks' summed gradients become one global sum.

Every reducer works on the same flat buffer, laid out as [layer 0 | layer 1 | ... | extras],
where the extras are scalars that ride along for free: the summed loss and the count of ranks
that were asked to stop (a signal), so no step needs a second collective.

Interface (one small one, as ChainerMN's communicators): `layer_done(l)` is called by the
backward pass as soon as layer l's gradient is final, `finish()` returns when the whole buffer
holds the global sum, and `seconds` accumulates the time spent in communication calls.
A reducer may also own the update: `update(scale)` applies theta += scale * global sum and
returns True (the shm reducer, whose parameters live in shared memory, does; after its
finish() only the extras are global).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Protocol

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.model import Layout

EXTRAS = 2  # slots after the gradients
LOSS_SLOT = 0  # offsets within the extras
STOP_SLOT = 1


class Reducer(Protocol):
    seconds: float

    def layer_done(self, l: int) -> None: ...

    def finish(self) -> None: ...


def buffer_size(layout: Layout) -> int:
    return layout.n_params + EXTRAS


class BlockingReducer:
    """One in-place Allreduce of the whole buffer after the backward pass.

    The fewest messages, so the least latency: the right choice when the buffer is small or
    the network is fast relative to compute.
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        self.comm, self.buf, self.seconds = comm, buf, 0.0

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        self.seconds += time.perf_counter() - t


class OverlapReducer:
    """A non-blocking Allreduce per layer, started as soon as that layer's gradient is final.

    The top layer is finished first, so its bucket also carries the extras (the loss is
    known after the forward pass). Whether the sends really proceed while the next GEMM runs
    depends on the MPI library's progress engine (MPICH: MPIR_CVAR_ASYNC_PROGRESS=1).
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        self.comm, self.buf, self.seconds = comm, buf, 0.0
        spans = [layout.layer_slice(l) for l in range(layout.n_layers)]
        spans[-1] = slice(spans[-1].start, layout.n_params + EXTRAS)
        self.buckets = [buf[s] for s in spans]  # views made once, not per step
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
        MPI.Request.Waitall(self.requests)
        self.requests.clear()
        self.seconds += time.perf_counter() - t


class _SharedRows:
    """One gradient buffer per rank, and one parameter vector, in node-wide MPI-3 shared memory.

    Every rank of the node can load and store every row. Ranks on other nodes (a multi-node
    run) hold the same layout in their own node's windows; `cross` joins the ranks that reduce
    the same slice on every node.
    """

    def __init__(self, comm: MPI.Comm, n: int, dtype: Any):
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        sizes = set(comm.allgather(node.size))
        if len(sizes) != 1:
            node.Free()
            raise ValueError(f"parallel.reducer=shm needs the same number of ranks on every node, got {sorted(sizes)}")
        self.cross: Optional[MPI.Comm] = None
        self.own_local = node.size < comm.size
        if self.own_local:  # several nodes: a window per node, and the ranks that own the same slice
            self.local, self.cross = node, comm.Split(node.rank, key=comm.rank)
        else:  # one node: comm itself (a new communicator costs MPI shared buffers of its own)
            node.Free()
            self.local = comm
        self.dtype, self.item = dtype, np.dtype(dtype).itemsize
        # each rank's row: its buffer [gradients | extras], then two mailboxes for its extras
        width = n + 2 * EXTRAS
        self.win = MPI.Win.Allocate_shared(width * self.item, self.item, comm=self.local)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the run; Sync() orders loads and stores
        full = [np.frombuffer(self.win.Shared_query(r)[0], dtype=dtype, count=width) for r in range(self.local.size)]
        self.rows = [f[:n] for f in full]
        self.mailboxes = [[f[n + k * EXTRAS : n + (k + 1) * EXTRAS] for f in full] for k in (0, 1)]
        self.row = self.rows[self.local.rank]
        full[self.local.rank][...] = 0
        self.theta_win: Any = None
        self.theta: Any = None

    def attach_parameters(self, n: int, fill: Callable[[Any], Any]) -> Any:
        """The node's one copy of n parameters, in shared memory, filled by the node's first rank (collective)."""
        self.theta_win = MPI.Win.Allocate_shared(n * self.item if self.local.rank == 0 else 0, self.item, comm=self.local)
        self.theta_win.Lock_all(MPI.MODE_NOCHECK)
        self.theta = np.frombuffer(self.theta_win.Shared_query(0)[0], dtype=self.dtype, count=n)
        if self.local.rank == 0:
            fill(self.theta)
        self.sync_barrier()
        return self.theta

    def sync_barrier(self) -> None:
        """A barrier that also orders every rank's loads and stores to the windows around it."""
        for w in (self.win, self.theta_win):
            if w is not None:
                w.Sync()
        self.local.Barrier()
        for w in (self.win, self.theta_win):
            if w is not None:
                w.Sync()

    def free(self) -> None:
        for w in (self.win, self.theta_win):
            if w is not None:
                w.Unlock_all()
                w.Free()
        if self.own_local:
            self.local.Free()
        if self.cross is not None:
            self.cross.Free()


_SHARED: dict[int, _SharedRows] = {}  # shared buffers by address, until their reducer takes them


def gradient_buffer(reducer: str, comm: MPI.Comm, n: int, dtype: Any, xp: Any) -> Any:
    """The flat gradient buffer for `reducer`: ordinary zeros, or for "shm" on the host, this
    rank's row of a node-wide shared window (so the GEMMs write straight into shared memory)."""
    if reducer != "shm" or xp is not np or comm.size == 1:
        return xp.zeros((n,), dtype=dtype)
    shared = _SharedRows(comm, n, dtype)
    _SHARED[shared.row.ctypes.data] = shared
    return shared.row


def parameter_buffer(grad: Any, n: int, fill: Callable[[Any], Any]) -> Optional[Any]:
    """With a gradient buffer from gradient_buffer("shm"): the node's one copy of the n
    parameters, in shared memory, which `fill(out)` initialises on one rank (collective).
    Otherwise None: the parameters are the caller's own."""
    shared = _SHARED.get(grad.ctypes.data) if isinstance(grad, np.ndarray) else None
    return None if shared is None else shared.attach_parameters(n, fill)


class SharedMemoryReducer:
    """The gradient sum and the SGD step through node-wide shared memory: no message, no copy.

    The buffers come from gradient_buffer("shm") and parameter_buffer: every rank's gradient
    is a row of one shared window, and the node holds one copy of the parameters. finish():
    each rank posts its extras (loss, stop flag) to its mailbox; after a barrier every rank
    adds up the mailboxes into its own row. update(scale): each of the node's P ranks applies
    theta += scale * g_r to its 1/P slice of the shared parameters for every rank's row r, in
    rank order (so the bits do not depend on who sums); a barrier, and every rank sees the new
    parameters (and no rank writes its gradient again before every rank has read it). Two
    barriers per step, no buffer for the sum. Per rank and step that reads the gradients once
    and updates 1/P of theta, where MPI_Allreduce copies the buffer through MPI's cells and
    back and every rank then updates all of theta. On several nodes, a slice's node sum is
    allreduced among the ranks owning that slice on every node (1/P of the buffer each);
    each node keeps a copy.

    The mailboxes alternate between steps: a rank a step ahead posts to the other one, so it
    cannot overwrite extras a slower rank is still adding up.

    Unlike the other reducers, after finish() this rank's buffer holds the global extras but
    its own gradient: the global gradient is applied by update(), which train.apply_update calls.
    """

    ALIGN = 16  # slice boundaries on 64-byte lines (float32), so no two ranks write one line

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        self.comm, self.buf, self.seconds = comm, buf, 0.0
        self.shared: Any = None
        if comm.size == 1:
            return
        self.shared = _SHARED.pop(buf.ctypes.data, None) if isinstance(buf, np.ndarray) else None
        if self.shared is None or self.shared.theta is None:
            raise ValueError("the shm reducer works on buffers from comm.gradient_buffer('shm', ...) and comm.parameter_buffer")
        rows, local = self.shared.rows, self.shared.local
        n, P, r = layout.n_params, local.size, local.rank
        lo, hi = (min(n, n * k // P // self.ALIGN * self.ALIGN) if k < P else n for k in (r, r + 1))
        self.parts = [row[lo:hi] for row in rows]  # this rank's slice of every rank's gradient
        self.extras = buf[n:]
        self.mailboxes, self.step = self.shared.mailboxes, 0
        self.theta = self.shared.theta[lo:hi]
        # several nodes: the slice's sum is needed whole, for the Allreduce across nodes
        self.acc = np.empty(hi - lo, dtype=buf.dtype) if self.shared.cross is not None else None

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.shared is None:
            return
        t = time.perf_counter()
        shared = self.shared
        mail = self.mailboxes[self.step % 2]
        self.step += 1
        mail[shared.local.rank][...] = self.extras
        shared.sync_barrier()  # every rank's gradient is in its row, its extras in its mailbox
        self._sum(mail, self.extras)  # only this rank reads or writes its own row's extras
        if shared.cross is not None:
            self._sum(self.parts, self.acc)
            shared.cross.Allreduce(MPI.IN_PLACE, self.acc, op=MPI.SUM)
            shared.cross.Allreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)
        self.seconds += time.perf_counter() - t

    @staticmethod
    def _sum(parts: list[Any], out: Any) -> None:
        if len(parts) == 1:
            out[...] = parts[0]
            return
        np.add(parts[0], parts[1], out=out)
        for part in parts[2:]:
            out += part

    def update(self, scale: float) -> bool:
        """theta += scale * (global gradient) on this rank's slice; True once every slice is done.

        Its time counts as communication: it is the summation an Allreduce would do, fused
        with the update that every rank would otherwise apply to all of theta.
        """
        if self.shared is None:
            return False
        from pbp_hpc.engine.ops import axpy_

        t = time.perf_counter()
        for part in (self.parts if self.acc is None else [self.acc]):
            axpy_(np, scale, part, self.theta)  # reads the rows only: x is not overwritten on numpy
        self.shared.sync_barrier()  # the whole of theta is new before any rank's next forward pass
        self.seconds += time.perf_counter() - t
        return True

    def close(self) -> None:
        """Free the windows (collective). Without it they live until MPI_Finalize."""
        if self.shared is not None:
            self.shared.free()
            self.shared = None


REDUCERS = {"blocking": BlockingReducer, "overlap": OverlapReducer, "shm": SharedMemoryReducer}


def make_reducer(name: str, comm: MPI.Comm, buf: Any, layout: Layout) -> Reducer:
    try:
        return REDUCERS[name](comm, buf, layout)
    except KeyError:
        raise ValueError(f"unknown reducer {name!r}; choose one of {sorted(REDUCERS)}") from None


# ---- reducers for device buffers (backend: cupy); chosen by gpu.make_reducer ----------------


class CudaAwareReducer:
    """One in-place Allreduce of the device buffer itself, for a CUDA-aware MPI.

    mpi4py hands MPI the device pointer (from __cuda_array_interface__ / DLPack) but knows
    nothing of streams, so the kernels that wrote the gradient must be waited for first.
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout, sync: Callable[[], None]):
        self.comm, self.buf, self.sync, self.seconds = comm, buf, sync, 0.0

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.sync()
        self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        self.seconds += time.perf_counter() - t


class StagedReducer:
    """Device -> host copy, Allreduce on the host, host -> device copy: works with any MPI.

    `host` is allocated once by the caller (page-locked under CuPy); the copies are injected,
    so the same logic runs with numpy arrays standing in for device arrays in the CPU tests.
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout, host: Any,
                 to_host: Callable[[Any, Any], None], to_device: Callable[[Any, Any], None],
                 sync: Callable[[], None] = lambda: None):
        if host.shape != (buffer_size(layout),):
            raise ValueError(f"staging buffer has shape {host.shape}, the gradient buffer needs ({buffer_size(layout)},)")
        self.comm, self.buf, self.host, self.seconds = comm, buf, host, 0.0
        self.to_host, self.to_device, self.sync = to_host, to_device, sync

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.sync()  # the copy below is ordered on the stream anyway; this keeps `seconds` honest
        self.to_host(self.buf, self.host)
        self.comm.Allreduce(MPI.IN_PLACE, self.host, op=MPI.SUM)
        self.to_device(self.host, self.buf)
        self.seconds += time.perf_counter() - t


class NcclReducer:
    """NCCL's allReduce on the current stream (cupy.cuda.nccl); MPI only carries the unique id.

    NCCL uses NVLink/InfiniBand GPUDirect where MPI is not CUDA-aware. It needs one GPU per
    rank: two ranks sharing a device is an error in NCCL.
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        import numpy as np
        from cupy.cuda import nccl

        from pbp_hpc.errors import ConfigError

        if not getattr(nccl, "available", True):
            raise ConfigError("parallel.gpu_reducer=nccl but CuPy cannot load the NCCL library "
                              "(pip install nvidia-nccl-cu12, or choose staged / cuda-aware)")
        self.comm, self.buf, self.seconds, self.nccl = comm, buf, 0.0, nccl
        dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.dtype = dtypes[np.dtype(buf.dtype)]
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None, root=0)
        self.nccl_comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)  # collective over the ranks

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        import cupy

        t = time.perf_counter()
        stream = cupy.cuda.get_current_stream()
        ptr = self.buf.data.ptr
        self.nccl_comm.allReduce(ptr, ptr, self.buf.size, self.dtype, self.nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()  # so `seconds` is the reduction, not its launch
        self.seconds += time.perf_counter() - t
