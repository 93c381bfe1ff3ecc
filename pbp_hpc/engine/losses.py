"""The losses `model.loss` names, each defined once, here.

    mse            per example 0.5 * ||a_L - y||^2 (the report's); the output layer applies the
                   hidden activation, and the output delta is (a_L - y) * f'(z_L)
    cross_entropy  per example -sum_j y_j log softmax(z_L)_j; the output layer is linear (its
                   outputs z_L are the logits) and the output delta is softmax(z_L) - y

Per loss, on the n x k output of the network (`out`: activations for mse, logits for
cross_entropy) and the targets y, with two preallocated scratch buffers of the Workspace, err
(n x k) and row (n x 1):

    value_(xp, out, y, err, row)          the loss summed over the n examples, a 0-d array on
                                          the device (no host sync)
    delta_(xp, out, y, err, row, act)     then: out <- the output delta (dLoss/dz_L, summed
                                          form), in place; act is the hidden activation, or
                                          None where the output layer has none

delta_ must follow value_ on the same buffers: it uses what value_ left in err (mse: the
error a_L - y; cross_entropy: softmax(z_L)). Neither allocates on numpy or CuPy.

Cross-entropy is computed stably: each row is shifted by its maximum before exp (so exp never
overflows and the row sum is at least 1), and log softmax = (z - max) - log(sum exp(z - max))
is formed without taking the log of a probability, so it is finite even where the probability
underflows to 0. Targets may be any rows that sum to 1 (one-hot here).

Label smoothing (`model.label_smoothing` = e, Szegedy et al. 2016; PyTorch's label_smoothing):
the targets become (1 - e) y + e / k, so the loss is (1 - e) (-y . log p) + (e / k) (-sum log p)
and the output delta p - (1 - e) y - e / k; formed in the same buffers, no temporary.

torch_sum: PyTorch's form of the same summed loss, for pbp_hpc.framework. To add a loss: a
subclass below, an entry in LOSSES, and its name in config.ModelConfig.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar, Optional

from pbp_hpc.engine import ops

Array = Any


def log_softmax_(xp: ModuleType, z: Array, p: Array, row: Array) -> Array:
    """In place, row by row: z <- log softmax(z) and p <- softmax(z); row (n x 1) is scratch."""
    if ops.has_out(xp):
        xp.max(z, axis=-1, keepdims=True, out=row)
        z -= row  # every entry <= 0, the largest 0
        xp.exp(z, out=p)
        xp.sum(p, axis=-1, keepdims=True, out=row)  # >= 1
        p /= row
        xp.log(row, out=row)
    else:
        row[...] = xp.max(z, axis=-1, keepdims=True)
        z -= row
        p[...] = xp.exp(z)
        row[...] = xp.sum(p, axis=-1, keepdims=True)
        p /= row
        row[...] = xp.log(row)
    z -= row
    return z


class Loss:
    name: ClassVar[str] = ""
    output_activation: ClassVar[bool] = True  # whether the output layer applies the hidden activation
    min_outputs: ClassVar[int] = 1  # the smallest output layer the loss makes sense for

    def value_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array) -> Array:
        raise NotImplementedError

    def delta_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array, act: Optional[Any]) -> Array:
        raise NotImplementedError

    def torch_sum(self, torch: ModuleType, out: Any, y: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<loss {self.name}>"


class MSE(Loss):
    name = "mse"

    def value_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array) -> Array:
        ops.subtract(xp, out, y, out=err)
        return 0.5 * ops.sum_squares(xp, err)

    def delta_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array, act: Optional[Any]) -> Array:
        if act is None:  # a linear output layer: the delta is the error itself
            out[...] = err
            return out
        return act.delta_(xp, out, err)  # err is the activation's scratch from here on

    def torch_sum(self, torch: ModuleType, out: Any, y: Any) -> Any:
        return 0.5 * torch.nn.functional.mse_loss(out, y, reduction="sum")


class CrossEntropy(Loss):
    name, output_activation, min_outputs = "cross_entropy", False, 2

    def __init__(self, smoothing: float = 0.0):
        self.smoothing = smoothing

    def value_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array) -> Array:
        log_softmax_(xp, out, err, row)  # out: log p, err: p
        e = self.smoothing
        if not e:
            return -ops.inner(xp, y, out)
        return -(1.0 - e) * ops.inner(xp, y, out) - (e / out.shape[-1]) * xp.sum(out)

    def delta_(self, xp: ModuleType, out: Array, y: Array, err: Array, row: Array, act: Optional[Any]) -> Array:
        e = self.smoothing
        if not e:
            return ops.subtract(xp, err, y, out=out)  # softmax - y
        xp.multiply(y, 1.0 - e, out=out)  # the smoothed targets, then softmax minus them
        out += e / out.shape[-1]
        return ops.subtract(xp, err, out, out=out)

    def torch_sum(self, torch: ModuleType, out: Any, y: Any) -> Any:  # y: class probabilities (one-hot)
        return torch.nn.functional.cross_entropy(out, y, reduction="sum", label_smoothing=self.smoothing)


MSE_LOSS = MSE()
LOSSES: dict[str, Loss] = {f.name: f for f in (MSE_LOSS, CrossEntropy())}


def names() -> list[str]:
    return list(LOSSES)


def of(model_cfg: Any) -> Loss | str:
    """The loss a config's model section asks for: its name, or a smoothed cross-entropy."""
    if getattr(model_cfg, "label_smoothing", 0.0):
        return CrossEntropy(model_cfg.label_smoothing)
    return model_cfg.loss


def get(name: str | Loss) -> Loss:
    """The loss of that name (a Loss is returned as it is)."""
    if isinstance(name, Loss):
        return name
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
