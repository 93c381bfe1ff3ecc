"""Reducers, one module each, behind one factory: `make(cfg, comm, layout, xp)`.

    blocking    one Allreduce of the whole buffer                    (blocking.py)
    overlap     an Iallreduce per layer during the backward pass    (overlap.py)
    shm         node-wide shared memory, each rank updates a slice  (shm.py)
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
})
DEVICE = Registry("device reducer", {
    "cuda-aware": "pbp_hpc.parallel.reducers.device:CudaAwareReducer",
    "staged": "pbp_hpc.parallel.reducers.device:StagedReducer",
    "nccl": "pbp_hpc.parallel.reducers.device:NcclReducer",
})
register = HOST.register
names = HOST.names


def make(cfg: Any, comm: Any, layout: Any, xp: Any) -> Any:
    """The reducer the config asks for, for buffers of namespace xp (collective).

    Host (numpy): parallel.reducer. Any other namespace takes the device path:
    parallel.gpu_reducer, resolved by what MPI can do (pbp_hpc.parallel.gpu.choose_reducer);
    the record of that choice lands in the reducer's describe().
    """
    import numpy as np

    if xp is not np:
        return make_device(cfg, comm, layout, xp)
    return HOST.load(cfg.parallel.reducer)(comm, layout, getattr(xp, cfg.model.dtype), xp)


def make_device(cfg: Any, comm: Any, layout: Any, xp: Any) -> Any:
    """The device path of make(), for any namespace (numpy stands in for CuPy in the CPU tests)."""
    from pbp_hpc.parallel import gpu

    name, record = gpu.choose_reducer(cfg.parallel.gpu_reducer, comm, xp)
    reducer = DEVICE.load(name)(comm, layout, getattr(xp, cfg.model.dtype), xp)
    reducer.choice = record
    return reducer
