"""The hidden activations `model.activation` names, each defined once, here.

Per activation, two in-place kernels on any array namespace (see ops.has_out):

    forward_(xp, z)     z <- f(z): a layer's preactivations become its activations
    delta_(xp, a, g)    a <- g * f'(z), from the activations a = f(z): the chain rule through
                        the layer. The delta replaces the activations (backward_sum needs them
                        no more) and g, the incoming gradient, may be used as scratch: no
                        buffer of its own

and a fused fast form beside the plain one, where the GEMM can do part of the work: the layer
computes pre_scale * (a W + b) (the scale in the GEMM's alpha, free) and then fast_forward_.
Only sigmoid has one: pre_scale 0.5 and sigmoid(z) = 0.5 tanh(z / 2) + 0.5 where numpy's tanh
is vectorised (AVX-512), else pre_scale -1 and 1 / (1 + exp(-z)) (see SIGMOID_BY_TANH); its
plain forward_ is the test oracle of that fast path. For the others the
fast form is the plain one.

    sigmoid  f = 1 / (1 + exp(-z)), computed as 0.5 tanh(z / 2) + 0.5   f' = a (1 - a)
    tanh     f = tanh(z)                                                f' = 1 - a^2
    relu     f = max(z, 0)                                              f' = 1 if a > 0 else 0

relu's derivative at exactly z = 0 is taken as 0, PyTorch's choice (its ReLU backward passes
the gradient where the output is > 0), so pbp_hpc and the framework runner agree there too.

torch_name: the torch.nn module of the same function, for pbp_hpc.framework. To add an
activation: a subclass below, an entry in ACTIVATIONS, and its name in config.ModelConfig.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from pbp_hpc.engine import ops

Array = Any


def tanh_sigmoid_(xp: ModuleType, z: Array) -> Array:
    """In place: z <- 0.5 * tanh(z) + 0.5, which is sigmoid(2 z): the sigmoid of an input already halved.

    The tanh form never overflows (exp(-z) does for z < -88 in float32), and the halving is
    folded into the GEMM's alpha by the caller, so this is one vectorised pass plus two cheap ones.
    """
    if ops.has_out(xp):
        xp.tanh(z, out=z)
    else:
        z[...] = xp.tanh(z)
    z *= 0.5
    z += 0.5
    return z


def sigmoid_delta_(xp: ModuleType, a: Array, g: Array) -> Array:
    """In place: a <- g * a * (1 - a), the chain rule through a sigmoid whose output was a.

    g, the incoming gradient, is used as scratch: three passes and no buffer of its own.
    """
    if ops.has_out(xp):
        g *= a
        xp.subtract(1, a, out=a)
        a *= g
    else:
        a[...] = g * a * (1 - a)
    return a


def tanh_(xp: ModuleType, z: Array) -> Array:
    """In place: z <- tanh(z)."""
    if ops.has_out(xp):
        xp.tanh(z, out=z)
    else:
        z[...] = xp.tanh(z)
    return z


def tanh_delta_(xp: ModuleType, a: Array, g: Array) -> Array:
    """In place: a <- g * (1 - a * a), the chain rule through a tanh whose output was a."""
    if ops.has_out(xp):
        xp.multiply(a, a, out=a)
        xp.subtract(1, a, out=a)
        a *= g
    else:
        a[...] = g * (1 - a * a)
    return a


def relu_(xp: ModuleType, z: Array) -> Array:
    """In place: z <- max(z, 0). A NaN stays a NaN (a diverged run must still show).

    Against a row of zeros, not the scalar 0: numpy's maximum takes a scalar (a stride-0
    operand) through a slow loop, 50 us for 128 x 1024 float32 against 21 with a zero row
    broadcast down the rows (numpy 2.4, AVX-512, measured 2026-12-06); the row is made once.
    """
    if ops.has_out(xp):
        xp.maximum(z, _zero_row(xp, z), out=z)
    else:
        z[...] = xp.maximum(z, 0.0)
    return z


_ZERO_ROWS: dict[tuple[Any, ...], Array] = {}


def _zero_row(xp: ModuleType, z: Array) -> Array:
    """A row of zeros as wide as z's last axis, shaped to broadcast over z (1 x width for a
    batch), of z's dtype: read only, made once per namespace, dtype and shape."""
    shape = (1,) * (z.ndim - 1) + tuple(z.shape[-1:])
    key = (xp, z.dtype, shape)
    row = _ZERO_ROWS.get(key)
    if row is None:
        row = _ZERO_ROWS[key] = xp.zeros(shape, dtype=z.dtype)
    return row


