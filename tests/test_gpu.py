"""The real GPU path (backend: cupy), for a machine with CUDA GPUs and CuPy:

    python -m pytest tests/test_gpu.py
    mpiexec -n 2 python -m pytest tests/test_gpu.py --with-mpi

Skipped, with the reason, where CuPy is not importable or no device is visible. Two ranks on
one GPU are fine for the reducers' correctness (NCCL alone needs one GPU per rank).
The same logic with numpy/array_api_strict standing in for CuPy runs everywhere: see
test_gpu_logic.py and test_array_api.py.
"""

import contextlib
import importlib.util
import warnings

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc.engine import backend
from pbp_hpc import config
from pbp_hpc.data import datasets
from pbp_hpc.data import device as device_data
from pbp_hpc.parallel import gpu, reducers
from pbp_hpc.engine import model
from pbp_hpc import train
from helpers import REPORT_SETUP

cp = pytest.importorskip("cupy", reason="CuPy is not importable here: pip install .[gpu] (CUDA 12) or cupy-cuda13x")


def _visible_devices() -> int:
    try:
        return cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device
        return 0


N_DEVICES = _visible_devices()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_DEVICES == 0, reason="CuPy is importable but no CUDA device is visible")]

WORLD = MPI.COMM_WORLD
HAS_STRICT = importlib.util.find_spec("array_api_strict") is not None


def small(**over):
    base = {**REPORT_SETUP,
        "model.layers": "[784, 24, 10]", "model.dtype": "float64", "data.name": "synthetic",
        "data.n_train": 240, "data.n_test": 60, "train.epochs": 2, "train.learning_rate": 0.5,
        "train.batch_size": 16, "train.eval_every": 1, "train.progress": "false",
    }
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def close(got, ref, rtol=1e-9, atol=1e-11):
    """cuBLAS and OpenBLAS round differently: equal to float64 noise after a few steps."""
    np.testing.assert_allclose(got["params"], ref["params"], rtol=rtol, atol=atol)
    assert [e["loss"] for e in got["epochs"]] == pytest.approx([e["loss"] for e in ref["epochs"]], rel=1e-9)


# ---- one GPU ---------------------------------------------------------------------------------


