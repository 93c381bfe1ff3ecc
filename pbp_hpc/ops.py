"""Array kernels that write into preallocated buffers, on any array namespace.

numpy and CuPy take `out=` on every ufunc and on matmul, so the hot path allocates nothing.
The Array API standard has no `out=`, so on other namespaces (array_api_strict in the tests)
the same functions compute a result and copy it in. One code path either way: the model never
calls numpy directly, which is what lets the strict-namespace tests catch a numpy-only call.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

Array = Any


_HAS_OUT: dict[ModuleType, bool] = {}


def has_out(xp: ModuleType) -> bool:
    """Whether the namespace's ufuncs and matmul accept `out=` (numpy and CuPy do).

    Asked a few dozen times per step, so the answer is cached per namespace.
    """
    try:
        return _HAS_OUT[xp]
    except KeyError:
        return _HAS_OUT.setdefault(xp, xp.__name__.split(".")[0] in ("numpy", "cupy"))


def matmul(xp: ModuleType, a: Array, b: Array, out: Array) -> Array:
    if has_out(xp):
        return xp.matmul(a, b, out=out)
    out[...] = xp.matmul(a, b)
    return out


def add_row(xp: ModuleType, a: Array, row: Array) -> Array:
    """a += row, broadcast over the rows of a (the bias add)."""
    a += row
    return a


def sigmoid_(xp: ModuleType, z: Array) -> Array:
    """In place: z <- 1 / (1 + exp(-z)), as 0.5 * tanh(z / 2) + 0.5.

    The tanh form never overflows (exp(-z) does for z < -88 in float32), and tanh is
    vectorised in numpy, so it costs no more passes over memory than the exp form.
    """
    z *= 0.5
    if has_out(xp):
        xp.tanh(z, out=z)
    else:
        z[...] = xp.tanh(z)
    z *= 0.5
    z += 0.5
    return z


def sigmoid_grad_mul_(xp: ModuleType, d: Array, a: Array, scratch: Array) -> Array:
    """In place: d <- d * a * (1 - a), the chain rule through a sigmoid whose output is a."""
    if has_out(xp):
        xp.subtract(1, a, out=scratch)
    else:
        scratch[...] = 1 - a
    d *= a
    d *= scratch
    return d


def sigmoid_delta_(xp: ModuleType, a: Array, g: Array) -> Array:
    """In place: a <- g * a * (1 - a), the chain rule through a sigmoid whose output was a.

    The result replaces the activations (backward_sum needs them no more), and g, the
    incoming gradient, is used as scratch: three passes and no buffer of its own.
    """
    if has_out(xp):
        g *= a
        xp.subtract(1, a, out=a)
        a *= g
    else:
        a[...] = g * a * (1 - a)
    return a


def subtract(xp: ModuleType, a: Array, b: Array, out: Array) -> Array:
    if has_out(xp):
        return xp.subtract(a, b, out=out)
    out[...] = a - b
    return out


def sum_rows(xp: ModuleType, a: Array, ones: Array, out: Array) -> Array:
    """out <- sum over rows of a, as ones @ a: a BLAS gemv, faster than a reduction."""
    return matmul(xp, ones, a, out)


def axpy_(xp: ModuleType, alpha: float, x: Array, y: Array) -> Array:
    """In place: y <- y + alpha * x, for 1-D x and y (the parameter update). x may be overwritten.

    On numpy this is BLAS axpy: one pass that reads x and updates y, where `x *= alpha;
    y += x` makes two passes over buffers too large for the cache. Other namespaces with
    `out=` scale x in place and add it (no temporary); the rest evaluate the expression.
    """
    if xp.__name__ == "numpy" and y.dtype == x.dtype and y.dtype.char in "fd":
        out = _blas_axpy(y.dtype)(x, y, a=alpha)  # in place when y is contiguous
        if out is not y:  # a strided y was copied: write the result back
            y[...] = out
    elif has_out(xp):
        xp.multiply(x, alpha, out=x)
        xp.add(y, x, out=y)
    else:
        y += alpha * x
    return y


_AXPY: dict[Any, Any] = {}


def _blas_axpy(dtype: Any) -> Any:
    if dtype not in _AXPY:
        from scipy.linalg.blas import get_blas_funcs  # scipy is a dependency; imported when first needed

        _AXPY[dtype] = get_blas_funcs("axpy", dtype=dtype)
    return _AXPY[dtype]


def sum_squares(xp: ModuleType, a: Array) -> Array:
    """sum(a * a) as a 0-d array on the device; no host sync here."""
    flat = xp.reshape(a, (-1,))
    return xp.vecdot(flat, flat) if hasattr(xp, "vecdot") else xp.dot(flat, flat)
