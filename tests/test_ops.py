"""engine.ops.gemm: out <- alpha a @ b + beta out, whatever the shapes and views.

A product with a dimension of 1 (batch 1: the report's stochastic GD; bias rows; outer
products) goes to the level-2 BLAS calls (gemv, ger) and the rest to gemm: every path must
compute the same thing, on row-major arrays and transposed views alike.
"""

import itertools

import numpy as np
import pytest

from pbp_hpc.engine import ops

SHAPES = [(1, 150, 64), (1, 64, 10), (5, 1, 7), (1, 1, 9), (7, 5, 1), (1, 3, 1), (3, 1, 1), (6, 4, 5)]  # m, k, n


def operand(rng: np.random.Generator, rows: int, cols: int, transposed: bool, dtype: type) -> np.ndarray:
    return rng.random((cols, rows)).astype(dtype).T if transposed else rng.random((rows, cols)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_is_alpha_a_b_plus_beta_out_for_every_shape_and_view(m, k, n, dtype):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    for ta, tb, (alpha, beta) in itertools.product([False, True], [False, True], [(1.0, 0.0), (0.5, 1.0), (-0.3, 0.7), (2.0, 0.0)]):
        a, b = operand(rng, m, k, ta, dtype), operand(rng, k, n, tb, dtype)
        out = rng.random((m, n)).astype(dtype)
        want = alpha * (a.astype(np.float64) @ b) + beta * out
        ops.gemm(np, a, b, out, alpha=alpha, beta=beta)
        np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_gemm_on_strided_views_of_larger_arrays():
    rng = np.random.default_rng(0)
    big = rng.random((8, 12))
    out = np.zeros((4, 12))
    ops.gemm(np, big[2:6, 3:4], big[0:1, :], out, alpha=1.0, beta=1.0)  # a column of a slice, a row: rank 1
    np.testing.assert_allclose(out, big[2:6, 3:4] @ big[0:1, :], rtol=1e-12)
    row = np.zeros((1, 12))[:, ::2]  # an output row with a stride
    ops.gemm(np, big[:1, :5], big[1:6, ::2], row)
    np.testing.assert_allclose(row, big[:1, :5] @ big[1:6, ::2], rtol=1e-12)
