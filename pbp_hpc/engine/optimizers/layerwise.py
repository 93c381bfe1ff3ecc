"""Layer-wise adaptive rates for large batches: LARS and LAMB, in the flat buffers.

Each parameter tensor (a layer's weights; its biases) is a group. A weight group's update is
scaled by a trust ratio ||w|| / ||update|| computed over the whole group; biases are left out of
the ratio and of the weight decay (`optimizer.exclude_biases`, the papers' practice), and take
the plain update.

    LARS (You, Gitman & Ginsburg 2017, Algorithm 1), g the minibatch's mean gradient:
        trust = eta ||w|| / (||g|| + wd ||w|| + eps)        (1 where ||w|| or ||g|| is 0)
        v <- mu v + lr * trust * (g + wd w);   w <- w - v

    LAMB (You et al. 2019, Algorithm 2), step t from 1:
        m <- b1 m + (1 - b1) g;   s <- b2 s + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps) + wd w
        w <- w - lr * (||w|| / ||u||) * u                    (ratio 1 where a norm is 0)

eta is `optimizer.trust_coefficient`, mu `optimizer.momentum`, b1/b2 `optimizer.betas`, eps
`optimizer.eps`, wd `optimizer.weight_decay`. The state (LARS "velocity"; LAMB "exp_avg",
"exp_avg_sq" and the step count "lamb_step") is checkpointed.

A step runs in two phases over the spans this rank updates (apply_all): first every span's
contribution to each group's squared norms, then, once the norms are whole, the update. Where
the spans are slices of the node's one copy of the parameters (shm, shared_batch) a group is
split across the node's ranks, so between the phases `node_sum` (the reducer's) adds the
ranks' partial squared norms: one Allreduce of 2 x groups float64 per step, counted in the
run's record. Per span, the mean gradient and the update are formed in two scratch buffers
made on the span's first step, so a step allocates no array.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from pbp_hpc.engine import ops
from pbp_hpc.engine.model import Layout
from pbp_hpc.engine.optimizers.base import Optimizer


def groups(cfg: Any) -> list[tuple[int, int, bool]]:
    """(start, stop, adapt) per parameter tensor in flat order; adapt: trust ratio and decay."""
    layout, keep = Layout(cfg.model.layers), not cfg.optimizer.exclude_biases
    out = []
    for w, b in zip(layout.w_slices, layout.b_slices):
        out += [(w.start, w.stop, True), (b.start, b.stop, keep)]
    return out


class _Segment:
    """One group's part of one span: views made once."""

    __slots__ = ("group", "adapt", "theta", "g", "u", "state")

    def __init__(self, group: int, adapt: bool, theta: Any, g: Any, u: Any, state: list[Any]):
        self.group, self.adapt, self.theta, self.g, self.u, self.state = group, adapt, theta, g, u, state


class LayerWise(Optimizer):
    """What LARS and LAMB share: groups, per-span scratch, the two-phase step."""

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        super().__init__(cfg, theta, state_buffer, xp)
        o = cfg.optimizer
        self.eps, self.groups = o.eps, groups(cfg)
        if self.groups[-1][1] != theta.shape[0]:
            raise ValueError(f"optimizer {self.name}: model.layers gives {self.groups[-1][1]} parameters, "
                             f"the buffer holds {theta.shape[0]}")
        self.buffers = [state_buffer() for _ in self.state_names]
        self.norms = np.zeros((len(self.groups), 2), dtype=np.float64)  # per group: ||w||^2, ||update||^2
        self.ratios = np.ones(len(self.groups), dtype=np.float64)
        self._spans: dict[tuple[int, ...], tuple[Any, list[Any], list[_Segment]]] = {}

    def _span(self, span: slice, parts: list[Any]) -> tuple[Any, list[Any], list[_Segment]]:
        key = (span.start, span.stop, *map(id, parts))
        got = self._spans.get(key)
        if got is None:
            n = span.stop - span.start
            g = self.xp.empty((n,), dtype=self.theta.dtype)
            u = self.xp.empty((n,), dtype=self.theta.dtype)
            segs = []
            for k, (lo, hi, adapt) in enumerate(self.groups):
                a, b = max(lo, span.start), min(hi, span.stop)
                if a < b:
                    i, j = a - span.start, b - span.start
                    segs.append(_Segment(k, adapt, self.theta[a:b], g[i:j], u[i:j], [s[a:b] for s in self.buffers]))
            got = self._spans[key] = (g, list(parts), segs)
        return got

    def apply(self, span: slice, parts: list[Any], lr: float, batch: int) -> None:
        self.apply_all([(span, parts)], lr, batch)

    def apply_all(self, shares: list[tuple[slice, list[Any]]], lr: float, batch: int) -> None:
        self.begin()
        self.norms[...] = 0.0
        spans = [self._span(span, parts) for span, parts in shares]
        for g, parts, segs in spans:
            g[...] = parts[0]
            for p in parts[1:]:
                ops.axpy_(self.xp, 1.0, p, g)
            ops.scale_(self.xp, 1.0 / batch, g)  # the mean gradient
            for seg in segs:
                self.prepare(seg)
                if seg.adapt:
                    self.norms[seg.group, 0] += float(ops.sum_squares(self.xp, seg.theta))
                    self.norms[seg.group, 1] += float(ops.sum_squares(self.xp, self.update_of(seg)))
        if self.node_sum is not None:
            self.node_sum(self.norms)  # the other slices' parts of each group's norms
        for k, (lo, hi, adapt) in enumerate(self.groups):
            self.ratios[k] = self.ratio(math.sqrt(self.norms[k, 0]), math.sqrt(self.norms[k, 1])) if adapt else 1.0
        for _, _, segs in spans:
            for seg in segs:
                self.finish(seg, lr, float(self.ratios[seg.group]))

    # -- what each optimizer writes -------------------------------------------------------------
    def begin(self) -> None:
        """Once per step, before the spans."""

    def prepare(self, seg: _Segment) -> None:
        """Phase 1 for a segment whose mean gradient is in seg.g."""
        raise NotImplementedError

    def update_of(self, seg: _Segment) -> Any:
        """The vector whose norm is the ratio's denominator (after prepare)."""
        raise NotImplementedError

    def ratio(self, w_norm: float, u_norm: float) -> float:
        raise NotImplementedError

    def finish(self, seg: _Segment, lr: float, ratio: float) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return dict(zip(self.state_names, self.buffers))


