"""The decoupled pipeline schedule (parallel.pipeline_schedule: decoupled): synthetic gradients.

Serially: the synthetic module learns a gradient that is linear in the activations, and the
combinations the schedule does not support are refused. Under `mpiexec -n P pytest --with-mpi
-m mpi` (P = 2 or 3) the world is one pipeline of P stages: with the module silent (zero and
never trained) the stages below the last never move and the last stage's first update is the
synchronous pipeline's, bit for bit; with it trained the run learns, and resumes.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import train
from pbp_hpc.engine import layout, model
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import pipeline
from pbp_hpc.parallel.synthetic import SyntheticGradient
from test_tensor import DEEP, SIGMOID_MSE_SGD, cfg_of, shared_dir

WORLD = MPI.COMM_WORLD
DECOUPLED = {"model__layers": DEEP, "parallel__microbatches": 3, "parallel__pipeline_schedule": "decoupled"}


@pytest.mark.parametrize("rank", [0, 2])
def test_the_synthetic_module_learns_a_gradient_linear_in_the_activations(rank):
    rng = np.random.default_rng(0)
    w = 6
    A, c = rng.normal(size=(w, 2)) @ rng.normal(size=(2, w)) / w, rng.normal(size=w)  # A of rank 2
    sg = SyntheticGradient(np, w, np.float64, lr=0.5, rank=rank)
    assert not sg.predict(rng.uniform(size=(3, w)), np.empty((3, w))).any()  # zero at the start
    pred = np.empty((8, w))

    def error() -> float:
        h = rng.uniform(size=(8, w))
        sg.predict(h, pred)
        return float(np.abs(pred - (h @ A + c)).max())

    first = error()
    for _ in range(400 if not rank else 3000):  # two microbatches a step
        for _ in range(2):
            h = rng.uniform(size=(8, w))
            sg.predict(h, pred)
            sg.add_error(h, pred, h @ A + c)
        sg.apply()
    assert error() < 0.05 * first


def test_decoupled_with_a_tensor_group_or_without_a_pipeline_is_refused_naming_both():
    with pytest.raises(ConfigError, match="parallel.pipeline_schedule=decoupled does not go with parallel.tensor=2"):
        cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=2, parallel__tensor=2, parallel__pipeline_schedule="decoupled")
    with pytest.raises(ConfigError, match="does not go with parallel.pipeline=1"):
        cfg_of(SIGMOID_MSE_SGD, parallel__pipeline_schedule="decoupled")
    with pytest.raises(ConfigError, match="synthetic_lr"):
        cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=2, parallel__synthetic_lr=-1)


def _below_last(params: np.ndarray, S: int) -> np.ndarray:
    """The parameters of the stages below the last, of a whole model of DEEP's layers."""
    sizes = [int(n) for n in DEEP.strip("[]").split(",")]
    stages = pipeline.split_layers(sizes, S)
    held = pipeline.stage_layout(sizes, [(0, stages[-2][1]), stages[-1]], 0)
    out = np.empty(held.n_params)
    layout.take(held, params, out)
    return out


@pytest.mark.mpi(min_size=2)
def test_with_a_silent_module_the_stages_below_stay_put_and_the_last_updates_as_the_synchronous_one():
    S = WORLD.size
    sizes = [int(n) for n in DEEP.strip("[]").split(",")]
    init = model.init_params(model.Layout(sizes), 0, "float64", init="glorot_uniform")
    silent = train.run(cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=S, parallel__synthetic_lr=0, **DECOUPLED),
                       WORLD, return_params=True)
    # 24 steps of plain SGD with a zero synthetic gradient: zero gradients below the last stage
    np.testing.assert_array_equal(_below_last(silent["params"], S), _below_last(init, S))
    assert not np.array_equal(silent["params"], init)
    # one step (6 examples: 5 to train on in one batch, 1 to validate): the same inputs reach the
    # last stage, whose true gradient and update are the synchronous schedule's
    one = {"data__n_train": 6, "train__epochs": 1}
    runs = {sched: train.run(cfg_of(SIGMOID_MSE_SGD, parallel__pipeline=S,
                                    **{**DECOUPLED, **one, "parallel__pipeline_schedule": sched}),
                             WORLD, return_params=True)
            for sched in ("decoupled", "1f1b")}
    np.testing.assert_array_equal(runs["decoupled"]["params"][_below_last(init, S).size:],
                                  runs["1f1b"]["params"][_below_last(init, S).size:])
    assert not np.array_equal(runs["decoupled"]["params"], runs["1f1b"]["params"])  # (the stages below differ)


@pytest.mark.mpi(min_size=2)
def test_decoupled_stages_learn_and_a_run_resumes(tmp_path):
    S, d = WORLD.size, shared_dir(tmp_path)
    over = {**DECOUPLED, "parallel__pipeline": S, "parallel__synthetic_lr": 0.05, "train__epochs": 4}
    # a low-rank module (A = U V of rank 3) trained on one microbatch in 2
    run = train.run(cfg_of(SIGMOID_MSE_SGD, **over, parallel__synthetic_every=2, parallel__synthetic_rank=3),
                    WORLD, return_params=True)
    losses = [e["loss"] for e in run["epochs"]]
    assert losses[-1] < losses[0]
    # batches of 5 in microbatches of 1, 2, 2 rows: every output goes up; with synthetic_every 2
    # only microbatches 0 and 2 (3 rows) send their input gradient down
    sizes = [int(n) for n in DEEP.strip("[]").split(",")]
    lo, hi = pipeline.split_layers(sizes, S)[WORLD.rank]
    up = 5 * sizes[hi] if WORLD.rank < S - 1 else 0
    down = 3 * sizes[lo] if WORLD.rank > 0 else 0
    assert run["bytes_per_step"]["activations"] == (up + down) * 8
    init = model.init_params(model.Layout(sizes), 0, "float64", init="glorot_uniform")
    # the module learned from the true gradients, so the stages below the last moved
    assert not np.array_equal(_below_last(run["params"], S), _below_last(init, S))
    # a checkpoint after 2 epochs resumes (the module restarts at zero) and trains on
    train.run(cfg_of(SIGMOID_MSE_SGD, **{**over, "train__epochs": 2}, checkpoint__path=f"{d}/c.h5"), WORLD)
    again = train.run(cfg_of(SIGMOID_MSE_SGD, **over, checkpoint__path=f"{d}/c.h5", checkpoint__resume="true"),
                      WORLD, return_params=True)
    assert [e["epoch"] for e in again["epochs"]][-1] == 3
    assert np.isfinite(again["params"]).all()
    assert again["epochs"][-1]["loss"] < losses[0]
    for p in WORLD.allgather(again["params"]):
        np.testing.assert_array_equal(p, again["params"])
