"""Optimizers and learning-rate schedules: each update against a plain numpy oracle written
here from the formulas, P ranks equal to one rank under every reducer, the state checkpointed
so that a resumed run is bit for bit an uninterrupted one."""

import math

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, train
from pbp_hpc.engine import optimizers
from pbp_hpc.engine.schedules import Schedule, describe
from pbp_hpc.errors import ConfigError

WORLD = MPI.COMM_WORLD


def cfg(**over):
    base = {"model.layers": "[784, 16, 12, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.3,
            "train.eval_every": 0, "train.progress": "false", "train.batch_size": 10,
            # the report's setup as the base (the built-in defaults are another); tests vary from it
            "model.activation": "sigmoid", "model.loss": "mse", "model.init": "glorot_uniform",
            "optimizer.name": "sgd", "schedule.name": "constant", "schedule.warmup_epochs": 0,
            "schedule.scale_with_batch": "none"}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def oracle(name, theta, grads, lr, batch, mu, wd):
    """Steps of PyTorch's SGD (momentum, dampening 0, nesterov) on gradient sums, in plain numpy."""
    theta, v = theta.copy(), np.zeros_like(theta)
    for g in grads:
        d = g / batch + wd * theta
        if name == "sgd":
            theta = theta - lr * d
            continue
        v = mu * v + d
        theta = theta - lr * (d + mu * v if name == "nesterov" else v)
    return theta


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_each_optimizer_follows_its_formula(name, wd, n_parts):
    rng = np.random.default_rng(0)
    n, batch, lr, mu = 50, 8, 0.2, 0.85
    theta0 = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(4)]
    c = cfg(optimizer__name=name, optimizer__momentum=mu, optimizer__weight_decay=wd)
    theta = theta0.copy()
    opt = optimizers.make(c, theta, lambda: np.zeros(n), np)
    for g in grads:  # the gradient sum in parts (as the shm reducer gives it), over two spans
        parts = _split_sum(g, n_parts)
        for span in (slice(0, 20), slice(20, n)):
            opt.apply(span, [q[span] for q in parts], lr, batch)
    np.testing.assert_allclose(theta, oracle(name, theta0, grads, lr, batch, mu, wd), rtol=1e-12, atol=1e-14)
    assert opt.fusable == (name == "sgd" and wd == 0.0)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_parts", [1, 2])
def test_the_fused_update_equals_the_unfused_formula_to_rounding(name, wd, dtype, n_parts):
    """The velocity and parameter passes as BLAS axpby/axpy (momentum.py) against the formula
    written out in float64, in both float widths, over a span long enough for BLAS's vector
    loops and with an odd tail, in parts (shm's ranks) and over two spans."""
    rng = np.random.default_rng(1)
    n, batch, lr, mu = 20011, 128, 0.3, 0.9
    theta0 = rng.standard_normal(n).astype(dtype)
    grads = [(8 * rng.standard_normal(n)).astype(dtype) for _ in range(5)]
    c = cfg(optimizer__name=name, optimizer__momentum=mu, optimizer__weight_decay=wd, model__dtype=dtype)
    theta = theta0.copy()
    opt = optimizers.make(c, theta, lambda: np.zeros(n, dtype=dtype), np)
    want, v = theta0.astype(np.float64), np.zeros(n)
    for g in grads:
        parts = [q.astype(dtype) for q in _split_sum(g.astype(np.float64), n_parts)]
        opt.apply_all([(span, [q[span] for q in parts]) for span in (slice(0, 7001), slice(7001, n))], lr, batch)
        d = sum(q.astype(np.float64) for q in parts) / batch + wd * want  # the unfused formula
        v = mu * v + d
        want = want - lr * (d + mu * v if name == "nesterov" else v)
        assert theta.dtype == np.dtype(dtype) and opt.velocity.dtype == np.dtype(dtype)
        np.testing.assert_allclose(opt.velocity, v, rtol=0, atol=40 * np.finfo(dtype).eps * np.abs(v).max())
    np.testing.assert_allclose(theta, want, rtol=0, atol=40 * np.finfo(dtype).eps * np.abs(want).max())


def _split_sum(g, k):
    """k arrays that add up to g (as ranks' gradient rows do)."""
    rng = np.random.default_rng(k)
    parts = [rng.standard_normal(g.shape) for _ in range(k - 1)]
    return [*parts, g - sum(parts)] if parts else [g]


def test_momentum_state_is_shaped_like_the_parameters_and_named():
    theta = np.zeros(7)
    opt = optimizers.make(cfg(optimizer__name="nesterov"), theta, lambda: np.zeros(7), np)
    assert set(opt.state()) == {"velocity"} and opt.state()["velocity"].shape == (7,)
    assert optimizers.make(cfg(), theta, lambda: np.zeros(7), np).state() == {}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["momentum", "nesterov"])
