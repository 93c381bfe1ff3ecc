"""LARS and LAMB: each against a numpy oracle written here from the papers' equations (PyTorch
has neither built in), P ranks equal to one rank under every reducer, the per-layer norms of
the sliced reducers (shm, shared_batch) equal to one rank's, and a resumed run bit for bit an
uninterrupted one."""

import math

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, train
from pbp_hpc.engine import optimizers
from pbp_hpc.engine.model import Layout
from pbp_hpc.engine.optimizers.layerwise import LARS

WORLD = MPI.COMM_WORLD
LAYERS = [5, 4, 3]


def cfg(**over):
    base = {"model.layers": "[784, 16, 12, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.learning_rate": 0.05,
            "train.eval_every": 0, "train.progress": "false", "train.batch_size": 10,
            "model.activation": "relu", "model.loss": "cross_entropy", "model.init": "he_uniform",
            "optimizer.name": "lars", "schedule.name": "constant", "schedule.warmup_epochs": 0}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def tensors(exclude_biases):
    """(slice, adapt) per parameter tensor of LAYERS: the papers' layers."""
    lay = Layout(LAYERS)
    out = []
    for w, b in zip(lay.w_slices, lay.b_slices):
        out += [(w, True), (b, not exclude_biases)]
    return out


def lars_oracle(theta, grads, lr, batch, mu, wd, eta, eps, exclude):
    """You, Gitman & Ginsburg (2017), Algorithm 1, per tensor; biases (excluded) plain momentum."""
    theta, v = theta.copy(), np.zeros_like(theta)
    for G in grads:
        for sl, adapt in tensors(exclude):
            w, g = theta[sl], G[sl] / batch
            if adapt:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                local = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
                d = g + wd * w
            else:
                local, d = 1.0, g
            v[sl] = mu * v[sl] + lr * local * d
            theta[sl] = w - v[sl]
    return theta


def lamb_oracle(theta, grads, lr, batch, b1, b2, wd, eps, exclude):
    """You et al. (2019), Algorithm 2 (phi the identity), per tensor."""
    theta, m, s = theta.copy(), np.zeros_like(theta), np.zeros_like(theta)
    for t, G in enumerate(grads, start=1):
        g = G / batch
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        r = (m / (1 - b1 ** t)) / (np.sqrt(s / (1 - b2 ** t)) + eps)
        for sl, adapt in tensors(exclude):
            w = theta[sl]
            u = r[sl] + (wd * w if adapt else 0.0)
            wn, un = np.linalg.norm(w), np.linalg.norm(u)
            ratio = wn / un if adapt and wn > 0 and un > 0 else 1.0
            theta[sl] = w - lr * ratio * u
    return theta


def _parts(g, k, seed):
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(g.shape) for _ in range(k - 1)]
    return [*ps, g - sum(ps)] if ps else [g]


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("exclude", [True, False])
def test_each_layerwise_optimizer_follows_its_paper(name, wd, exclude):
    c = cfg(model__layers=LAYERS, data__name="idx", optimizer__name=name, optimizer__weight_decay=wd,
            optimizer__exclude_biases=exclude, optimizer__momentum=0.8, optimizer__trust_coefficient=0.02,
            optimizer__betas="[0.85, 0.99]", optimizer__eps=1e-8)
    n = Layout(LAYERS).n_params
    rng = np.random.default_rng(1)
    theta0 = rng.standard_normal(n)
    theta0[20:24] = 0.0  # the first layer's biases start at zero: ratio 1 there
    grads = [rng.standard_normal(n) for _ in range(4)]
    lr, batch = 0.3, 6
    theta = theta0.copy()
    opt = optimizers.make(c, theta, lambda: np.zeros(n), np)
    spans = (slice(0, 7), slice(7, 22), slice(22, n))  # spans that cut tensors, as shm's slices do
    for i, g in enumerate(grads):  # the gradient sum as parts (shm's rows), every span in one step
        opt.apply_all([(sp, [p[sp] for p in _parts(g, 1 + i % 3, i)]) for sp in spans], lr, batch)
    if name == "lars":
        want = lars_oracle(theta0, grads, lr, batch, 0.8, wd, 0.02, 1e-8, exclude)
    else:
        want = lamb_oracle(theta0, grads, lr, batch, 0.85, 0.99, wd, 1e-8, exclude)
    np.testing.assert_allclose(theta, want, rtol=1e-12, atol=1e-14)
    assert not opt.fusable


