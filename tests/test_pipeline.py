"""Pipeline parallelism (parallel.pipeline): S stages of consecutive layers compute what one rank computes.

Serially: the split of layers into stages. Under `mpiexec -n P pytest --with-mpi -m mpi` the
world is one pipeline (S = P: 2 or 3) and every rank compares itself with the same training on
MPI_COMM_SELF; GPipe and 1F1B add the microbatches' gradients in the same order, so they give
identical parameters. Data 2 x pipeline 2 runs in test_tensor's 4-rank job, tensor 2 x pipeline 2
in test_compose's.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import train
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import pipeline
from test_tensor import DEEP, RELU_CE_NESTEROV, SIGMOID_MSE_SGD, cfg_of, rel, shared_dir

WORLD = MPI.COMM_WORLD


def test_stages_are_split_by_work_or_as_given():
    assert pipeline.split_layers([784, 1024, 1024, 10], 2) == [(0, 1), (1, 3)]  # 0.80M | 1.06M multiply-adds
    assert pipeline.split_layers([20, 17, 13, 9, 5], 3) == [(0, 1), (1, 2), (2, 4)]
    assert pipeline.split_layers([20, 17, 13, 9, 5], 2, [3, 1]) == [(0, 3), (3, 4)]


def test_a_world_or_split_the_pipeline_cannot_use_is_refused():
    with pytest.raises(ConfigError, match="parallel.pipeline is 2 but the job has 3 rank"):
        pipeline.check(cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=2), 3)
    with pytest.raises(ConfigError, match="at most one stage per layer"):
        pipeline.check(cfg_of(SIGMOID_MSE_SGD, model__layers="[20, 9, 5]", parallel__pipeline=3), 3)
    with pytest.raises(ConfigError, match="pipeline_split"):
        pipeline.check(cfg_of(SIGMOID_MSE_SGD, model__layers=DEEP, parallel__pipeline=2, parallel__pipeline_split="[2, 1]"), 2)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("setup", [SIGMOID_MSE_SGD, RELU_CE_NESTEROV], ids=["sigmoid-mse-sgd", "relu-ce-nesterov-wd"])
def test_gpipe_and_1f1b_compute_the_one_rank_parameters_identically(setup):
    S = WORLD.size
    # batches of 5 rows in 3 microbatches (2, 2, 1): sizes that do not divide
    runs = {sched: train.run(cfg_of(setup, model__layers=DEEP, parallel__pipeline=S, parallel__microbatches=3,
                                    parallel__pipeline_schedule=sched), WORLD, return_params=True)
            for sched in ("gpipe", "1f1b")}
    ref = train.run(cfg_of(setup, model__layers=DEEP), MPI.COMM_SELF, return_params=True)
    np.testing.assert_array_equal(runs["gpipe"]["params"], runs["1f1b"]["params"])
    par = runs["1f1b"]
    assert rel(par["params"], ref["params"]) < 1e-10
    for p in WORLD.allgather(par["params"]):
        np.testing.assert_array_equal(p, par["params"])
    assert par["epochs"][-1]["loss"] == pytest.approx(ref["epochs"][-1]["loss"], rel=1e-10)
    assert par["test_accuracy"] == ref["test_accuracy"]
    assert par["grid"] == {"data": 1, "tensor": 1, "pipeline": S}


@pytest.mark.mpi(min_size=2)
def test_a_pipeline_resumes_bit_for_bit_and_across_grid_shapes(tmp_path):
    S, d = WORLD.size, shared_dir(tmp_path)
    setup = RELU_CE_NESTEROV
    over = {"model__layers": DEEP, "parallel__microbatches": 2}
    whole = train.run(cfg_of(setup, parallel__pipeline=S, **over), WORLD, return_params=True)["params"]
    ref = train.run(cfg_of(setup, **over), MPI.COMM_SELF, return_params=True)["params"]
    train.run(cfg_of(setup, parallel__pipeline=S, train__epochs=1, checkpoint__path=f"{d}/p.h5", **over), WORLD)
    again = train.run(cfg_of(setup, parallel__pipeline=S, checkpoint__path=f"{d}/p.h5", checkpoint__resume="true",
                             **over), WORLD, return_params=True)["params"]
    np.testing.assert_array_equal(again, whole)
    WORLD.Barrier()
    if WORLD.rank == 0:  # S -> 1 (the checkpoint above was rewritten at the end: write the first epoch again)
        train.run(cfg_of(setup, train__epochs=1, checkpoint__path=f"{d}/one.h5", **over), MPI.COMM_SELF)
    train.run(cfg_of(setup, parallel__pipeline=S, train__epochs=1, checkpoint__path=f"{d}/s.h5", **over), WORLD)
    if WORLD.rank == 0:
        one = train.run(cfg_of(setup, checkpoint__path=f"{d}/s.h5", checkpoint__resume="true", **over),
                        MPI.COMM_SELF, return_params=True)["params"]
        assert rel(one, ref) < 1e-12
    WORLD.Barrier()  # 1 -> S
    par = train.run(cfg_of(setup, parallel__pipeline=S, checkpoint__path=f"{d}/one.h5", checkpoint__resume="true",
                           **over), WORLD, return_params=True)["params"]
    assert rel(par, ref) < 1e-12
