"""A P-rank run computes the same parameters as a 1-rank run with the same seed and global batch.

Run under `mpiexec -n P python -m pytest --with-mpi -m mpi`. The reference is the same
training on MPI_COMM_SELF inside the same process, so every rank checks itself.

Tolerance: the P-rank run adds P partial sums where the 1-rank run adds the examples in one
GEMM, so the float rounding differs. In float64 the difference after a few steps is ~1e-15
relative; we allow 1e-10. In float32 we allow 1e-4 relative to the largest parameter.
"""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config
from pbp_hpc import train
from helpers import REPORT_SETUP

WORLD = MPI.COMM_WORLD


def small(**over):
    base = {**REPORT_SETUP,
        "model.layers": "[784, 24, 10]", "model.dtype": "float64", "data.name": "synthetic",
        "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.5,
        "train.eval_every": 0, "train.progress": "false",
    }
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def both(cfg):
    par = train.run(cfg, WORLD, return_params=True)
    ref = train.run(cfg, MPI.COMM_SELF, return_params=True)
    return par, ref


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("batch", [1, 2, 7, 12, 16, 100])  # 100: the whole training set (120 minus validation)
def test_p_ranks_equal_one_rank_for_batches_that_do_and_do_not_divide(batch):
    par, ref = both(small(**{"train.batch_size": batch}))
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    assert par["epochs"][-1]["loss"] == pytest.approx(ref["epochs"][-1]["loss"], rel=1e-10)
    assert par["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.mpi(min_size=2)
def test_p_ranks_equal_one_rank_in_float32_to_single_precision():
    par, ref = both(small(**{"model.dtype": "float32", "train.batch_size": 10}))
    scale = np.abs(ref["params"]).max()
    np.testing.assert_allclose(par["params"], ref["params"], rtol=0, atol=1e-4 * scale)


@pytest.mark.mpi(min_size=2)
def test_every_rank_ends_with_identical_parameters():
    res = train.run(small(**{"train.batch_size": 9}), WORLD, return_params=True)
    gathered = WORLD.allgather(res["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])


@pytest.mark.mpi(min_size=2)
def test_overlapped_reducer_gives_the_blocking_result():
    blocking = train.run(small(**{"train.batch_size": 10, "model.layers": "[784, 16, 12, 10]"}), WORLD, return_params=True)
    overlap = train.run(small(**{"train.batch_size": 10, "model.layers": "[784, 16, 12, 10]", "parallel.reducer": "overlap"}),
                        WORLD, return_params=True)
    np.testing.assert_allclose(overlap["params"], blocking["params"], rtol=1e-12, atol=1e-14)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_shared_memory_reducer_gives_the_blocking_result(dtype):
    over = {"train.batch_size": 10, "model.layers": "[784, 16, 12, 10]", "model.dtype": dtype}
    blocking = train.run(small(**over), WORLD, return_params=True)
    shm = train.run(small(**over, **{"parallel.reducer": "shm"}), WORLD, return_params=True)
    # the sum is added to theta rank by rank (theta + s*g0 + s*g1), not once: rounding differs
    if dtype == "float64":
        np.testing.assert_allclose(shm["params"], blocking["params"], rtol=1e-12, atol=1e-14)
    else:
        np.testing.assert_allclose(shm["params"], blocking["params"], rtol=0, atol=1e-4 * np.abs(blocking["params"]).max())
    assert shm["epochs"][-1]["loss"] == pytest.approx(blocking["epochs"][-1]["loss"], rel=1e-12 if dtype == "float64" else 1e-5)
    gathered = WORLD.allgather(shm["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])  # every rank stored the same sums


@pytest.mark.mpi(min_size=2)
def test_per_example_implementation_matches_batched_across_ranks():
    cfg = small(**{"train.batch_size": 5, "algorithm": "per_example", "data.n_train": 40, "model.layers": "[784, 8, 10]"})
    naive = train.run(cfg, WORLD, return_params=True)
    batched = train.run(small(**{"train.batch_size": 5, "data.n_train": 40, "model.layers": "[784, 8, 10]"}), WORLD, return_params=True)
    np.testing.assert_allclose(naive["params"], batched["params"], rtol=1e-10, atol=1e-12)


@pytest.mark.mpi(min_size=2)
def test_world_size_mismatch_fails_before_training():
    from pbp_hpc.errors import WorldSizeError

    with pytest.raises(WorldSizeError, match="asked for 1 ranks"):
        train.run(small(**{"parallel.ranks": 1}), WORLD)


@pytest.mark.mpi(min_size=2)
def test_timings_are_the_slowest_ranks_and_agree_on_every_rank():
    res = train.run(small(**{"train.batch_size": 8}), WORLD)
    all_times = WORLD.allgather([e["time_s"] for e in res["epochs"]])
    assert all(t == all_times[0] for t in all_times)
    assert all(e["comm_s"] > 0 for e in res["epochs"])
