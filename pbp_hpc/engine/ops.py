"""Array kernels that write into preallocated buffers, on any array namespace.

numpy and CuPy take `out=` on every ufunc and on matmul, so the hot path allocates nothing.
The Array API standard has no `out=`, so on other namespaces (array_api_strict in the tests)
the same functions compute a result and copy it in. One code path either way: the model never
calls numpy directly, which is what lets the strict-namespace tests catch a numpy-only call.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

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


_recording: Optional[list[tuple[Any, ...]]] = None  # see recording_gemms


@contextlib.contextmanager
def recording_gemms() -> Iterator[list[tuple[Any, ...]]]:
    """Every gemm() and matmul() call made inside the block, as (a, b, out, alpha, beta).

    The benchmark replays a real step's products alone (its GEMM-only time). A flag read by
    the kernels themselves, not a patched module attribute, so it sees every caller however
    it imported them.
    """
    global _recording
    calls: list[tuple[Any, ...]] = []
    _recording = calls
    try:
        yield calls
    finally:
        _recording = None


def matmul(xp: ModuleType, a: Array, b: Array, out: Array) -> Array:
    if _recording is not None:
        _recording.append((a, b, out, 1.0, 0.0))
    return _matmul(xp, a, b, out)


def _matmul(xp: ModuleType, a: Array, b: Array, out: Array) -> Array:
    if has_out(xp):
        return xp.matmul(a, b, out=out)
    out[...] = xp.matmul(a, b)
    return out


def has_gemm(xp: ModuleType) -> bool:
    """Whether gemm() takes its fast path on xp: numpy, with its BLAS callable directly.

    Only then may callers use beta=1 (accumulate into `out`) without a temporary.
    """
    return xp.__name__ == "numpy" and _cblas.get() is not None


def gemm(xp: ModuleType, a: Array, b: Array, out: Array, alpha: float = 1.0, beta: float = 0.0) -> Array:
    """out <- alpha * (a @ b) + beta * out, for 2-D a, b, out (transposed views welcome).

    numpy's matmul has neither alpha nor beta, so scaling or accumulating costs an extra pass
    over `out`; BLAS does both inside the GEMM for free. On numpy whose BLAS is callable
    (has_gemm), this calls it directly; elsewhere it is matmul plus the passes.
    """
    if _recording is not None:
        _recording.append((a, b, out, alpha, beta))
    if alpha == 1.0 and beta == 0.0 and (out.shape[0] == 1 or out.shape[1] == 1) and xp.__name__ == "numpy":
        return xp.matmul(a, b, out=out)  # a matrix-vector product: numpy calls gemv itself, with less glue than ours
    if xp.__name__ == "numpy" and _cblas.gemm(a, b, out, alpha, beta):
        return out
    if beta == 0.0:
        _matmul(xp, a, b, out)
        if alpha != 1.0:
            out *= alpha
    else:  # a temporary: callers accumulate only where has_gemm(xp)
        out[...] = alpha * xp.matmul(a, b) + beta * out
    return out


def linear_(xp: ModuleType, a: Array, w: Array, b: Optional[Array], out: Array, scale: float = 1.0) -> Array:
    """out <- scale * (a @ w + b), the bias row broadcast over the rows.

    Fast path: out is first filled with b and the GEMM makes it scale * a @ w + scale * out
    (alpha = beta = scale): the bias costs a write where `out += b` costs a read and a write,
    and the scale costs nothing. A plain broadcast copy, not `multiply(b, scale, out=out)`:
    numpy takes a broadcast row times a scalar through a slow loop (27 us for 128 x 1024
    float32 against 8 for the copy, numpy 2.4). Scaling by a power of two is exact, so both
    paths agree bit for bit.
    b None: the bias is already in the product (a column of ones in a, the bias row in w).
    """
    if b is None:
        gemm(xp, a, w, out, alpha=scale)
        return out
    if has_gemm(xp):
        out[...] = b  # broadcast over the rows
        return gemm(xp, a, w, out, alpha=scale, beta=scale)
    matmul(xp, a, w, out)
    add_row(xp, out, b)
    if scale != 1.0:
        out *= scale
    return out


class _Cblas:
    """cblas_?gemm of the BLAS numpy itself uses, found through threadpoolctl and called by ctypes.

    Enabled only for a library exporting 64-bit-integer CBLAS symbols (numpy's wheels bundle
    scipy-openblas64, `scipy_cblas_sgemm64_`), and only after a self-test against matmul.
    The same library as np.matmul, so the same kernels, threads and thread limits.
    """

    SYMBOLS = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_", "cblas_{}gemm_64")
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self) -> None:
        self._fns: Optional[dict[str, Any]] = None
        self._tried = False

    def get(self) -> Optional[dict[str, Any]]:
        if not self._tried:
            self._tried = True
            try:
                self._fns = self._load()
            except (OSError, AttributeError, ImportError, ValueError, AssertionError):
                self._fns = None
        return self._fns

    def _load(self) -> Optional[dict[str, Any]]:
        import ctypes

        import numpy as np
        from threadpoolctl import threadpool_info

        root = str(Path(np.__file__).resolve().parent)  # numpy/ and numpy.libs/ share this prefix
        paths = [d["filepath"] for d in threadpool_info() if d.get("user_api") == "blas" and d["filepath"].startswith(root)]
        for path in paths:
            lib = ctypes.CDLL(path)
            for pattern in self.SYMBOLS:
                if not all(hasattr(lib, pattern.format(c)) for c in "sd"):
                    continue
                fns = {}
                i64, ptr, enum = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                for c, real in (("f", ctypes.c_float), ("d", ctypes.c_double)):
                    fn = getattr(lib, pattern.format("s" if c == "f" else "d"))
                    fn.argtypes = [enum, enum, enum, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
                    fn.restype = None
                    fns[c] = fn
                    axpy = getattr(lib, pattern.replace("gemm", "axpy").format("s" if c == "f" else "d"), None)
                    if axpy is not None:
                        axpy.argtypes = [i64, real, ptr, i64, ptr, i64]
                        axpy.restype = None
                        fns["axpy_" + c] = axpy
                    gemv = getattr(lib, pattern.replace("gemm", "gemv").format("s" if c == "f" else "d"), None)
                    ger = getattr(lib, pattern.replace("gemm", "ger").format("s" if c == "f" else "d"), None)
                    if gemv is not None and ger is not None:
                        gemv.argtypes = [enum, enum, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
                        ger.argtypes = [enum, i64, i64, real, ptr, i64, ptr, i64, ptr, i64]
                        gemv.restype = ger.restype = None
                        fns["gemv_" + c], fns["ger_" + c] = gemv, ger
                    axpby = getattr(lib, pattern.replace("gemm", "axpby").format("s" if c == "f" else "d"), None)
                    if axpby is not None:  # an OpenBLAS extension to CBLAS
                        axpby.argtypes = [i64, real, ptr, i64, real, ptr, i64]
                        axpby.restype = None
                        fns["axpby_" + c] = axpby
                self._fns = fns
                if self._self_test(np):
                    return fns
        return None

    def _self_test(self, np: Any) -> bool:
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64):
            a, b = rng.random((5, 7)).astype(dtype), rng.random((3, 7)).astype(dtype)
            c = rng.random((5, 3)).astype(dtype)
            want = 0.5 * (a @ b.T) + c
            if not self.gemm(a, b.T, c, 0.5, 1.0) or not np.allclose(c, want, rtol=1e-5):
                return False
            x, y = a[:, 0].copy(), a[:, 1].copy()
            want = y + 0.25 * x
            if "axpy_" + c.dtype.char in self._fns and (not self.axpy(0.25, x, y) or not np.allclose(y, want)):
                return False
            want = 0.25 * x + 0.75 * y
            if "axpby_" + c.dtype.char in self._fns and (not self.axpby(0.25, x, 0.75, y) or not np.allclose(y, want)):
                del self._fns["axpby_" + c.dtype.char]  # axpby_ then takes two passes; axpy stays
        return True

    def gemm(self, a: Any, b: Any, out: Any, alpha: float, beta: float) -> bool:
        """out <- alpha a b + beta out through BLAS; False (nothing done) if it cannot take these arrays."""
        fns = self._fns if self._tried else self.get()
        if fns is None or out.ndim != 2 or a.ndim != 2 or b.ndim != 2:
            return False
        c = out.dtype.char
        fn = fns.get(c)
        if fn is None or a.dtype.char != c or b.dtype.char != c:
            return False
        m, n = out.shape
        k = a.shape[1]
        if m == 0 or n == 0 or k == 0 or a.shape[0] != m or b.shape != (k, n):
            return False
        if (m == 1 or n == 1 or k == 1) and "gemv_" + c in fns and self._vector(fns, c, a, b, out, alpha, beta):
            return True
        to, ldc = self._operand(out, out.itemsize)
        ta, lda = self._operand(a, out.itemsize)
        tb, ldb = self._operand(b, out.itemsize)
        if to != self.NO_TRANS or ta == 0 or tb == 0:
            return False
        fn(self.ROW_MAJOR, ta, tb, m, n, k, alpha, _address(a), lda, _address(b), ldb, beta, _address(out), ldc)
        return True

    def _vector(self, fns: dict[str, Any], c: str, a: Any, b: Any, out: Any, alpha: float, beta: float) -> bool:
        """A product with one dimension of 1 as the matrix-vector (gemv) or rank-1 (ger) call it is:
        OpenBLAS's gemm does not forward these shapes, and at batch 1 (the report's stochastic GD)
        they cost 2-3x the level-2 call (26 us against 8 for 1 x 150 by 150 x 1024). False: not
        taken (strides a level-2 call cannot express), the caller uses gemm."""
        item = out.itemsize
        m, n = out.shape
        k = a.shape[1]
        (a0, a1), (b0, b1), (o0, o1) = a.strides, b.strides, out.strides
        if (a0 | a1 | b0 | b1 | o0 | o1) % item:  # (a stride that is not a whole element: not expressible)
            return False
        a0, a1, b0, b1, o0, o1 = a0 // item, a1 // item, b0 // item, b1 // item, o0 // item, o1 // item
        if m == 1 or n == 1:
            if m == 1:  # out row = alpha (b^T a row) + beta out row
                mat, x, inc_x, inc_y, rows, cols, r, q = b, a, a1, o1, k, n, b0, b1
            else:  # out column = alpha (a b column) + beta out column
                mat, x, inc_x, inc_y, rows, cols, r, q = a, b, b0, o0, m, k, a0, a1
            if inc_x <= 0 or inc_y <= 0:
                return False
            # mat is rows x cols with element strides (r, q): row-major if q == 1, else its transpose
            if q == 1 and r >= max(1, cols):
                trans, lead, (mr, mc) = (self.TRANS if m == 1 else self.NO_TRANS), r, (rows, cols)
            elif r == 1 and q >= max(1, rows):
                trans, lead, (mr, mc) = (self.NO_TRANS if m == 1 else self.TRANS), q, (cols, rows)
            else:
                return False
            fns["gemv_" + c](self.ROW_MAJOR, trans, mr, mc, alpha, _address(mat), lead, _address(x), inc_x, beta,
                             _address(out), inc_y)
            return True
        # k == 1: out = alpha (a column)(b row) + beta out, a rank-1 update of out (row-major, ldc)
        if a0 <= 0 or b1 <= 0 or o1 != 1 or o0 < n:
            return False
        if beta != 1.0:
            if beta == 0.0:
                out[...] = 0
            else:
                out *= beta
        fns["ger_" + c](self.ROW_MAJOR, m, n, alpha, _address(a), a0, _address(b), b1, _address(out), o0)
        return True

    def axpy(self, alpha: float, x: Any, y: Any) -> bool:
        """y <- y + alpha x through BLAS for 1-D x, y of one dtype; False (nothing done) otherwise."""
        fn = self._level1("axpy_", x, y)
        if fn is None:
            return False
        fn(y.shape[0], alpha, _address(x), x.strides[0] // x.itemsize, _address(y), y.strides[0] // y.itemsize)
        return True

    def axpby(self, alpha: float, x: Any, beta: float, y: Any) -> bool:
        """y <- alpha x + beta y through BLAS for 1-D x, y of one dtype; False (nothing done) otherwise."""
        fn = self._level1("axpby_", x, y)
        if fn is None:
            return False
        fn(y.shape[0], alpha, _address(x), x.strides[0] // x.itemsize, beta, _address(y), y.strides[0] // y.itemsize)
        return True

    def _level1(self, name: str, x: Any, y: Any) -> Any:
        """The BLAS level-1 routine `name` for 1-D x, y of one dtype and whole-element strides; None if it cannot take them."""
        fns = self._fns if self._tried else self.get()
        if fns is None or x.ndim != 1 or y.ndim != 1 or x.shape != y.shape or x.dtype != y.dtype:
            return None
        fn = fns.get(name + y.dtype.char)
        if fn is None or x.strides[0] % x.itemsize or y.strides[0] % y.itemsize or y.strides[0] == 0:
            return None
        return fn

    def _operand(self, x: Any, item: int) -> tuple[int, int]:
        """(transpose flag, leading dimension) of a row-major or transposed 2-D view; (0, 0) if neither.

        A dimension of length 1 may have any stride (numpy gives `v[None, :]` stride 0 there).
        """
        s0, s1 = x.strides
        rows, cols = x.shape
        if (s1 == item or cols == 1) and s0 % item == 0:
            ld = s0 // item if rows > 1 else cols
            if ld >= max(1, cols):
                return self.NO_TRANS, ld
        if (s0 == item or rows == 1) and s1 % item == 0:
            ld = s1 // item if cols > 1 else rows
            if ld >= max(1, rows):
                return self.TRANS, ld
        return 0, 0


def _address(a: Any) -> int:
    """The address of a's first element. (`a.ctypes.data` costs the same but leaves a reference
    cycle behind per call: garbage for the cyclic collector, and heap growth between its runs.)"""
    return a.__array_interface__["data"][0]


_cblas = _Cblas()


def add_row(xp: ModuleType, a: Array, row: Array) -> Array:
    """a += row, broadcast over the rows of a (the bias add)."""
    a += row
    return a


def subtract(xp: ModuleType, a: Array, b: Array, out: Array) -> Array:
    if has_out(xp):
        return xp.subtract(a, b, out=out)
    out[...] = a - b
    return out


def axpy_(xp: ModuleType, alpha: float, x: Array, y: Array) -> Array:
    """In place: y <- y + alpha * x, for 1-D x and y (the parameter update); x is left as it is.

    On numpy this is BLAS axpy, from the BLAS numpy itself uses (see _Cblas): one pass that
    reads x and updates y, where `x *= alpha; y += x` makes two passes over buffers too large
    for the cache. (Not scipy's axpy: scipy bundles a second OpenBLAS with a thread pool of its
    own, which a thread limit set before scipy is first imported does not reach.) On CuPy, one
    fused elementwise kernel. Elsewhere (numpy without a callable BLAS, Array API namespaces)
    the expression, with a temporary.
    """
    if xp.__name__ == "numpy" and _cblas.axpy(alpha, x, y):
        return y
    kernel = _axpy_kernel(xp)
    if kernel is not None:
        kernel(x, alpha, y)
        return y
    y += alpha * x
    return y


_AXPY_KERNELS: dict[ModuleType, Any] = {}


def _axpy_kernel(xp: ModuleType) -> Any:
    """CuPy's y += a * x as one kernel, made once; None where xp has no ElementwiseKernel."""
    if xp not in _AXPY_KERNELS:
        make = getattr(xp, "ElementwiseKernel", None)
        _AXPY_KERNELS[xp] = make("T x, T a", "T y", "y += a * x", "pbp_hpc_axpy") if make is not None else None
    return _AXPY_KERNELS[xp]