def relu_delta_(xp: ModuleType, a: Array, g: Array) -> Array:
    """In place: a <- g where a > 0, else 0: the chain rule through a relu whose output was a.

    a >= 0, so (a > 0) is the derivative itself (1 above 0, 0 at 0), written as 1.0/0.0 into a
    in one pass and no mask (a comparison is a fast SIMD loop; np.sign is not).
    """
    if ops.has_out(xp):
        xp.greater(a, 0, out=a, casting="unsafe")
        a *= g
    else:
        a[...] = g * xp.sign(a)
    return a


class Activation:
    name: ClassVar[str] = ""
    torch_name: ClassVar[str] = ""  # torch.nn.<torch_name>() computes the same function
    pre_scale: ClassVar[float] = 1.0  # fast form: the GEMM's alpha before fast_forward_

    def forward_(self, xp: ModuleType, z: Array) -> Array:
        raise NotImplementedError

    def fast_forward_(self, xp: ModuleType, z: Array) -> Array:
        """f(z / pre_scale), in place, for z already scaled by pre_scale in the layer's GEMM."""
        return self.forward_(xp, z)

    def delta_(self, xp: ModuleType, a: Array, g: Array) -> Array:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<activation {self.name}>"


def exp_sigmoid_(xp: ModuleType, z: Array) -> Array:
    """In place: z <- 1 / (1 + exp(z)), which is sigmoid(-z): the sigmoid of an input already negated.

    exp overflows to inf for z > 88 in float32, and 1 / (1 + inf) is the right limit, 0: the
    warning numpy would print for it is silenced. Three passes, the negation free in the GEMM.
    """
    if ops.has_out(xp):
        with np.errstate(over="ignore"):
            xp.exp(z, out=z)
        z += 1
        xp.reciprocal(z, out=z)
    else:
        z[...] = 1 / (1 + xp.exp(z))
    return z


def _numpy_has(feature: str) -> bool:
    try:  # numpy's own record of the CPU features its kernels were dispatched for (private, stable since 1.20)
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return True
    return bool(__cpu_features__.get(feature, False))


# Which fast form sigmoid takes. numpy's float32 tanh is vectorised only on AVX-512 (SKX and
# later); elsewhere it is a scalar loop, while exp is vectorised on AVX2 as well. Measured on
# an AVX2 machine (2026-11-29, 128 x 1024 float32, in place): the tanh form 0.54 ms, the exp
# form 0.33. The two agree to 1.2e-7 (float32 rounding); a machine keeps one form for good.
SIGMOID_BY_TANH = _numpy_has("AVX512_SKX")


class Sigmoid(Activation):
    name, torch_name = "sigmoid", "Sigmoid"
    # the GEMM's alpha: halve for 0.5 tanh(z / 2) + 0.5, negate for 1 / (1 + exp(-z))
    pre_scale = 0.5 if SIGMOID_BY_TANH else -1.0

    def forward_(self, xp: ModuleType, z: Array) -> Array:
        """The plain form (the fast form's oracle, and the per-example code's): the halving here."""
        z *= 0.5
        tanh_(xp, z)
        z *= 0.5
        z += 0.5
        return z

    def fast_forward_(self, xp: ModuleType, z: Array) -> Array:
        return tanh_sigmoid_(xp, z) if SIGMOID_BY_TANH else exp_sigmoid_(xp, z)

    def delta_(self, xp: ModuleType, a: Array, g: Array) -> Array:
        return sigmoid_delta_(xp, a, g)


class Tanh(Activation):
    name, torch_name = "tanh", "Tanh"

    def forward_(self, xp: ModuleType, z: Array) -> Array:
        return tanh_(xp, z)

    def delta_(self, xp: ModuleType, a: Array, g: Array) -> Array:
        return tanh_delta_(xp, a, g)


class ReLU(Activation):
    name, torch_name = "relu", "ReLU"

    def forward_(self, xp: ModuleType, z: Array) -> Array:
        return relu_(xp, z)

    def delta_(self, xp: ModuleType, a: Array, g: Array) -> Array:
        return relu_delta_(xp, a, g)


SIGMOID = Sigmoid()
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (SIGMOID, Tanh(), ReLU())}


def names() -> list[str]:
    return list(ACTIVATIONS)


def get(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None
