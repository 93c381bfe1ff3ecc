"""The GPU path's logic, proven on the CPU: device choice, CUDA-awareness detection, reducer
choice, the staged and CUDA-aware reducers (numpy and array_api_strict arrays standing in for
device arrays, under real MPI), the device-resident data and order, and the errors.

The parts that need a real GPU (CuPy kernels, pinned memory, NCCL) are in test_gpu.py.
"""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc.parallel import reducers
from pbp_hpc.parallel.reducers.blocking import BlockingReducer
from pbp_hpc.parallel.reducers.device import CudaAwareReducer, StagedReducer
from pbp_hpc import config
from pbp_hpc.data import datasets
from pbp_hpc.data import device as device_data
from pbp_hpc.parallel import gpu
from pbp_hpc.engine import model
from pbp_hpc import train
from pbp_hpc.errors import ConfigError

from helpers import REPORT_SETUP, run_cmd

xs = pytest.importorskip("array_api_strict", reason="array_api_strict is in the test extra: pip install .[test]")

WORLD = MPI.COMM_WORLD
HAS_CUPY = importlib.util.find_spec("cupy") is not None


# ---- device choice ------------------------------------------------------------------------


@pytest.mark.parametrize("local_rank,n_devices,expected", [(0, 1, 0), (3, 1, 0), (1, 4, 1), (5, 4, 1), (7, 8, 7)])
def test_device_is_the_local_rank_modulo_the_visible_devices(local_rank, n_devices, expected):
    assert gpu.choose_device(local_rank, n_devices) == expected


def test_no_visible_device_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device is visible.*CUDA_VISIBLE_DEVICES"):
        gpu.choose_device(0, 0)


def fake_cupy(n_devices, used):
    """Just enough of CuPy's device API for select_device; n_devices may be an exception."""

    def count():
        if isinstance(n_devices, Exception):
            raise n_devices
        return n_devices

    class Device:
        def __init__(self, i):
            self.i, self.pci_bus_id = i, f"0000:{0x10 + i:02x}:00.0"

        def use(self):
            used.append(self.i)

    runtime = SimpleNamespace(getDeviceCount=count, getDeviceProperties=lambda i: {"name": b"Fake GPU", "totalGlobalMem": 1 << 30})
    return SimpleNamespace(__name__="cupy", cuda=SimpleNamespace(runtime=runtime, Device=Device))


def test_select_device_is_skipped_off_the_gpu():
    assert gpu.select_device(MPI.COMM_SELF, np) is None
    assert gpu.select_device(MPI.COMM_SELF, xs) is None


@pytest.mark.mpi(min_size=2)
def test_select_device_uses_the_node_local_rank_and_records_every_rank():
    used = []
    records = gpu.select_device(WORLD, fake_cupy(8, used))
    local_rank, _ = gpu.node_local_rank(WORLD)
    assert used == [local_rank]
    assert len(records) == WORLD.size
    assert records[WORLD.rank]["device"] == local_rank and records[WORLD.rank]["name"] == "Fake GPU"
    assert records[WORLD.rank]["pci_bus_id"] == f"0000:{0x10 + local_rank:02x}:00.0"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("failure", ["none", "error"])
def test_a_rank_without_a_device_fails_every_rank_alike(failure):
    broken = 0 if failure == "none" else RuntimeError("cudaErrorNoDevice")
    n = broken if WORLD.rank == WORLD.size - 1 else 1  # only the last rank has no GPU
    with pytest.raises(ConfigError, match=f"no GPU for rank\\(s\\) \\[{WORLD.size - 1}\\]"):
        gpu.select_device(WORLD, fake_cupy(n, []))


# ---- CUDA-aware MPI and the reducer choice --------------------------------------------------


def never_asked():
    raise AssertionError("the override must win before the library is asked")


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), (" 1 ", True)])
def test_the_override_beats_the_library(value, expected):
    aware, how = gpu.detect_cuda_aware({gpu.CUDA_AWARE_ENV: value}, never_asked)
    assert aware is expected and gpu.CUDA_AWARE_ENV in how


def test_a_bad_override_is_a_config_error():
    with pytest.raises(ConfigError, match="PBP_HPC_CUDA_AWARE='yes'.*use 1"):
        gpu.detect_cuda_aware({gpu.CUDA_AWARE_ENV: "yes"}, never_asked)


@pytest.mark.parametrize("answer", [True, False])
def test_the_library_answer_beats_the_hints(answer):
    aware, how = gpu.detect_cuda_aware({"MPICH_GPU_SUPPORT_ENABLED": "1"}, lambda: answer)
    assert aware is answer and "MPIX_Query_cuda_support" in how


@pytest.mark.parametrize("var,value", [("MPICH_GPU_SUPPORT_ENABLED", "1"), ("OMPI_MCA_opal_cuda_support", "true"),
                                       ("MPIR_CVAR_ENABLE_GPU", "1"), ("MV2_USE_CUDA", "1")])
