"""GPU ranks: which device a rank uses, whether MPI can read device memory, and how device
gradients are summed across ranks.

One rank per GPU. A rank picks its device from its rank among the ranks on its node (not its
world rank: node 3's first rank must use device 0), and picks it before anything is allocated,
so the CUDA context, the memory pool and every buffer land on that device. CUDA itself maps
the ids through CUDA_VISIBLE_DEVICES, so `srun --gpus-per-task=1` (one visible device per rank)
and `--gpus-per-node=N --ntasks-per-node=N` (N visible, one each by local rank) both work.

Nothing here needs a GPU to be imported or tested: CuPy is imported only by the functions that
use it, and the pure parts (choose_device, detect_cuda_aware, resolve_reducer, the generic
host copies) are what the CPU test suite checks.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import backend
from pbp_hpc.errors import ConfigError

CUDA_AWARE_ENV = "PBP_HPC_CUDA_AWARE"  # "1": trust MPI with device pointers, "0": never
GPU_REDUCERS = ("auto", "cuda-aware", "staged", "nccl")

# Environment settings that switch GPU support on in MPI builds that have it, consulted only
# when the library offers no MPIX_Query_cuda_support to ask (hints, not proof).
_CUDA_HINTS = {
    "MPICH_GPU_SUPPORT_ENABLED": ("1",),  # Cray MPICH
    "MPIR_CVAR_ENABLE_GPU": ("1",),  # MPICH built --with-cuda
    "OMPI_MCA_opal_cuda_support": ("1", "true"),  # Open MPI built with CUDA
    "MV2_USE_CUDA": ("1",),  # MVAPICH2-GDR
}


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__.split(".")[0] == "cupy"


# ---- device selection -------------------------------------------------------------------


def choose_device(local_rank: int, n_devices: int) -> int:
    """The device id for the local_rank-th rank on a node that shows n_devices devices."""
    if n_devices < 1:
        raise ConfigError(
            "backend: cupy but no CUDA device is visible to this rank; check the allocation "
            "(srun --gpus-per-task=1, or --gpus-per-node) and CUDA_VISIBLE_DEVICES"
        )
    return local_rank % n_devices  # more ranks than devices: ranks share, round robin


def node_local_rank(comm: MPI.Comm) -> tuple[int, int]:
    """(rank among the ranks on this node, ranks on this node)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.rank, node.size
    finally:
        node.Free()