def axpby_(xp: ModuleType, alpha: float, x: Array, beta: float, y: Array) -> Array:
    """In place: y <- alpha * x + beta * y, for 1-D x and y; x is left as it is.

    On numpy, OpenBLAS's axpby: one pass where scale_ then axpy_ make two over buffers too
    large for the cache (the momentum update's velocity, every step). Elsewhere those two.
    """
    if xp.__name__ == "numpy" and _cblas.axpby(alpha, x, beta, y):
        return y
    scale_(xp, beta, y)
    return axpy_(xp, alpha, x, y)


def scale_(xp: ModuleType, alpha: float, y: Array) -> Array:
    """In place: y <- alpha * y."""
    y *= alpha
    return y


def sum_squares(xp: ModuleType, a: Array) -> Array:
    """sum(a * a) as a 0-d array on the device; no host sync here."""
    flat = xp.reshape(a, (-1,))
    return xp.vecdot(flat, flat) if hasattr(xp, "vecdot") else xp.dot(flat, flat)


def inner(xp: ModuleType, a: Array, b: Array) -> Array:
    """sum(a * b) over every entry, as a 0-d array on the device; no host sync here."""
    fa, fb = xp.reshape(a, (-1,)), xp.reshape(b, (-1,))
    return xp.vecdot(fa, fb) if hasattr(xp, "vecdot") else xp.dot(fa, fb)