def test_hints_count_only_without_the_query(var, value):
    assert gpu.detect_cuda_aware({var: value}, lambda: None) == (True, f"{var}={value}")


def test_no_evidence_means_not_cuda_aware():
    aware, how = gpu.detect_cuda_aware({"OMPI_MCA_opal_cuda_support": "false"}, lambda: None)
    assert aware is False and "no evidence" in how


def test_the_loaded_mpich_answers_the_query():
    if "MPICH" not in MPI.Get_library_version():
        pytest.skip("MPIX_Query_cuda_support is checked against MPICH only")
    assert gpu.query_mpi_cuda_support() in (True, False)  # found through ctypes, not None


@pytest.mark.parametrize("setting,aware,expected", [
    ("auto", True, "cuda-aware"), ("auto", False, "staged"), ("staged", True, "staged"),
    ("cuda-aware", False, "cuda-aware"), ("nccl", False, "nccl"),
])
def test_reducer_choice(setting, aware, expected):
    assert gpu.resolve_reducer(setting, aware) == expected


def test_unknown_reducer_setting():
    with pytest.raises(ConfigError, match="choose one of auto, cuda-aware, staged, nccl"):
        gpu.resolve_reducer("mpi", True)


@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("env,setting,kind", [
    ("1", "auto", CudaAwareReducer), ("0", "auto", StagedReducer),
    ("1", "staged", StagedReducer), ("0", "cuda-aware", CudaAwareReducer),
])
def test_make_reducer_follows_the_override_and_records_it(monkeypatch, xp, env, setting, kind):
    monkeypatch.setenv(gpu.CUDA_AWARE_ENV, env)
    layout = model.Layout([5, 3, 2])
    cfg = config.load(None, [f"parallel.gpu_reducer={setting}", "model.dtype=float64"])
    reducer = reducers.make_device(cfg, MPI.COMM_SELF, layout, xp)
    record = reducer.describe()
    assert isinstance(reducer, kind) and record["reducer"] == record["gpu_reducer"]
    assert record["gpu_reducer"] == gpu.resolve_reducer(setting, env == "1")
    assert record["gpu_reducer_setting"] == setting and record["cuda_aware_mpi"] is (env == "1")


def test_nccl_needs_cupy():
    with pytest.raises(ConfigError, match="nccl needs backend: cupy"):
        gpu.choose_reducer("nccl", MPI.COMM_SELF, xs)


def test_training_records_the_reducer_choice(monkeypatch):
    monkeypatch.setenv(gpu.CUDA_AWARE_ENV, "0")
    cfg = config.load(None, ["data.name=synthetic", "data.n_train=40", "data.n_test=10", "model.layers=[784, 6, 10]",
                             "train.epochs=1", "train.progress=false", "model.dtype=float64"])
    res = train.run(cfg, MPI.COMM_SELF, xp=xs)
    assert res["gpu_reducer"] == "staged" and res["cuda_aware_mpi"] is False
    assert res["cuda_aware_reason"] == "PBP_HPC_CUDA_AWARE=0" and res["gpu_reducer_setting"] == "auto"
    json.dumps(res)  # the record stays JSON


# ---- the reducers under MPI, numpy and strict arrays standing in for device arrays -----------


def filled(red, rank):
    """The reducer's buffer filled with this rank's values; returns a host copy of them."""
    host = np.random.default_rng(rank).standard_normal(red.grad.shape[0])
    red.grad[...] = red.xp.asarray(host.copy())  # a copy: np.asarray would alias the reference
    return host


def blocking_sum(layout, host):
    ref = BlockingReducer(WORLD, layout, np.float64, np)
    ref.grad[...] = host
    ref.finish()
    return ref.grad


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
def test_staged_reducer_equals_blocking(xp):
    layout = model.Layout([7, 5, 3])
    red = StagedReducer(WORLD, layout, xp.float64, xp)
    host_copy = filled(red, WORLD.rank)
    calls = []
    to_host, to_device = gpu.host_copies(xp)

    def down(dev, host):
        calls.append("to_host")
        to_host(dev, host)

    def up(host, dev):
        calls.append("to_device")
        to_device(host, dev)

    red.to_host, red.to_device, red.sync = down, up, lambda: calls.append("sync")
    for l in reversed(range(layout.n_layers)):
        red.layer_done(l)
    red.finish()
    np.testing.assert_array_equal(np.asarray(red.grad), blocking_sum(layout, host_copy))
    assert calls == ["sync", "to_host", "to_device"] and red.seconds > 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
