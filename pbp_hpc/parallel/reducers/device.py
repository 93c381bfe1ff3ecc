"""Reducers for device (CuPy) buffers: CUDA-aware MPI, staged through the host, or NCCL.

Which one `parallel.gpu_reducer: auto` means is decided by pbp_hpc.parallel.gpu (whether MPI
may be handed device pointers). mpi4py hands MPI the device pointer but knows nothing of CUDA
streams, so each reducer waits for the kernels that wrote the gradient before MPI reads it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.backend import to_host
from pbp_hpc.parallel import gpu
from pbp_hpc.parallel.reducers.base import Reducer


class CudaAwareReducer(Reducer):
    """One in-place Allreduce of the device buffer itself, for a CUDA-aware MPI."""

    name = "cuda-aware"

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any):
        super().__init__(comm, layout, dtype, xp)
        self.sync = gpu.stream_sync(xp)

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.sync()
        with self.watch:  # the stall check
            self.comm.Allreduce(MPI.IN_PLACE, self.grad, op=MPI.SUM)
        self.seconds += time.perf_counter() - t


class StagedReducer(Reducer):
    """Device -> host copy, Allreduce on the host, host -> device copy: works with any MPI.

    The host buffer is allocated once (page-locked under CuPy); with another array namespace
    (array_api_strict in the CPU tests) the same logic runs on ordinary host copies.
    """

    name = "staged"

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any):
        super().__init__(comm, layout, dtype, xp)
        self.host = gpu.pinned_empty(xp, self.grad.shape[0], to_host(self.grad[:1]).dtype)
        self.to_host, self.to_device = gpu.host_copies(xp)
        self.sync = gpu.stream_sync(xp)

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.sync()  # the copy below is ordered on the stream anyway; this keeps `seconds` honest
        self.to_host(self.grad, self.host)
        with self.watch:  # the stall check
            self.comm.Allreduce(MPI.IN_PLACE, self.host, op=MPI.SUM)
        self.to_device(self.host, self.grad)
        self.seconds += time.perf_counter() - t


class NcclReducer(Reducer):
    """NCCL's allReduce on the current stream (cupy.cuda.nccl); MPI only carries the unique id.

    NCCL uses NVLink/InfiniBand GPUDirect where MPI is not CUDA-aware. It needs one GPU per
    rank: two ranks sharing a device is an error in NCCL.
    """

    name = "nccl"

    def __init__(self, comm: MPI.Comm, layout: Any, dtype: Any, xp: Any):
        from cupy.cuda import nccl

        from pbp_hpc.errors import ConfigError

        if not getattr(nccl, "available", True):
            raise ConfigError("parallel.gpu_reducer=nccl but CuPy cannot load the NCCL library "
                              "(pip install nvidia-nccl-cu12, or choose staged / cuda-aware)")
        super().__init__(comm, layout, dtype, xp)
        self.nccl = nccl
        dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.nccl_dtype = dtypes[np.dtype(dtype)]
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None, root=0)
        self.nccl_comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)  # collective over the ranks

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        import cupy

        t = time.perf_counter()
        stream = cupy.cuda.get_current_stream()
        ptr = self.grad.data.ptr
        self.nccl_comm.allReduce(ptr, ptr, self.grad.size, self.nccl_dtype, self.nccl.NCCL_SUM, stream.ptr)
        with self.watch:  # the stall check
            stream.synchronize()  # so `seconds` is the reduction, not its launch
        self.seconds += time.perf_counter() - t
