"""Gradients sent as 16-bit floats (parallel.compression): the codecs' rounding, and what a
compressed sum delivers with and without error feedback. The sums across ranks and nodes are
checked against full precision in test_nodes.py."""

import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel.reducers import compression


def test_bf16_keeps_the_upper_16_bits_rounded_to_nearest_even():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bf16 keeps 8 bits of precision
    x = np.array([one, one + ulp / 2, one + ulp * 1.5, one + ulp * 0.75, -(one + ulp) * 2.0**100, np.inf], dtype=np.float32)
    got = compression.round_trip("bf16", x)
    np.testing.assert_array_equal(got, [one, one, one + 2 * ulp, one + ulp, -(one + ulp) * 2.0**100, np.inf])


def test_nan_stays_nan_and_fp16_overflows_to_inf():
    x = np.array([np.nan, np.float32(np.uint32(0x7FFFFFFF).view(np.float32))], dtype=np.float32)
    assert np.isnan(compression.round_trip("bf16", x)).all()
    assert np.isnan(compression.round_trip("fp16", x)).all()
    assert compression.round_trip("fp16", np.array([70000.0], dtype=np.float32))[0] == np.inf


@pytest.mark.parametrize("kind, bits", [("fp16", 11), ("bf16", 8)])
def test_a_round_trip_is_within_half_an_ulp_of_its_precision(kind, bits):
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    rel = np.abs(compression.round_trip(kind, x) - x) / np.abs(x)
    assert rel.max() <= 2.0**-bits * 1.001 and rel.max() > 2.0**-bits / 4


def test_error_feedback_delivers_over_steps_what_was_sent_less_what_is_still_owed():
    sums = compression.CompressedSum(MPI.COMM_SELF, 1000, "bf16", feedback=True)
    rng = np.random.default_rng(1)
    sent, delivered = np.zeros(1000), np.zeros(1000)
    for _ in range(20):
        g = rng.standard_normal(1000)
        out = np.empty(1000)
        sums.start(g)
        compression.run([sums], [out], lambda reqs: [r.Wait() for r in reqs])
        sent += g
        delivered += out
    # without feedback the error would grow with the steps; with it, only this step's is owed
    np.testing.assert_allclose(delivered + sums.residual[:1000], sent, rtol=0, atol=1e-5)
    assert np.abs(delivered - sent).max() < 2.0**-8 * np.abs(sent).max()


def test_wire_bytes_are_a_quarter_of_a_float64_allreduce():
    assert compression.allreduce_bytes(4, 1000, 8) == 2 * 3 * 250 * 8
    assert compression.CompressedSum(MPI.COMM_SELF, 1000, "fp16", False).wire_bytes() == 0


def test_compression_with_a_device_reducer_or_feedback_alone_is_refused():
    with pytest.raises(ConfigError, match="parallel.compression=bf16 does not go with backend=cupy"):
        config.load(None, ["parallel.compression=bf16", "backend=cupy"])
    with pytest.raises(ConfigError, match="parallel.error_feedback=True does not go with parallel.compression=none"):
        config.load(None, ["parallel.error_feedback=true"])
    with pytest.raises(ConfigError, match="compression"):
        config.load(None, ["parallel.compression=fp8"])
