"""The hidden activations `model.activation` names, each defined once, here.

Per activation, two in-place kernels on any array namespace (see ops.has_out):

    forward_(xp, z)     z <- f(z): a layer's preactivations become its activations
    delta_(xp, a, g)    a <- g * f'(z), from the activations a = f(z): the chain rule through
                        the layer. The delta replaces the activations (backward_sum needs them
                        no more) and g, the incoming gradient, may be used as scratch: no
                        buffer of its own

and a fused fast form beside the plain one, where the GEMM can do part of the work: the layer
computes pre_scale * (a W + b) (the scale in the GEMM's alpha, free) and then fast_forward_.
Only sigmoid has one (pre_scale 0.5: sigmoid(z) = 0.5 tanh(z / 2) + 0.5, the report's fast
path, unchanged); its plain forward_ is the test oracle of that fast path. For the others the
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
    """In place: z <- max(z, 0). A NaN stays a NaN (a diverged run must still show)."""
    if ops.has_out(xp):
        xp.maximum(z, 0, out=z)
    else:
        z[...] = xp.maximum(z, 0.0)
    return z


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


class Sigmoid(Activation):
    name, torch_name, pre_scale = "sigmoid", "Sigmoid", 0.5

    def forward_(self, xp: ModuleType, z: Array) -> Array:
        """The plain form (the fast form's oracle, and the per-example code's): the halving here."""
        z *= 0.5
        tanh_(xp, z)
        z *= 0.5
        z += 0.5
        return z

    def fast_forward_(self, xp: ModuleType, z: Array) -> Array:
        return tanh_sigmoid_(xp, z)

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