def test_cuda_aware_reducer_syncs_then_reduces_the_buffer_in_place(xp):
    layout = model.Layout([7, 5, 3])
    red = CudaAwareReducer(WORLD, layout, xp.float64, xp)
    host_copy = filled(red, WORLD.rank)
    seen = []
    red.sync = lambda: seen.append(np.asarray(red.grad).copy())
    red.finish()
    np.testing.assert_array_equal(np.asarray(red.grad), blocking_sum(layout, host_copy))
    assert len(seen) == 1 and np.array_equal(seen[0], host_copy)  # synced before the Allreduce


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("aware", ["0", "1"])
def test_device_path_training_with_either_mpi_reducer_equals_numpy(monkeypatch, aware):
    monkeypatch.setenv(gpu.CUDA_AWARE_ENV, aware)
    cfg = config.load(None, ["data.name=synthetic", "data.n_train=90", "data.n_test=20", "model.layers=[784, 12, 10]",
                             "train.epochs=2", "train.batch_size=9", "train.shuffle=false", "train.progress=false",
                             "model.dtype=float64", "parallel.reducer=blocking",  # the host reference: one Allreduce, as on the device
                             *[f"{k}={v}" for k, v in REPORT_SETUP.items()]])
    got = train.run(cfg, WORLD, return_params=True, xp=xs)
    ref = train.run(cfg, WORLD, return_params=True)
    assert got["gpu_reducer"] == ("cuda-aware" if aware == "1" else "staged")
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-12, atol=1e-14)


# ---- device-resident data and order ------------------------------------------------------------


def host_sources():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 784), dtype=np.uint8)
    array = datasets.ArraySource(images, np.arange(40) % 10, 10)
    return {
        "synthetic": datasets.SyntheticSource(300, 784, 10, seed=5, noise=0.35, offset=1000),
        "array": array,
        "subset": datasets._Subset(array, np.array([3, 9, 20, 33, 39])),
    }


@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("name", ["synthetic", "array", "subset"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_sources_fill_exactly_what_the_host_sources_fill(xp, name, dtype):
    src = host_sources()[name]
    dev = device_data.device_source(src, xp, 784)
    idx = np.array([4, 0, 2, 2, len(src) - 1])
    hx, hy = np.full((8, 784), 7.0, dtype=dtype), np.full((8, 10), 7.0, dtype=dtype)
    datasets.fill_batch(src, idx, hx, hy, np, np.arange(8))
    x, y = xp.full((8, 784), 7.0, dtype=getattr(xp, dtype)), xp.full((8, 10), 7.0, dtype=getattr(xp, dtype))
    datasets.fill_batch(dev, xp.asarray(idx), x, y, xp, None)
    np.testing.assert_array_equal(np.asarray(x), hx)  # bit for bit, rows past the batch untouched
    np.testing.assert_array_equal(np.asarray(y), hy)
    np.testing.assert_array_equal(np.asarray(dev.labels_of(xp.asarray(idx))), src.labels_of(idx))
    assert len(dev) == len(src)


@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
def test_counting_correct_predictions_on_the_device(xp):
    src = device_data.device_source(host_sources()["array"], xp, 784)
    idx = device_data.index_range(src, 10, 20)
    labels = np.arange(10, 20) % 10
    pred = xp.asarray(np.where(labels % 3 == 0, labels, (labels + 1) % 10))
    assert int(device_data.count_correct(src, pred, idx)) == int(np.count_nonzero(labels % 3 == 0))


@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "strict"])
def test_device_order_is_a_permutation_drawn_from_seed_and_epoch(xp):
    order = lambda seed, epoch, n=1000: np.asarray(device_data.device_epoch_order(xp, seed, epoch, n, True))
    a = order(0, 0)
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(order(0, 0), a)  # every rank draws the same one
    assert not np.array_equal(order(0, 1), a) and not np.array_equal(order(1, 0), a)
    assert not np.array_equal(a, np.arange(1000))
    np.testing.assert_array_equal(np.asarray(device_data.device_epoch_order(xp, 0, 0, 5, False)), np.arange(5))


def test_device_order_is_the_same_in_every_namespace():
    np.testing.assert_array_equal(np.asarray(device_data.device_epoch_order(xs, 3, 2, 777, True)),
                                  device_data.device_epoch_order(np, 3, 2, 777, True))


# ---- configuration and the CLI without CuPy ----------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "cuda-aware", "staged", "nccl"])
def test_gpu_reducer_setting(value):
    assert config.load(None, [f"parallel.gpu_reducer={value}"]).parallel.gpu_reducer == value


@pytest.mark.parametrize("over,message", [
    (["parallel.gpu_reducer=mpi"], "gpu_reducer"),
    (["backend=cupy", "parallel.reducer=overlap"], "choose parallel.gpu_reducer"),
    (["backend=cupy", "algorithm=per_example"], "numpy baseline"),
])
def test_gpu_settings_that_cannot_work_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, over)


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here: the missing-CuPy message cannot be shown")
@pytest.mark.parametrize("ranks", [1, 2])
def test_cupy_backend_without_cupy_exits_2_with_one_message(ranks):
    proc = run_cmd(["pbp_hpc.train", "--set", "backend=cupy", "--set", "data.name=synthetic", "--set", "data.n_train=20",
                    "--set", "train.epochs=1"], ranks=ranks)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("backend: cupy needs CuPy") == 1, proc.stderr
    assert "pip install" in proc.stderr and "Traceback" not in proc.stderr
