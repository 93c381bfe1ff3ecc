"""Skipping the input columns that are zero in a whole minibatch changes the work, not the result.

The reference is the same training with train.skip_zero_inputs=false: the plain GEMMs over all
784 columns. The two differ only in the order of floating-point sums (float64: ~1e-16).
"""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc.engine import active_inputs
from pbp_hpc import config
from pbp_hpc.data import datasets
from pbp_hpc import train
from helpers import REPORT_SETUP

WORLD = MPI.COMM_WORLD


def mnist_cfg(mnist_dir, **over):
    base = {**REPORT_SETUP, "model.layers": "[784, 24, 10]", "model.dtype": "float64", "data.name": "mnist", "data.dir": str(mnist_dir),
            "data.n_train": 1200, "data.n_test": 200, "train.epochs": 2, "train.batch_size": 64,
            "train.learning_rate": 0.5, "train.eval_every": 0, "train.progress": "false"}
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def test_the_active_columns_are_those_nonzero_in_some_example():
    u8 = np.zeros((3, 20), dtype=np.uint8)
    u8[0, 2] = 7
    u8[2, 2] = 1
    u8[1, 15] = 255
    act = active_inputs.ActiveInputs(20, 4)
    np.testing.assert_array_equal(act.choose(u8), [2, 15])
    assert act.summary() == {"compacted_steps": 1, "mean_active_fraction": 0.1}


def test_the_active_columns_are_gathered_as_runs_of_consecutive_columns():
    u8 = np.zeros((2, 20), dtype=np.uint8)
    u8[0, [2, 3, 4, 9]] = 1
    u8[1, [15, 16]] = 1
    act = active_inputs.ActiveInputs(20, 4)
    act.choose(u8)
    assert act.runs() == [(2, 0, 3), (9, 3, 1), (15, 4, 2)]  # (column, position in the batch, length)


def test_the_compact_gradient_expands_in_place_to_the_full_first_layer_gradient():
    u8 = np.zeros((2, 12), dtype=np.uint8)
    u8[0, [0, 3, 4, 5, 9]] = 1
    u8[1, [10, 11]] = 1
    act = active_inputs.ActiveInputs(12, 3)
    cols = act.choose(u8)
    flat = np.full(13 * 3, np.nan)  # W_1 (12 x 3) then b_1, as in the gradient buffer
    compact = np.arange(1.0, (len(cols) + 1) * 3 + 1).reshape(-1, 3)  # k rows, then the bias's
    act.rows(flat)[...] = compact
    act.expand_gradient(flat)
    want = np.zeros((13, 3))
    want[cols] = compact[:-1]
    want[12] = compact[-1]
    np.testing.assert_array_equal(flat.reshape(13, 3), want)


def test_an_all_zero_batch_keeps_the_plain_path():
    assert active_inputs.ActiveInputs(20, 4).choose(np.zeros((3, 20), dtype=np.uint8)) is None


def test_a_batch_with_few_zero_columns_keeps_the_plain_path():
    u8 = np.ones((4, 20), dtype=np.uint8)
    u8[:, 0] = 0  # 95% active: above MAX_ACTIVE
    act = active_inputs.ActiveInputs(20, 4)
    assert act.choose(u8) is None
    assert act.summary()["compacted_steps"] == 0


@pytest.mark.parametrize("n", [64, 1])  # 1: one image, gathered by one take rather than by runs
def test_the_compacted_batch_holds_the_active_columns_of_the_full_batch(mnist_dir, n):
    cfg = mnist_cfg(mnist_dir)
    data = datasets.load(cfg, 1, mnist_dir)
    idx = np.arange(10, 10 + n)
    full = np.empty((n, 784), dtype=np.float32)
    data.train.features_into(idx, full)
    act = active_inputs.ActiveInputs(784, 24)
    flat = np.empty(n * 785, dtype=np.float32)
    cols = data.train.active_features_into(idx, flat, act)
    assert cols is not None and 0 < cols.shape[0] < 0.9 * 784
    x = flat[: n * (cols.shape[0] + 1)].reshape(n, -1)  # the active columns, then ones (the bias's column)
    np.testing.assert_array_equal(x[:, :-1], full[:, cols])
    np.testing.assert_array_equal(x[:, -1], 1)
    assert not full[:, np.setdiff1d(np.arange(784), cols)].any()


@pytest.mark.parametrize("batch", [64, 1100])  # one rank: the update inside the GEMMs; above 1024 rows: a gradient buffer
def test_skipping_zero_inputs_gives_the_plain_result(mnist_dir, batch):
    over = {"train.batch_size": batch, "data.n_train": 2640 if batch > 1024 else 1200}
    skip = train.run(mnist_cfg(mnist_dir, **over), MPI.COMM_SELF, return_params=True)
    plain = train.run(mnist_cfg(mnist_dir, **over, **{"train.skip_zero_inputs": "false"}), MPI.COMM_SELF, return_params=True)
    assert skip["active_inputs"]["compacted_steps"] > 0
    assert 0.5 < skip["active_inputs"]["mean_active_fraction"] < 0.9
    assert plain["active_inputs"] is None
    np.testing.assert_allclose(skip["params"], plain["params"], rtol=1e-12, atol=1e-14)
    assert skip["epochs"][-1]["loss"] == pytest.approx(plain["epochs"][-1]["loss"], rel=1e-12)
    assert skip["test_accuracy"] == plain["test_accuracy"]


def test_dense_data_never_compacts():
    cfg = config.load(None, ["data.name=synthetic", "model.layers=[784, 16, 10]", "data.n_train=120", "train.epochs=1",
                             "train.batch_size=32", "train.progress=false"])
    assert train.run(cfg, MPI.COMM_SELF)["active_inputs"] is None


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["blocking", "overlap", "shm", "shared_batch"])
def test_ranks_that_skip_different_columns_still_equal_one_plain_rank(mnist_dir, reducer):
    # each rank's share of a batch has its own zero columns; the reduced gradient must not care
    par = train.run(mnist_cfg(mnist_dir, **{"train.batch_size": 30, "parallel.reducer": reducer}), WORLD, return_params=True)
    ref = train.run(mnist_cfg(mnist_dir, **{"train.batch_size": 30, "train.skip_zero_inputs": "false"}), MPI.COMM_SELF,
                    return_params=True)
    assert par["active_inputs"]["compacted_steps"] > 0
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    gathered = WORLD.allgather(par["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])
