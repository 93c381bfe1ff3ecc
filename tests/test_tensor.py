"""Tensor parallelism (parallel.tensor): a tensor group of T ranks holds each layer's units in
slices and computes what one rank computes.

Serial tests check the layout (a whole model split and put back together), the byte formula
and what is refused. Under `mpiexec -n P pytest --with-mpi -m mpi` the world is one tensor group
(T = P: 2 or 3) and every rank compares itself with the same training on MPI_COMM_SELF; the
4-rank job (data 2 x tensor 2, on two emulated nodes) runs tests/nodes_program.py.

Problems are small (20-17-13-9-5 and a Net-1h-like 784-24-10 on synthetic data, 24 steps),
float64: the tensor group adds its partial sums in another order than one rank's GEMM, so the
parameters agree to rounding (~1e-16 relative); we allow 1e-10.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from helpers import MPIEXEC, REPORT_SETUP, ROOT, last_json
from pbp_hpc import config, model_file, train
from pbp_hpc.engine.model import Layout
from pbp_hpc.engine.tensor_layout import COL, FULL, ROW, ShardLayout, assemble, extract, plan
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import pipeline, tensor
from pbp_hpc.parallel.reducers import EXTRAS
from pbp_hpc.parallel.reducers.compression import allreduce_bytes
from pbp_hpc.parallel.tensor_step import activation_bytes

WORLD = MPI.COMM_WORLD
DEEP = "[20, 17, 13, 9, 5]"  # unit counts that divide by neither 2 nor 3
NET1H_LIKE = "[784, 24, 10]"
ODD = "[20, 17, 13, 5]"  # three layers: the last one replicated
SIGMOID_MSE_SGD = {**REPORT_SETUP}
# label smoothing: the loss a step uses is losses.of(model), not model.loss alone
RELU_CE_NESTEROV = {"model.activation": "relu", "model.loss": "cross_entropy", "model.init": "he_uniform",
                    "optimizer.name": "nesterov", "optimizer.momentum": "0.9", "optimizer.weight_decay": "0.01",
                    "model.label_smoothing": "0.1",
                    "schedule.name": "constant", "schedule.warmup_epochs": "0"}
# 72 examples, 1/6 for validation: 60 in batches of 5, 12 steps an epoch, 24 in two
BASE = {"model.dtype": "float64", "data.name": "synthetic", "data.n_train": 72, "data.n_test": 30,
        "train.epochs": 2, "train.batch_size": 5, "train.learning_rate": 0.2, "train.eval_every": 0,
        "train.progress": "false"}


def cfg_of(setup: dict, **over: object) -> config.Config:
    merged = {**BASE, **setup, **{k.replace("__", "."): v for k, v in over.items()}}
    return config.load(None, [f"{k}={v}" for k, v in merged.items()])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- the layout, serially -----------------------------------------------------------------------

def test_layers_are_paired_column_then_row_and_an_odd_last_layer_is_replicated():
    assert plan(2) == [COL, ROW]
    assert plan(3) == [COL, ROW, FULL]
    assert plan(4) == [COL, ROW, COL, ROW]
    assert plan(1) == [FULL]


@pytest.mark.parametrize("sizes", [[20, 17, 13, 9, 5], [20, 17, 13, 5], [784, 24, 10]])
@pytest.mark.parametrize("T", [2, 3])
def test_a_whole_model_split_and_assembled_is_the_same_model(sizes, T):
    n = Layout(sizes).n_params
    whole = np.random.default_rng(0).standard_normal(n)
    shards = [extract(whole, ShardLayout(sizes, T, t), np.empty(ShardLayout(sizes, T, t).n_params)) for t in range(T)]
    np.testing.assert_array_equal(assemble(shards, sizes, np.empty(n)), whole)
    # the split units are held once; the row-split layers' biases and a replicated layer, by every rank
    kinds = plan(len(sizes) - 1)
    shared = sum(sizes[l + 1] for l, k in enumerate(kinds) if k == ROW)
    shared += sum(sizes[l] * sizes[l + 1] + sizes[l + 1] for l, k in enumerate(kinds) if k == FULL)
    assert sum(s.shape[0] for s in shards) == n + (T - 1) * shared


def test_net1h_tensor_2_sends_at_most_b_x_10_float32_values_a_step_plus_a_constant():
    shard = ShardLayout([784, 1024, 10], 2, 0)
    for B in (1, 16, 128, 1024):
        sent = activation_bytes(shard, B, 4)
        assert sent == 2 * 1 * -(-(B * 10 + 1) // 2) * 4  # one Allreduce of B x 10 (+ the stop flag)
        assert sent <= B * 10 * 4 + 8


@pytest.mark.parametrize("key,value", [("parallel.strategy", "local_sgd"), ("parallel.strategy", "hogwild"),
                                       ("parallel.reducer", "shm"), ("parallel.reducer", "shared_batch"),
                                       ("parallel.reducer", "overlap"), ("algorithm", "per_example"),
                                       ("optimizer.name", "lars"), ("optimizer.name", "lamb")])
def test_what_does_not_go_with_tensor_parallelism_is_refused_naming_both_choices(key, value):
    with pytest.raises(ConfigError, match=rf"parallel.tensor=2 does not go with {key}={value}"):
        cfg_of(SIGMOID_MSE_SGD, parallel__tensor=2, **{key.replace(".", "__"): value})


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_the_layer_wise_optimizers_are_refused_with_a_pipeline_and_grid_auto_keeps_them_data_parallel(name):
    from pbp_hpc.parallel import grid_auto

    with pytest.raises(ConfigError, match=rf"parallel.pipeline=2 does not go with optimizer.name={name}"):
        cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=2, optimizer__name=name)
    auto = cfg_of(SIGMOID_MSE_SGD, parallel__grid="auto", optimizer__name=name)
    assert not grid_auto._goes_with(auto, "tensor") and not grid_auto._goes_with(auto, "pipeline")
    assert grid_auto._goes_with(cfg_of(SIGMOID_MSE_SGD, parallel__grid="auto"), "tensor")


def test_a_world_or_network_the_tensor_groups_cannot_split_is_refused():
    with pytest.raises(ConfigError, match="parallel.tensor is 2 but the job has 3 rank"):
        tensor.check(cfg_of(SIGMOID_MSE_SGD, parallel__tensor=2), 3)
    with pytest.raises(ConfigError, match="splits layer 2 over 9 unit"):
        tensor.check(cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP, parallel__tensor=10), 10)


# -- under mpiexec: the world is one tensor group --------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("setup,layers", [(SIGMOID_MSE_SGD, DEEP), (RELU_CE_NESTEROV, DEEP), (SIGMOID_MSE_SGD, NET1H_LIKE),
                                          (RELU_CE_NESTEROV, ODD)],
                         ids=["sigmoid-mse-sgd-deep", "relu-ce-nesterov-wd-deep", "sigmoid-mse-sgd-net1h", "relu-ce-odd"])
def test_a_tensor_group_computes_the_one_rank_parameters(setup, layers):
    T = WORLD.size
    par = train.run(cfg_of(setup, model__layers=layers, parallel__tensor=T), WORLD, return_params=True)
    ref = train.run(cfg_of(setup, model__layers=layers), MPI.COMM_SELF, return_params=True)
    assert par["epochs"][-1]["steps_done"] == 12 and len(par["epochs"]) == 2  # 24 steps
    assert rel(par["params"], ref["params"]) < 1e-10
    for p in WORLD.allgather(par["params"]):
        np.testing.assert_array_equal(p, par["params"])
    assert par["epochs"][-1]["loss"] == pytest.approx(ref["epochs"][-1]["loss"], rel=1e-10)
    assert par["test_accuracy"] == ref["test_accuracy"]
    # the bytes counted in the steps are the formula's: every step has 5 rows
    shard = ShardLayout(json.loads(layers), T, WORLD.rank)
    assert par["bytes_per_step"]["activations"] == activation_bytes(shard, 5, 8)
    assert par["grid"] == {"data": 1, "tensor": T, "pipeline": 1}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("setup", [SIGMOID_MSE_SGD, RELU_CE_NESTEROV], ids=["fused-sgd", "nesterov-wd"])
def test_on_mnist_the_first_layer_skips_zero_inputs_and_still_computes_the_one_rank_parameters(mnist_dir, setup):
    over = {"data.name": "mnist", "data.dir": str(mnist_dir), "model.layers": NET1H_LIKE, "data.n_train": 72}
    par = train.run(cfg_of(setup, parallel__tensor=WORLD.size, **{k.replace(".", "__"): v for k, v in over.items()}),
                    WORLD, return_params=True)
    ref = train.run(cfg_of(setup, **{k.replace(".", "__"): v for k, v in over.items()}), MPI.COMM_SELF, return_params=True)
    assert par["active_inputs"]["compacted_steps"] == 24
    assert rel(par["params"], ref["params"]) < 1e-10
    for p in WORLD.allgather(par["params"]):
        np.testing.assert_array_equal(p, par["params"])


def shared_dir(tmp_path):
    return WORLD.bcast(str(tmp_path) if WORLD.rank == 0 else None, root=0)


@pytest.mark.mpi(min_size=2)
def test_a_tensor_run_resumes_bit_for_bit(tmp_path):
    T, d = WORLD.size, shared_dir(tmp_path)
    setup = RELU_CE_NESTEROV  # momentum: its sharded state travels through the checkpoint too
    whole = train.run(cfg_of(setup, model__layers=DEEP, parallel__tensor=T), WORLD, return_params=True)["params"]
    train.run(cfg_of(setup, model__layers=DEEP, parallel__tensor=T, train__epochs=1, checkpoint__path=f"{d}/t.h5"), WORLD)
    again = train.run(cfg_of(setup, model__layers=DEEP, parallel__tensor=T, checkpoint__path=f"{d}/t.h5",
                             checkpoint__resume="true"), WORLD, return_params=True)["params"]
    np.testing.assert_array_equal(again, whole)


@pytest.mark.mpi(min_size=2)
def test_grid_auto_resumes_on_the_grid_its_checkpoint_was_written_with(tmp_path):
    T, d = WORLD.size, shared_dir(tmp_path)
    setup = RELU_CE_NESTEROV
    for written, ck in (({"parallel__tensor": T}, "t.h5"), ({"parallel__grid": "manual"}, "d.h5")):
        whole = train.run(cfg_of(setup, model__layers=DEEP, **written), WORLD, return_params=True)
        train.run(cfg_of(setup, model__layers=DEEP, **written, train__epochs=1, checkpoint__path=f"{d}/{ck}"), WORLD)
        lines: list[str] = []
        again = train.run(cfg_of(setup, model__layers=DEEP, checkpoint__path=f"{d}/{ck}", checkpoint__resume="true"),
                          WORLD, return_params=True, log=lines.append)
        assert again["grid"] == whole["grid"]
        np.testing.assert_array_equal(again["params"], whole["params"])  # bit for bit: the same grid
        if WORLD.rank == 0:
            assert any("the grid of the checkpoint it resumes" in line for line in lines), lines


def test_grid_auto_is_the_default_and_sizes_given_are_the_grid():
    from pbp_hpc.parallel import combinations, grid_auto

    assert config.Config().parallel.grid == "auto"
    given = cfg_of(SIGMOID_MSE_SGD, parallel__grid="auto", parallel__tensor=2)
    assert combinations.violation(given) is None
    assert grid_auto.choose(given, MPI.COMM_SELF) == (given, None)  # nothing measured, nothing changed
    one = cfg_of(SIGMOID_MSE_SGD, parallel__grid="auto")
    chosen, why = grid_auto.choose(one, MPI.COMM_SELF)
    assert (chosen.parallel.tensor, chosen.parallel.pipeline) == (1, 1) and "one rank" in why


@pytest.mark.mpi(min_size=2)
def test_checkpoints_resume_across_grid_shapes(tmp_path):
    T, d = WORLD.size, shared_dir(tmp_path)
    setup = RELU_CE_NESTEROV
    ref = train.run(cfg_of(setup, model__layers=DEEP), MPI.COMM_SELF, return_params=True)["params"]
    # T -> 1: the first epoch on the tensor group, the second on one rank
    train.run(cfg_of(setup, model__layers=DEEP, parallel__tensor=T, train__epochs=1, checkpoint__path=f"{d}/a.h5"), WORLD)
    WORLD.Barrier()
    if WORLD.rank == 0:
        one = train.run(cfg_of(setup, model__layers=DEEP, checkpoint__path=f"{d}/a.h5", checkpoint__resume="true"),
                        MPI.COMM_SELF, return_params=True)["params"]
        assert rel(one, ref) < 1e-12
    # 1 -> T: the first epoch on one rank, the second on the tensor group
    if WORLD.rank == 0:
        train.run(cfg_of(setup, model__layers=DEEP, train__epochs=1, checkpoint__path=f"{d}/b.h5"), MPI.COMM_SELF)
    WORLD.Barrier()
    par = train.run(cfg_of(setup, model__layers=DEEP, parallel__tensor=T, checkpoint__path=f"{d}/b.h5",
                           checkpoint__resume="true"), WORLD, return_params=True)["params"]
    assert rel(par, ref) < 1e-12


@pytest.mark.mpi(min_size=2)
def test_the_saved_model_and_the_evaluation_see_the_whole_model(tmp_path):
    T, d = WORLD.size, shared_dir(tmp_path)
    cfg = cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP, parallel__tensor=T, train__eval_every=1,
                 train__save_model=f"{d}/m.h5", train__epochs=1)
    par = train.run(cfg, WORLD, return_params=True)
    ref = train.run(cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP, train__eval_every=1, train__epochs=1),
                    MPI.COMM_SELF, return_params=True)
    assert [e["val_accuracy"] for e in par["evaluations"]] == [e["val_accuracy"] for e in ref["evaluations"]]
    theta, _, _ = model_file.load(f"{d}/m.h5")
    np.testing.assert_array_equal(theta, par["params"])


# -- a 4-rank job: data 2 x tensor 2, on two emulated nodes ------------------------------------------

def test_data_2_by_tensor_2_and_by_pipeline_2_on_two_nodes_compute_the_one_rank_parameters():
    launcher = [MPIEXEC, "-n", "4", "-ppn", "2", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
    cases = [{"parallel.tensor": 2},
             {"parallel.tensor": 2, "model.layers": DEEP, **RELU_CE_NESTEROV},
             {"parallel.pipeline": 2, "parallel.microbatches": 2, "model.layers": DEEP, **RELU_CE_NESTEROV}]
    cmd = [*launcher, sys.executable, str(ROOT / "tests" / "nodes_program.py"), *map(json.dumps, cases)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lo, hi = pipeline.split_layers(json.loads(DEEP), 2)[0]
    shards = [ShardLayout([784, 16, 12, 10], 2, 0).n_params, ShardLayout(json.loads(DEEP), 2, 0).n_params,
              Layout(json.loads(DEEP)[lo:hi + 1]).n_params]
    for case, n in zip(last_json(res.stdout)["cases"], shards):
        assert case["rel_diff"] < 1e-10, case
        assert case["identical_on_all_ranks"], case
        # rank 0's part of the gradient (and the extras: loss, stop, noise-scale slots), summed over its data-parallel group of 2
        assert case["wire_bytes_per_step"] == allreduce_bytes(2, n + EXTRAS, 8)


# -- parallel.grid: auto ------------------------------------------------------------------------------

def test_the_grid_cost_model_prefers_splitting_units_where_the_gradient_is_large_and_the_batch_small():
    from pbp_hpc.parallel import grid_auto

    assert grid_auto.candidates(2, [784, 1024, 10], True) == [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
    assert grid_auto.candidates(4, [784, 1024, 1024, 10], True) == [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]
    assert grid_auto.candidates(2, [784, 1024, 10], False) == [(2, 1, 1)]
    # Net-1h at batch 1 on a network of 1 ms latency and 10 ns per byte: the 3.26 MB gradient dominates
    data, tp = (grid_auto.predict([784, 1024, 10], 1, g, 4, 4, 1e-3, 1e-8, "float32") for g in [(2, 1, 1), (1, 2, 1)])
    assert tp < data


@pytest.mark.mpi(min_size=2)
def test_grid_auto_chooses_a_grid_the_header_names_and_trains_the_one_rank_parameters():
    lines: list[str] = []
    par = train.run(cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP, parallel__grid="auto"), WORLD, return_params=True,
                    log=lines.append)
    ref = train.run(cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP), MPI.COMM_SELF, return_params=True)
    assert rel(par["params"], ref["params"]) < 1e-10
    if WORLD.rank == 0:
        assert any(line.startswith("pbp_hpc: grid auto: data ") for line in lines)
    chosen = par["config"]["parallel"]
    assert WORLD.size % (chosen["tensor"] * chosen["pipeline"]) == 0


def test_the_shared_batch_data_path_is_priced_above_its_gemms_alone(monkeypatch):
    """At <= 64 rows a rank on one node (reducer auto's shared_batch) the data step's compute is
    SHARED_BATCH_SLOWDOWN times its GEMMs alone (measured: the model under-predicted that path);
    at more rows (shm), across nodes, and for a tensor grid, it is the GEMMs' time."""
    from pbp_hpc.parallel import grid_auto

    monkeypatch.setattr(grid_auto, "first_layer_seconds", lambda sizes, rows, T, dtype: 1e-3 * rows / T)
    node_sum = 2e-4  # the shared-memory sum; with alpha = beta = 0 no message costs anything

    def step(B, grid, node):
        return grid_auto.predict([784, 1024, 10], B, grid, 4, 4, 0.0, 0.0, "float32", node)

    assert step(128, (2, 1, 1), node_sum) - node_sum == pytest.approx(grid_auto.SHARED_BATCH_SLOWDOWN * step(128, (2, 1, 1), None))
    assert step(2048, (2, 1, 1), node_sum) - node_sum == pytest.approx(step(2048, (2, 1, 1), None))
    assert step(128, (1, 2, 1), node_sum) == step(128, (1, 2, 1), None) > 0


@pytest.mark.parametrize("split", ["parallel.tensor=2", "parallel.pipeline=2"])
def test_a_nan_on_one_rank_of_a_model_group_ends_the_whole_job_as_diverged(split):
    from helpers import run_cmd

    args = ["pbp_hpc.train", "--set", "data.name=synthetic", "--set", "data.n_train=240", "--set", "model.layers=[784, 16, 10]",
            "--set", "train.batch_size=20", "--set", "train.epochs=2", "--set", split, "--set", "debug.fail_rank=1",
            "--set", "debug.fail_step=5", "--set", "debug.fail_kind=nan", "--set", "train.progress=false", "--json"]
    res = run_cmd(args, ranks=2, timeout=90)
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "diverged", res.stderr
