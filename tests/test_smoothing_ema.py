"""Label smoothing and the weight average (train.ema_decay): the smoothed loss against PyTorch's
and its delta against finite differences; the average against its formula; what is evaluated,
saved and checkpointed; P ranks equal to one under the node-sharing reducers."""

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, model_file, train
from pbp_hpc.engine import losses
from pbp_hpc.engine.ema import WeightAverage

WORLD = MPI.COMM_WORLD


def cfg(**over):
    base = {"model.layers": "[784, 16, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.2,
            "train.eval_every": 1, "train.progress": "false", "train.batch_size": 10,
            "optimizer.name": "nesterov", "schedule.name": "constant", "schedule.warmup_epochs": 0}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def _value_and_delta(loss, z, y):
    out, err, row = z.copy(), np.empty_like(z), np.empty((z.shape[0], 1))
    value = float(loss.value_(np, out, y, err, row))
    loss.delta_(np, out, y, err, row, None)
    return value, out


def test_smoothed_cross_entropy_is_pytorchs_and_its_delta_the_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((5, 4)) * 3, np.eye(4)[rng.integers(0, 4, 5)]
    loss = losses.CrossEntropy(0.1)
    value, delta = _value_and_delta(loss, z, y)
    want = loss.torch_sum(torch, torch.tensor(z), torch.tensor(y)).item()
    assert value == pytest.approx(want, rel=1e-12)
    h, num = 1e-6, np.empty_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        num[i] = (_value_and_delta(loss, zp, y)[0] - _value_and_delta(loss, zm, y)[0]) / (2 * h)
    np.testing.assert_allclose(delta, num, atol=1e-7)
    plain = _value_and_delta(losses.CrossEntropy(), z, y)
    assert plain[0] == pytest.approx(torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y), reduction="sum").item())


def test_label_smoothing_needs_cross_entropy_and_changes_training():
    with pytest.raises(config.ConfigError, match="model.label_smoothing"):
        cfg(model__loss="mse", model__label_smoothing=0.1)
    plain = train.run(cfg(), MPI.COMM_SELF, return_params=True)
    smooth = train.run(cfg(model__label_smoothing=0.1), MPI.COMM_SELF, return_params=True)
    assert not np.array_equal(plain["params"], smooth["params"])


def test_weight_average_follows_its_formula_with_the_ramp():
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(9)
    buf = np.zeros(9)
    avg = WeightAverage(0.9, theta, buf, [slice(0, 4), slice(4, 9)], np, lambda: None)
    want = theta.copy()
    for t in range(30):
        theta[...] = rng.standard_normal(9)
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        want = d * want + (1 - d) * theta
    np.testing.assert_allclose(buf, want, rtol=1e-13)
    raw, averaged = theta.copy(), buf.copy()
    with avg.swapped():
        np.testing.assert_array_equal(theta, averaged)
    np.testing.assert_array_equal(theta, raw)


def test_the_average_is_evaluated_saved_and_checkpointed(tmp_path):
    over = dict(train__ema_decay=0.9, train__save_model=tmp_path / "m.h5", checkpoint__path=tmp_path / "c.h5")
    out = train.run(cfg(**over, train__eval_every=0), MPI.COMM_SELF, return_params=True)
    saved, _, _ = model_file.load(tmp_path / "m.h5")
    with h5py.File(tmp_path / "c.h5") as f:
        ema = f["state/ema"][...]
        assert f["state/ema_steps"][0] == 2 * 10  # every step averaged
    np.testing.assert_array_equal(saved, ema)  # the saved model is the average, not the raw weights
    assert not np.array_equal(saved, out["params"])
    plain = train.run(cfg(train__eval_every=0), MPI.COMM_SELF, return_params=True)
    np.testing.assert_array_equal(plain["params"], out["params"])  # the average never feeds back


def test_a_run_with_the_average_stopped_and_resumed_is_bit_for_bit_uninterrupted(tmp_path):
    over = dict(train__ema_decay=0.8, train__epochs=2, train__eval_every=0)
    full = train.run(cfg(**over, checkpoint__path=tmp_path / "full.h5", train__save_model=tmp_path / "a.h5"),
                     MPI.COMM_SELF, return_params=True)
    assert train.run(cfg(**over, checkpoint__path=tmp_path / "cut.h5", debug__signal_step=15), MPI.COMM_SELF)["status"] == "checkpointed"
    resumed = train.run(cfg(**over, checkpoint__path=tmp_path / "cut.h5", checkpoint__resume="true",
                            train__save_model=tmp_path / "b.h5"), MPI.COMM_SELF, return_params=True)
    assert resumed["params"].tobytes() == full["params"].tobytes()
    assert model_file.load(tmp_path / "a.h5")[0].tobytes() == model_file.load(tmp_path / "b.h5")[0].tobytes()
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_the_average_is_refused_where_the_strategy_keeps_none():
    with pytest.raises(config.ConfigError, match="train.ema_decay"):
        cfg(train__ema_decay=0.9, parallel__strategy="local_sgd")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["blocking", "shm", "shared_batch"])
def test_p_ranks_average_and_smooth_as_one_rank(reducer, tmp_path):
    path = WORLD.bcast(str(tmp_path), root=0)
    c = cfg(train__ema_decay=0.9, model__label_smoothing=0.1, parallel__reducer=reducer, train__batch_size=7,
            train__save_model=f"{path}/p.h5")
    par = train.run(c, WORLD, return_params=True)
    if WORLD.rank == 0:
        ref = train.run(cfg(train__ema_decay=0.9, model__label_smoothing=0.1, train__batch_size=7,
                            train__save_model=f"{path}/one.h5"), MPI.COMM_SELF, return_params=True)
        np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(model_file.load(f"{path}/p.h5")[0], model_file.load(f"{path}/one.h5")[0],
                                   rtol=1e-10, atol=1e-12)
        assert [e["val_accuracy"] for e in par["evaluations"]] == [e["val_accuracy"] for e in ref["evaluations"]]
