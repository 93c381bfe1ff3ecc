"""The odd output layer of a tensor group: split by columns (its outputs gathered) or replicated,
whichever an estimate says costs less (parallel.tensor_output, pbp_hpc/parallel/tensor_output.py).

Serially: the estimate's choice for a narrow and a wide output. Under `mpiexec -n P pytest
--with-mpi -m mpi` the world is one tensor group (T = P: 2 or 3) whose output layer is split,
and every rank compares itself with the same training on MPI_COMM_SELF (float64, 24 steps).
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import train
from pbp_hpc.engine.tensor_layout import COL, OUT, ROW, ShardLayout, assemble, extract, plan
from pbp_hpc.engine.model import Layout
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import tensor, tensor_output
from pbp_hpc.parallel.tensor_step import activation_bytes, allgather_bytes
from pbp_hpc.parallel.reducers.compression import allreduce_bytes
from test_tensor import ODD, RELU_CE_NESTEROV, SIGMOID_MSE_SGD, cfg_of, rel

WORLD = MPI.COMM_WORLD
# a machine like this one: ~50 Gflop/s a core, 5 us latency, 2 GB/s
TYPICAL = {"flop_s": 2e-11, "alpha": 5e-6, "beta": 5e-10}


@pytest.mark.parametrize("B", [1, 16, 128, 1024])
def test_the_estimate_replicates_a_narrow_output_and_splits_a_wide_one(B):
    narrow, _ = tensor_output.choose("auto", [784, 1024, 1024, 10], 2, B, 4, **TYPICAL)  # Net-2h's 1024 x 10
    wide, why = tensor_output.choose("auto", [784, 512, 512, 784], 2, B, 4, **TYPICAL)  # an autoencoder's 512 x 784
    assert not narrow and wide
    assert why.startswith("the odd last layer is split by columns (auto: predicted")
    assert tensor_output.choose("split", [784, 1024, 1024, 10], 2, B, 4, **TYPICAL)[0]
    assert not tensor_output.choose("replicated", [784, 512, 512, 784], 2, B, 4, **TYPICAL)[0]


def test_a_split_output_layer_is_held_in_column_blocks_and_assembles_to_the_whole_model():
    assert plan(3, split_output=True) == [COL, ROW, OUT] and plan(1, split_output=True) == [OUT]
    sizes, T = [20, 17, 13, 5], 3
    whole = np.random.default_rng(0).standard_normal(Layout(sizes).n_params)
    shards = [ShardLayout(sizes, T, t, split_output=True) for t in range(T)]
    parts = [extract(whole, s, np.empty(s.n_params)) for s in shards]
    np.testing.assert_array_equal(assemble(parts, sizes, np.empty(whole.shape[0]), split_output=True), whole)
    assert [s.widths()[-1] for s in shards] == [1, 2, 2]  # 5 outputs over 3 ranks
    # forward: the pair's Allreduce of B x 13 (+ the stop flag), the Allgather of B x 5; backward: the output
    # layer's input gradient, B x 13 (the pair's column layer is the first: nothing below it)
    B = 4
    assert activation_bytes(shards[0], B, 8) == (allreduce_bytes(T, B * 13 + 1, 8) + allreduce_bytes(T, B * 13, 8)
                                                + allgather_bytes(T, B * 5, 8))


def test_a_split_of_fewer_outputs_than_ranks_is_refused():
    with pytest.raises(ConfigError, match="splits layer 2 over 5 unit"):
        tensor.check(cfg_of(SIGMOID_MSE_SGD, model__layers=ODD, parallel__tensor=6, parallel__tensor_output="split"), 6)
    tensor.check(cfg_of(SIGMOID_MSE_SGD, model__layers=ODD, parallel__tensor=6), 6)  # replicated: fine


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("setup,layers", [(SIGMOID_MSE_SGD, ODD), (RELU_CE_NESTEROV, ODD), (RELU_CE_NESTEROV, "[20, 7]")],
                         ids=["sigmoid-mse-sgd", "relu-ce-nesterov-wd", "one-layer"])
def test_a_split_output_layer_computes_the_one_rank_parameters(setup, layers):
    T = WORLD.size
    lines: list[str] = []
    par = train.run(cfg_of(setup, model__layers=layers, parallel__tensor=T, parallel__tensor_output="split"), WORLD,
                    return_params=True, log=lines.append)
    ref = train.run(cfg_of(setup, model__layers=layers), MPI.COMM_SELF, return_params=True)
    assert rel(par["params"], ref["params"]) < 1e-10
    for p in WORLD.allgather(par["params"]):
        np.testing.assert_array_equal(p, par["params"])
    assert par["epochs"][-1]["loss"] == pytest.approx(ref["epochs"][-1]["loss"], rel=1e-10)
    assert par["test_accuracy"] == ref["test_accuracy"]
    assert par["tensor_layout"][-1] == OUT
    shard = ShardLayout([int(n) for n in layers.strip("[]").split(",")], T, WORLD.rank, split_output=True)
    assert par["bytes_per_step"]["activations"] == activation_bytes(shard, 5, 8)
    if WORLD.rank == 0:
        assert any("the odd last layer is split by columns" in line and "parallel.tensor_output split" in line
                   for line in lines), lines


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("setup", [SIGMOID_MSE_SGD, RELU_CE_NESTEROV], ids=["fused-sgd", "nesterov-wd"])
def test_on_mnist_a_split_first_and_only_layer_skips_zero_inputs_and_computes_the_one_rank_parameters(mnist_dir, setup):
    over = {"data__name": "mnist", "data__dir": str(mnist_dir), "model__layers": "[784, 10]", "data__n_train": 72}
    par = train.run(cfg_of(setup, parallel__tensor=WORLD.size, parallel__tensor_output="split", **over), WORLD,
                    return_params=True)
    ref = train.run(cfg_of(setup, **over), MPI.COMM_SELF, return_params=True)
    assert par["tensor_layout"] == [OUT] and par["active_inputs"]["compacted_steps"] == 24
    assert rel(par["params"], ref["params"]) < 1e-10
    for p in WORLD.allgather(par["params"]):
        np.testing.assert_array_equal(p, par["params"])