@pytest.mark.parametrize("reducer", ["blocking", "overlap", "shm", "shared_batch"])
def test_p_ranks_equal_one_rank_with_momentum_under_every_reducer(name, reducer):
    c = cfg(optimizer__name=name, optimizer__weight_decay=1e-3, parallel__reducer=reducer, train__batch_size=7)
    par = train.run(c, WORLD, return_params=True)
    ref = train.run(c, MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    gathered = WORLD.allgather(par["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_a_run_with_momentum_stopped_and_resumed_is_bit_for_bit_uninterrupted(tmp_path, name):
    over = dict(optimizer__name=name, train__epochs=3, schedule__name="cosine", schedule__warmup_epochs=0.5)
    full = train.run(cfg(**over, checkpoint__path=tmp_path / "full.h5"), MPI.COMM_SELF, return_params=True)
    cut = cfg(**over, checkpoint__path=tmp_path / "cut.h5", debug__signal_step=15)
    assert train.run(cut, MPI.COMM_SELF)["status"] == "checkpointed"
    with h5py.File(tmp_path / "cut.h5") as f:
        assert f["state/velocity"].shape == f["theta"].shape and np.abs(f["state/velocity"][...]).max() > 0
    resumed = train.run(cfg(**over, checkpoint__path=tmp_path / "cut.h5", checkpoint__resume="true"), MPI.COMM_SELF,
                        return_params=True)
    assert resumed["params"].tobytes() == full["params"].tobytes()


def test_momentum_learns_faster_than_sgd_at_a_large_batch():
    """What momentum is for, on a problem where it shows: the same rate and epochs, a lower loss."""
    over = dict(train__batch_size=60, train__epochs=4, train__learning_rate=0.5)
    sgd = train.run(cfg(**over), MPI.COMM_SELF)
    mom = train.run(cfg(**over, optimizer__name="momentum"), MPI.COMM_SELF)
    assert mom["epochs"][-1]["loss"] < sgd["epochs"][-1]["loss"]


# --- schedules -----------------------------------------------------------------------------


def test_constant_is_the_base_rate_and_linear_scaling_multiplies_it_by_batch_over_base():
    assert Schedule(cfg(), 10)(0) == Schedule(cfg(), 10)(99) == 0.3
    s = Schedule(cfg(train__batch_size=1024, schedule__scale_with_batch="true", schedule__base_batch=256,
                     schedule__max_scale="null"), 10)
    assert s(0) == s(50) == pytest.approx(1.2)
    capped = cfg(train__batch_size=1024, schedule__scale_with_batch="linear", schedule__base_batch=256)
    assert Schedule(capped, 10)(0) == pytest.approx(0.6)  # schedule.max_scale: 2 by default
    assert describe(capped) == "peak lr 0.6 (linear rule: 0.3 x 1024/256, capped at 2x (schedule.max_scale)), constant"


def test_the_default_rule_scales_the_peak_by_the_square_root_of_batch_over_1024_and_the_header_says_so():
    default = config.load(None, []).schedule
    assert (default.scale_with_batch, default.base_batch) == ("sqrt", 1024)
    sqrt = cfg(train__batch_size=256, schedule__scale_with_batch="sqrt")
    assert Schedule(sqrt, 10)(0) == pytest.approx(0.3 * 0.5)  # sqrt(256 / 1024)
    assert describe(sqrt) == "peak lr 0.15 (sqrt rule: 0.3 x sqrt(256/1024)), constant"
    assert "fixed: schedule.scale_with_batch none" in describe(cfg(schedule__scale_with_batch="false"))


def test_warm_up_ramps_linearly_from_zero_to_the_scaled_peak():
    s = Schedule(cfg(train__batch_size=512, schedule__scale_with_batch="linear", schedule__base_batch=256,
                     schedule__warmup_epochs=1), 10)
    rates = [s(k) for k in range(12)]
    assert rates[0] == pytest.approx(0.06) and rates[9] == rates[10] == pytest.approx(0.6)
    assert all(b > a for a, b in zip(rates[:10], rates[1:10]))
    unscaled = Schedule(cfg(schedule__warmup_epochs=2), 5)
    assert unscaled(0) == pytest.approx(0.03) and unscaled(9) == pytest.approx(0.3)


def test_a_batch_larger_than_the_training_set_is_refused_naming_both_numbers():
    with pytest.raises(ConfigError, match=r"train.batch_size 101 is larger than the 100 training examples; "
                                          r"full-batch gradient descent is train.batch_size=100 \(= n_train\)"):
        train.run(cfg(train__batch_size=101), MPI.COMM_SELF)


def test_step_decay_multiplies_by_gamma_every_step_epochs_after_warm_up():
    s = Schedule(cfg(schedule__name="step", schedule__step_epochs=2, schedule__gamma=0.5, schedule__warmup_epochs=1), 10)
    assert [s(k) for k in (10, 29, 30, 49, 50)] == pytest.approx([0.3, 0.3, 0.15, 0.15, 0.075])


def test_cosine_decays_from_the_peak_to_min_lr_by_the_last_step():
    c = cfg(schedule__name="cosine", schedule__min_lr=0.01, train__epochs=4)
    s = Schedule(c, 10)
    assert s(0) == pytest.approx(0.3) and s(20) == pytest.approx(0.01 + 0.29 * 0.5)
    assert s(39) == pytest.approx(0.01 + 0.29 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(b <= a for a, b in zip(map(s, range(40)), map(s, range(1, 40))))


def test_a_batch_past_the_rules_limit_gets_a_warning_naming_the_epochs_that_would_do():
    from pbp_hpc.engine.schedules import few_steps_warning
    big = config.load(None, ["train.batch_size=4096"])  # the defaults: sqrt rule, 8 epochs
    assert few_steps_warning(big, 50000) == (
        "warning: batch 4096 leaves 104 steps in 8 epoch(s); the default recipe trained well (>= 97% on MNIST) only "
        "from 200 steps: set train.epochs=16 or a smaller batch (docs/training.md, \"Changing the batch\")")
    assert few_steps_warning(config.load(None, ["train.batch_size=4096", "train.epochs=16"]), 50000) == ""
    assert few_steps_warning(config.load(None, ["train.batch_size=1024", "train.epochs=1"]), 50000) == ""  # not scaled up
