"""The gradient noise scale (pbp_hpc.parallel.noise_scale): the estimator finds a known B_simple
from synthetic per-example gradients, and a 2-rank run records it at every evaluation pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc.parallel.noise_scale import NoiseScale
from pbp_hpc.parallel.reducers.base import EXTRAS, NOISE_SLOT

WORLD = MPI.COMM_WORLD


def test_the_estimator_finds_a_known_noise_scale():
    rng = np.random.default_rng(0)
    d, sigma, B, P = 200, 0.5, 64, 4
    G = np.full(d, 0.1)  # |G|^2 = 2, tr(Sigma) = d sigma^2 = 50: B_simple = 25
    buf = np.zeros(d + EXTRAS)
    grad, extras = buf[:d], buf[d:]
    noise = NoiseScale(every=1, ranks=P, grad=grad, extras=extras)
    for step in range(400):
        examples = G + sigma * rng.standard_normal((B, d))
        shares = np.split(examples, P)
        grad[...] = shares[0].sum(axis=0)
        noise.before(step, B // P)
        # what the Allreduce does: the extras summed over ranks, the gradient sums too
        extras[NOISE_SLOT] = sum(float(s.sum(axis=0) @ s.sum(axis=0)) / (B // P) ** 2 for s in shares)
        grad[...] = examples.sum(axis=0)
        noise.after(extras, B)
    assert noise.estimates == 400
    assert noise.value == pytest.approx(d * sigma**2 / float(G @ G), rel=0.25)


def test_off_steps_leave_the_slot_zero():
    buf = np.ones(10 + EXTRAS)
    noise = NoiseScale(every=10, ranks=2, grad=buf[:10], extras=buf[10:])
    noise.before(3, 5)
    assert buf[10 + NOISE_SLOT] == 0.0 and noise.value is None


@pytest.mark.mpi
def test_a_run_records_the_noise_scale_at_every_pass():
    if WORLD.size < 2:
        pytest.skip("needs 2 ranks: one rank has no smaller batch")
    from test_accounting import small

    from pbp_hpc import train

    res = train.run(small(**{"parallel.reducer": "blocking", "train.noise_scale_every": 1, "train.eval_every": 1}),
                    WORLD, quiet=True)
    values = [p["b_noise"] for p in res["evaluations"]]
    assert values and all(v is not None and math.isfinite(v) for v in values), values
    assert res["b_noise"] == values[-1] and res["noise_scale_cost_s"] > 0
    off = train.run(small(**{"parallel.reducer": "shm", "train.eval_every": 1}), WORLD, quiet=True)
    assert off["b_noise"] is None and "b_noise" not in off["evaluations"][-1]