def test_cupy_training_equals_numpy_in_float64():
    cfg = {"train.shuffle": "false", "model.layers": "[784, 32, 16, 10]"}
    got = train.run(small(backend="cupy", **cfg), MPI.COMM_SELF, return_params=True)
    ref = train.run(small(**cfg), MPI.COMM_SELF, return_params=True)
    close(got, ref)
    assert got["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1 / 60)


@pytest.mark.skipif(not HAS_STRICT, reason="array_api_strict is in the test extra")
def test_cupy_equals_the_cpu_run_of_the_same_device_path_with_shuffling():
    """The device order is a hash, not an RNG stream: the CPU reference sees the same order."""
    import array_api_strict

    got = train.run(small(backend="cupy"), MPI.COMM_SELF, return_params=True)
    ref = train.run(small(), MPI.COMM_SELF, return_params=True, xp=array_api_strict)
    close(got, ref)


def test_cupy_float32_matches_numpy_to_single_precision():
    cfg = {"train.shuffle": "false", "model.dtype": "float32"}
    got = train.run(small(backend="cupy", **cfg), MPI.COMM_SELF, return_params=True)
    ref = train.run(small(**cfg), MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=0, atol=1e-4 * np.abs(ref["params"]).max())


def test_the_result_records_the_device_and_the_reducer():
    res = train.run(small(backend="cupy", **{"train.epochs": 1}), MPI.COMM_SELF)
    (dev,) = res["provenance"]["gpus"]
    assert dev["device"] == 0 and dev["name"] and dev["pci_bus_id"]
    assert res["gpu_reducer"] in ("staged", "cuda-aware") and isinstance(res["cuda_aware_reason"], str)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_data_is_bit_for_bit_the_host_data(dtype):
    src = datasets.SyntheticSource(500, 784, 10, seed=2, noise=0.35, offset=123)
    dev = device_data.device_source(src, cp, 784)
    idx = np.array([0, 499, 7, 7, 250])
    hx, hy = np.zeros((5, 784), dtype=dtype), np.zeros((5, 10), dtype=dtype)
    datasets.fill_batch(src, idx, hx, hy, np, np.arange(5))
    x, y = cp.zeros((5, 784), dtype=dtype), cp.zeros((5, 10), dtype=dtype)
    datasets.fill_batch(dev, cp.asarray(idx), x, y, cp, None)
    np.testing.assert_array_equal(x.get(), hx)
    np.testing.assert_array_equal(y.get(), hy)
    images = np.random.default_rng(0).integers(0, 256, (20, 784), dtype=np.uint8)
    arr = datasets.ArraySource(images, np.arange(20) % 10, 10)
    datasets.fill_batch(arr, idx % 20, hx, hy, np, np.arange(5))
    datasets.fill_batch(device_data.device_source(arr, cp, 784), cp.asarray(idx % 20), x, y, cp, None)
    np.testing.assert_array_equal(x.get(), hx)


def test_device_order_equals_the_cpu_namespaces():
    np.testing.assert_array_equal(device_data.device_epoch_order(cp, 4, 1, 60000, True).get(),
                                  device_data.device_epoch_order(np, 4, 1, 60000, True))


def test_the_staging_buffer_is_pinned_and_allocated_once():
    layout = model.Layout([784, 16, 10])
    reducer = reducers.make(small(backend="cupy", **{"parallel.gpu_reducer": "staged"}), MPI.COMM_SELF, layout, cp)
    assert reducer.describe()["gpu_reducer"] == "staged"
    assert isinstance(reducer.host.base, cp.cuda.PinnedMemoryPointer)


class _Allocations(cp.cuda.MemoryHook):
    """Sizes of the memory-pool allocations made while installed."""

    name = "pbp_hpc_allocations"

    def __init__(self):
        self.sizes = []

    def malloc_preprocess(self, **kwargs):
        self.sizes.append(kwargs.get("size", kwargs.get("mem_size", 0)))


def _no_device_sync():
    """cupyx.allow_synchronize(False) where this CuPy still has it (deprecated since v10)."""
    import cupyx

    guard = getattr(cupyx, "allow_synchronize", None)
    return guard(False) if guard is not None else contextlib.nullcontext()


def test_a_training_step_copies_nothing_between_host_and_device(monkeypatch):
    """Best effort: during steps, no host<->device conversion is called, the device is never
    synchronised (cupyx.allow_synchronize), and nothing batch-sized is allocated."""
    B = 512
    cfg = small(backend="cupy", **{"train.batch_size": B, "data.n_train": 4 * B, "model.layers": "[784, 64, 10]"})
    gpu.select_device(MPI.COMM_SELF, cp)
    data = device_data.to_device(datasets.load(cfg, 1), cp)
    st = train.State(cfg, MPI.COMM_SELF, cp, data)
    order = device_data.device_epoch_order(cp, 0, 0, len(data.train), True)

    def step(k):
        st.local(order[k * B : (k + 1) * B])
        st.strategy.update(0.1, B)  # the optimizer's update, without the step's one host sync

    step(0)  # warm-up: gather buffers, one-hot tables and kernels are made once
    cp.cuda.get_current_stream().synchronize()
    conversions = []

    def counting(name, real):
        def wrapper(obj, *args, **kwargs):
            if isinstance(obj, np.ndarray) or name in ("asnumpy", "to_host"):  # a host array going up, or anything down
                conversions.append(name)
            return real(obj, *args, **kwargs)
        return wrapper

    for name in ("asarray", "array", "asnumpy"):
        monkeypatch.setattr(cp, name, counting(name, getattr(cp, name)))
    monkeypatch.setattr(backend, "to_host", counting("to_host", backend.to_host))
    hook = _Allocations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with hook, _no_device_sync():
            for k in (1, 2, 3):
                step(k)
    cp.cuda.get_current_stream().synchronize()
    assert conversions == []
    batch_bytes = B * 784 * 8  # what uploading the batch would allocate; the largest gradient block is 784 x 64
    assert max(hook.sizes, default=0) < batch_bytes // 2, sorted(hook.sizes)[-5:]


# ---- several ranks ---------------------------------------------------------------------------


def _skip_unless_usable(reducer: str) -> None:
    if reducer == "cuda-aware":
        aware, how = gpu.detect_cuda_aware()
        if not aware:
            pytest.skip(f"MPI is not CUDA-aware here ({how}); set PBP_HPC_CUDA_AWARE=1 to force the test")
    if reducer == "nccl":
        from cupy.cuda import nccl

        if not getattr(nccl, "available", True):
            pytest.skip("CuPy cannot load NCCL here (pip install nvidia-nccl-cu12)")
        _, on_node = gpu.node_local_rank(WORLD)
        if N_DEVICES < on_node:
            pytest.skip(f"NCCL needs one GPU per rank: {on_node} ranks on this node, {N_DEVICES} GPU(s)")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["auto", "staged", "cuda-aware", "nccl"])
def test_each_reducer_on_p_gpu_ranks_equals_one_gpu_rank(reducer):
    _skip_unless_usable(reducer)
    cfg = small(backend="cupy", **{"parallel.gpu_reducer": reducer, "train.batch_size": 10})
    par = train.run(cfg, WORLD, return_params=True)
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-9, atol=1e-11)
    assert par["gpu_reducer"] == gpu.resolve_reducer(reducer, par["cuda_aware_mpi"])
    gathered = WORLD.allgather(par["params"])
    assert all(np.array_equal(p, gathered[0]) for p in gathered)


@pytest.mark.mpi(min_size=2)
def test_p_gpu_ranks_equal_p_numpy_ranks():
    cfg = {"train.shuffle": "false", "train.batch_size": 12}
    got = train.run(small(backend="cupy", **cfg), WORLD, return_params=True)
    ref = train.run(small(**cfg), WORLD, return_params=True)
    close(got, ref)


@pytest.mark.mpi(min_size=2)
def test_every_rank_gets_its_node_local_device():
    res = train.run(small(backend="cupy", **{"train.epochs": 1}), WORLD)
    if WORLD.rank == 0:
        devices = res["provenance"]["gpus"]
        assert len(devices) == WORLD.size
        assert all(d["device"] == d["local_rank"] % N_DEVICES for d in devices)