class LARS(LayerWise):
    name = "lars"
    state_names = ("velocity",)

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        super().__init__(cfg, theta, state_buffer, xp)
        self.mu, self.eta = cfg.optimizer.momentum, cfg.optimizer.trust_coefficient

    def prepare(self, seg: _Segment) -> None:
        pass  # the norms are of w and g themselves

    def update_of(self, seg: _Segment) -> Any:
        return seg.g

    def ratio(self, w_norm: float, g_norm: float) -> float:
        if w_norm == 0.0 or g_norm == 0.0:
            return 1.0
        return self.eta * w_norm / (g_norm + self.weight_decay * w_norm + self.eps)

    def finish(self, seg: _Segment, lr: float, ratio: float) -> None:
        xp, v = self.xp, seg.state[0]
        if seg.adapt and self.weight_decay:
            ops.axpy_(xp, self.weight_decay, seg.theta, seg.g)  # g + wd w
        ops.scale_(xp, self.mu, v)
        ops.axpy_(xp, lr * ratio, seg.g, v)
        ops.axpy_(xp, -1.0, v, seg.theta)


class LAMB(LayerWise):
    name = "lamb"
    state_names = ("exp_avg", "exp_avg_sq")  # parameter-shaped; the step count is an array of its own

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        super().__init__(cfg, theta, state_buffer, xp)
        self.b1, self.b2 = cfg.optimizer.betas
        self.t = np.zeros(1, dtype=np.float64)  # steps taken (a checkpointed array: the bias correction needs it)
        self.c1 = self.c2 = 1.0

    def begin(self) -> None:
        self.t[0] += 1.0
        t = float(self.t[0])
        self.c1, self.c2 = 1.0 - self.b1 ** t, 1.0 - self.b2 ** t

    def prepare(self, seg: _Segment) -> None:
        xp, (m, s), g, u = self.xp, seg.state, seg.g, seg.u
        ops.scale_(xp, self.b1, m)
        ops.axpy_(xp, 1.0 - self.b1, g, m)
        xp.multiply(g, g, out=u)
        ops.scale_(xp, self.b2, s)
        ops.axpy_(xp, 1.0 - self.b2, u, s)
        xp.sqrt(s, out=u)
        ops.scale_(xp, 1.0 / math.sqrt(self.c2), u)
        u += self.eps
        xp.divide(m, u, out=u)
        ops.scale_(xp, 1.0 / self.c1, u)  # the Adam direction
        if seg.adapt and self.weight_decay:
            ops.axpy_(xp, self.weight_decay, seg.theta, u)

    def update_of(self, seg: _Segment) -> Any:
        return seg.u

    def ratio(self, w_norm: float, u_norm: float) -> float:
        return 1.0 if w_norm == 0.0 or u_norm == 0.0 else w_norm / u_norm

    def finish(self, seg: _Segment, lr: float, ratio: float) -> None:
        ops.axpy_(self.xp, -lr * ratio, seg.u, seg.theta)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "lamb_step": self.t}