def test_state_is_named_and_shaped_for_the_checkpoint():
    n = Layout(LAYERS).n_params
    lars = optimizers.make(cfg(model__layers=LAYERS, data__name="idx"), np.zeros(n), lambda: np.zeros(n), np)
    lamb = optimizers.make(cfg(model__layers=LAYERS, data__name="idx", optimizer__name="lamb"), np.zeros(n),
                           lambda: np.zeros(n), np)
    assert {k: v.shape for k, v in lars.state().items()} == {"velocity": (n,)}
    assert {k: v.shape for k, v in lamb.state().items()} == {"exp_avg": (n,), "exp_avg_sq": (n,), "lamb_step": (1,)}


def test_betas_out_of_range_are_refused_naming_the_key():
    with pytest.raises(config.ConfigError, match="optimizer.betas"):
        cfg(optimizer__name="lamb", optimizer__betas="[0.9, 1.0]")


class Recording(LARS):
    """LARS that keeps every step's per-tensor squared norms (after the node's sum)."""

    seen: list = []

    def apply_all(self, shares, lr, batch):
        super().apply_all(shares, lr, batch)
        Recording.seen.append(self.norms.copy())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("reducer", ["blocking", "overlap", "shm", "shared_batch"])
def test_p_ranks_equal_one_rank_under_every_reducer(name, reducer):
    c = cfg(optimizer__name=name, optimizer__weight_decay=1e-3, parallel__reducer=reducer, train__batch_size=7,
            train__epochs=1)
    par = train.run(c, WORLD, return_params=True)
    ref = train.run(c, MPI.COMM_SELF, return_params=True)
    np.testing.assert_allclose(par["params"], ref["params"], rtol=1e-10, atol=1e-12)
    gathered = WORLD.allgather(par["params"])
    for p in gathered[1:]:
        np.testing.assert_array_equal(p, gathered[0])
    if reducer in ("shm", "shared_batch"):  # one reduction of the norms per step, in the record
        assert par["slice_sums"] == math.ceil(120 * 5 / 6 / 7) and par["slice_sum_bytes"] == 6 * 2 * 8
    else:
        assert "slice_sums" not in par


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("reducer", ["shm", "shared_batch"])
def test_per_layer_norms_of_the_node_slices_equal_one_ranks(reducer):
    optimizers.register("lars_recording", Recording)
    c = cfg(optimizer__name="lars_recording", parallel__reducer=reducer, train__batch_size=9, train__epochs=1)
    Recording.seen = []
    train.run(c, WORLD)
    par, Recording.seen = Recording.seen, []
    train.run(c, MPI.COMM_SELF)
    assert len(par) == len(Recording.seen) > 0
    np.testing.assert_allclose(np.array(par), np.array(Recording.seen), rtol=1e-10)
    assert np.all(np.array(par)[:, 0::2] > 0)  # the weights' norms were summed, not one rank's part


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_a_run_stopped_and_resumed_is_bit_for_bit_uninterrupted(tmp_path, name):
    over = dict(optimizer__name=name, train__epochs=2, schedule__name="cosine", schedule__warmup_epochs=0.5)
    full = train.run(cfg(**over, checkpoint__path=tmp_path / "full.h5"), MPI.COMM_SELF, return_params=True)
    cut = cfg(**over, checkpoint__path=tmp_path / "cut.h5", debug__signal_step=15)
    assert train.run(cut, MPI.COMM_SELF)["status"] == "checkpointed"
    with h5py.File(tmp_path / "cut.h5") as f:
        names = set(f["state"])
    assert names == ({"velocity"} if name == "lars" else {"exp_avg", "exp_avg_sq", "lamb_step"})
    resumed = train.run(cfg(**over, checkpoint__path=tmp_path / "cut.h5", checkpoint__resume="true"), MPI.COMM_SELF,
                        return_params=True)
    assert resumed["params"].tobytes() == full["params"].tobytes()


@pytest.mark.parametrize("name,strategy", [("lars", "local_sgd"), ("lamb", "async_ps")])
def test_runs_under_the_strategies_that_take_an_optimizer(name, strategy):
    out = train.run(cfg(optimizer__name=name, parallel__strategy=strategy, train__epochs=1, data__n_train=60),
                    MPI.COMM_SELF)
    assert out["status"] == "ok" and math.isfinite(out["epochs"][-1]["loss"])