def _device_record(cp: ModuleType, dev_id: int, local_rank: int) -> dict[str, Any]:
    props = cp.cuda.runtime.getDeviceProperties(dev_id)
    name = props.get("name", b"?")
    return {
        "device": dev_id,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "pci_bus_id": cp.cuda.Device(dev_id).pci_bus_id,
        "local_rank": local_rank,
        "memory_bytes": int(props.get("totalGlobalMem", 0)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def select_device(comm: MPI.Comm, xp: ModuleType) -> Optional[list[dict[str, Any]]]:
    """Make this rank's device current; return every rank's device record (rank order).

    Collective, and collective in failure too: if any rank cannot get a device, every rank
    raises the same ConfigError (one rank failing alone would leave the others waiting in the
    next collective). None when xp is not CuPy.
    """
    if not is_cupy(xp):
        return None
    local_rank, _ = node_local_rank(comm)
    record: Any
    try:
        n_devices = xp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError without a driver or device
        n_devices, why = 0, f"{type(exc).__name__}: {exc}"
    else:
        why = ""
    try:
        dev_id = choose_device(local_rank, n_devices)
        xp.cuda.Device(dev_id).use()  # before any allocation: the context is made on this device
        record = _device_record(xp, dev_id, local_rank)
    except Exception as exc:  # noqa: BLE001
        record = f"{exc} {why}".strip()
    records = comm.allgather(record)
    failed = {r: m for r, m in enumerate(records) if isinstance(m, str)}
    if failed:
        first = next(iter(failed))
        raise ConfigError(f"no GPU for rank(s) {sorted(failed)}: rank {first}: {failed[first]}")
    return records


# ---- CUDA-aware MPI ---------------------------------------------------------------------


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the MPI libraries mapped into this process (mpi4py loaded one at import)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return []
    found: list[str] = []
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if os.path.basename(path).startswith("libmpi") and path not in found:
            found.append(path)
    return found


def query_mpi_cuda_support() -> Optional[bool]:
    """MPIX_Query_cuda_support() of the loaded MPI (MPICH >= 4, Open MPI >= 4), None if absent.

    mpi4py does not wrap this extension, so it is called through ctypes. It answers at run
    time: MPICH says 0 when built without CUDA or with GPU support switched off.
    """
    for path in _loaded_mpi_libraries():
        try:
            fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            return bool(fn())
    return None


def detect_cuda_aware(env: Mapping[str, str] = os.environ,
                      query: Callable[[], Optional[bool]] = query_mpi_cuda_support) -> tuple[bool, str]:
    """Whether MPI may be handed device pointers, and why we think so.

    In order: the PBP_HPC_CUDA_AWARE override; the library's own answer; environment hints
    of the MPIs that lack the query; otherwise no (a wrong "yes" crashes in the first
    Allreduce, a wrong "no" only costs a host round trip).
    """
    forced = env.get(CUDA_AWARE_ENV)
    if forced is not None:
        if forced.strip() not in ("0", "1"):
            raise ConfigError(f"{CUDA_AWARE_ENV}={forced!r}: use 1 (MPI is CUDA-aware) or 0 (it is not)")
        return forced.strip() == "1", f"{CUDA_AWARE_ENV}={forced.strip()}"
    answer = query()
    if answer is not None:
        return answer, f"MPIX_Query_cuda_support() = {int(answer)}"
    for var, yes in _CUDA_HINTS.items():
        if env.get(var, "").strip().lower() in yes:
            return True, f"{var}={env[var]}"
    return False, "no evidence of CUDA support (no MPIX_Query_cuda_support, no hint in the environment)"


def resolve_reducer(setting: str, cuda_aware: bool) -> str:
    """The reducer a `parallel.gpu_reducer` setting means, given what MPI can do."""
    if setting not in GPU_REDUCERS:
        raise ConfigError(f"unknown parallel.gpu_reducer {setting!r}; choose one of {', '.join(GPU_REDUCERS)}")
    if setting == "auto":
        return "cuda-aware" if cuda_aware else "staged"
    return setting


# ---- device buffers and the host ----------------------------------------------------------


def stream_sync(xp: ModuleType) -> Callable[[], None]:
    """A function that waits for the current stream's queued work (a no-op on the host).

    MPI knows nothing of CUDA streams: handed a device buffer whose kernels are still
    queued, it would send stale data. mpi4py does not synchronise either, so the reducer must.
    """
    if not is_cupy(xp):
        return lambda: None
    return lambda: xp.cuda.get_current_stream().synchronize()


def pinned_empty(xp: ModuleType, n: int, dtype: Any) -> np.ndarray:
    """A host buffer for staging: page-locked under CuPy (the DMA engine reads it directly and
    copies run at full bus speed), plain numpy elsewhere."""
    if is_cupy(xp):
        import cupyx

        return cupyx.empty_pinned((n,), dtype=dtype)
    return np.empty((n,), dtype=dtype)


def host_copies(xp: ModuleType) -> tuple[Callable[[Any, np.ndarray], None], Callable[[np.ndarray, Any], None]]:
    """(device -> host, host -> device) copies into existing buffers, for the staged reducer."""
    if is_cupy(xp):
        return (lambda dev, host: dev.get(out=host)), (lambda host, dev: dev.set(host))

    def to_host(dev: Any, host: np.ndarray) -> None:
        host[...] = backend.to_host(dev)

    def to_device(host: np.ndarray, dev: Any) -> None:
        dev[...] = xp.asarray(host)

    return to_host, to_device


def choose_reducer(setting: str, comm: MPI.Comm, xp: ModuleType) -> tuple[str, dict[str, Any]]:
    """The device reducer's name for a `parallel.gpu_reducer` setting, and the record of the choice.

    Detection is collective, failures included: the ranks take the most cautious answer, so
    they all choose alike, and a bad override on one rank stops them all instead of one.
    """
    try:
        aware, how, failure = *detect_cuda_aware(), None
    except ConfigError as exc:
        aware, how, failure = False, "", str(exc)
    answers = comm.allgather((aware, failure))
    failures = [f"rank {r}: {f}" for r, (_, f) in enumerate(answers) if f is not None]
    if failures:
        raise ConfigError(failures[0])
    agreed = all(a for a, _ in answers)
    if agreed != aware:
        how = f"{how}, but another rank found MPI not CUDA-aware"
    name = resolve_reducer(setting, agreed)
    if name == "nccl" and not is_cupy(xp):
        raise ConfigError("parallel.gpu_reducer=nccl needs backend: cupy")
    return name, {"gpu_reducer": name, "gpu_reducer_setting": setting, "cuda_aware_mpi": agreed, "cuda_aware_reason": how}
