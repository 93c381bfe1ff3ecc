"""A latency-bandwidth (alpha-beta) model of the gradient Allreduce, and the speedup it predicts.

Allreduce of n bytes over P ranks, per training step:

    T_ar(P, n) = 2 log2(P) alpha + 2 (P - 1) / P * n * beta

This is Rabenseifner's algorithm (Thakur, Rabenseifner & Gropp 2005): a reduce-scatter by
recursive halving then an allgather by recursive doubling. Each half takes log2(P) message
rounds (the latency term) and moves (P - 1) / P of the buffer (the bandwidth term, the same
as a ring's). MPICH, our MPI, selects it above MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE (2048
bytes) for a built-in operation, which is our case: the gradient buffers are megabytes. A ring would have
the same bandwidth term but 2 (P - 1) alpha, which at 1024 ranks is 100 times the latency.
The local reduction arithmetic (gamma in the literature) is folded into beta.

Time per epoch at P ranks with global batch B, N examples and S = ceil(N / B) steps:

    T(P) = S * (ceil(B / P) * c + T_ar(P, n))

where c is the compute time per example measured on one rank. Assumptions (printed with
every prediction, see ASSUMPTIONS): a constant per-core rate (c does not change with the
local batch, so GEMM efficiency lost at small local batches is not modelled), no overlap of
compute and communication, the same network as measured, and alpha and beta fitted on a
single node, so intra-node values unless measured values from a cluster are given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import nnls

from pbp_hpc.parallel import volumes

# Used, flagged as assumed, when there is no multi-rank Allreduce time at all: typical of an
# InfiniBand EDR/HDR cluster with MPI, ~2 us per message and ~10 GB/s per link (docs/analysis.md
# lists other interconnects). Override with measured values (benchmarks/allreduce.py).
DEFAULT_ALPHA_S = 2e-6
DEFAULT_BETA_S_PER_BYTE = 1e-10

ASSUMPTIONS = (
    "constant per-core compute rate (time per example measured on 1 rank; small local batches are not slower per example)",
    "no overlap of computation and communication (blocking Allreduce after the backward pass)",
    "the same network and data as measured; the slowest rank computes ceil(B/P) examples per step",
    "Allreduce = Rabenseifner: 2 log2(P) alpha + 2 (P-1)/P n beta, reduction cost folded into beta",
    "alpha, beta fitted to the sweep's own network measurement (pbp_hpc.parallel.netprobe: Allreduce at 8 B-8 MiB), else "
    "to these runs' Allreduce times (intra-node values when every run was on one node), unless given with "
    "--alpha-beta/--alpha/--beta",
    "the projection's range: alpha and beta at the ends of their ~95% ranges (+-2 s.e., taken as independent)",
)

MAX_RANKS = 1024


@dataclass(frozen=True)
class AlphaBeta:
    alpha_s: float  # latency per message round, seconds
    beta_s_per_byte: float  # inverse bandwidth, seconds per byte
    source: str  # where the values came from, for tables and captions
    # What the fit could not pin down, and why: shown wherever the values are.
    flags: tuple[str, ...] = ()
    # "alpha", "beta": parameters the measurements did not determine (value 0 at the bound, or
    # not distinguishable from 0); their value is then no estimate, only the range is.
    undetermined: tuple[str, ...] = ()
    # ~95% ranges (estimate +- 2 standard errors, at least 0; [0, the data's upper bound] for an
    # undetermined parameter); None where unknown (values given, or no residual to estimate it).
    alpha_range: Optional[tuple[float, float]] = None
    beta_range: Optional[tuple[float, float]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Both values with their ranges; an undetermined one as its range only, never as a number alone."""
        a = _describe_one("alpha", self.alpha_s * 1e6, self.alpha_range, 1e6, "us", "alpha" in self.undetermined)
        b = _describe_one("beta", self.beta_s_per_byte * 1e9, self.beta_range, 1e9, "ns/B", "beta" in self.undetermined)
        if "beta" not in self.undetermined and self.beta_s_per_byte > 0:
            b += f" ({1.0 / self.beta_s_per_byte / 1e9:.3g} GB/s)"
        flags = "".join(f"; FLAG: {f}" for f in self.flags)
        return f"{a}, {b}, {self.source}{flags}"

    @property
    def uncertain(self) -> bool:
        """True when a projection from these values has a range to show."""
        return self.alpha_range is not None and self.beta_range is not None

    def corners(self) -> tuple["AlphaBeta", "AlphaBeta"]:
        """(fastest, slowest) network the ranges allow: the Allreduce time grows with both alpha
        and beta, so the predicted speedup's range is its value at these two corners."""
        if not self.uncertain:
            return self, self
        assert self.alpha_range is not None and self.beta_range is not None
        lo = AlphaBeta(self.alpha_range[0], self.beta_range[0], f"{self.source} (lower ends)")
        hi = AlphaBeta(self.alpha_range[1], self.beta_range[1], f"{self.source} (upper ends)")
        return lo, hi


def _describe_one(name: str, value: float, rng: Optional[tuple[float, float]], scale: float, unit: str,
                  undetermined: bool) -> str:
    if undetermined:
        return f"{name} NOT DETERMINED" + (f" (0 to {rng[1] * scale:.3g} {unit})" if rng else "")
    spread = f" [{rng[0] * scale:.3g}-{rng[1] * scale:.3g}]" if rng else ""
    return f"{name} = {value:.3g}{spread} {unit}"


DEFAULT = AlphaBeta(DEFAULT_ALPHA_S, DEFAULT_BETA_S_PER_BYTE, "defaults (typical InfiniBand cluster)")


def design(ranks: Sequence[float], n_bytes: Sequence[float]) -> np.ndarray:
    """The model's two columns: latency rounds 2 log2 P, and bytes moved 2 (P-1)/P n."""
    return np.column_stack(volumes.allreduce_terms(ranks, n_bytes))


def allreduce_time(ranks: Any, n_bytes: Any, ab: AlphaBeta) -> np.ndarray:
    """Predicted seconds for one Allreduce of n_bytes over P ranks (0 at P = 1)."""
    cols = design(np.atleast_1d(ranks), np.broadcast_to(n_bytes, np.shape(np.atleast_1d(ranks))))
    return cols @ np.array([ab.alpha_s, ab.beta_s_per_byte])


def fit_alpha_beta(ranks: Iterable[float], n_bytes: Iterable[float], seconds: Iterable[float],
                   fallback: AlphaBeta = DEFAULT) -> AlphaBeta:
    """Least-squares alpha, beta >= 0 from measured Allreduce times, with ~95% ranges and flags.

    Residuals are relative (each row divided by its time), so 8-byte messages, which only
    the latency explains, weigh as much as 64 MiB ones, which the bandwidth dominates.
    Points at P = 1 carry no information (no communication) and are ignored.

    Honest about what the data cannot say: with fewer than two independent (P, n) rows the
    values are `fallback`'s, flagged; a parameter that the fit puts at 0, or whose range
    reaches 0 (estimate <= 2 standard errors), is listed in `undetermined` and flagged, and
    its range is [0, the largest value any one measured time allows].
    """
    p, n, t = (np.asarray(list(v), dtype=np.float64) for v in (ranks, n_bytes, seconds))
    keep = (p > 1) & (t > 0) & np.isfinite(t)
    p, n, t = p[keep], n[keep], t[keep]
    a = design(p, n) if p.size else np.zeros((0, 2))
    sizes, counts = sorted(set(n.tolist())), sorted(set(int(x) for x in p))
    if p.size == 0:
        return AlphaBeta(fallback.alpha_s, fallback.beta_s_per_byte, f"{fallback.source}; not fitted",
                         flags=("no multi-rank Allreduce times: the values are assumed, not measured",))
    if p.size < 2 or np.linalg.matrix_rank(a) < 2:
        upper = [float(np.min(t / a[:, k])) for k in (0, 1)]
        return AlphaBeta(0.0, 0.0, f"{p.size} Allreduce time(s), not fitted",
                         (f"{p.size} time(s) at {len(counts)} rank count(s) and {len(sizes)} message size(s) cannot separate "
                          f"alpha from beta: each may be anything from 0 to what the times allow alone "
                          f"(alpha {upper[0]:.3g} s, beta {upper[1]:.3g} s/B); measure several sizes (benchmarks/allreduce.py)",),
                         ("alpha", "beta"), (0.0, upper[0]), (0.0, upper[1]))
    w = a / t[:, None]  # relative residuals: each row scaled by its time
    scale = np.array([a[:, 0].max(), a[:, 1].max()])  # columns of ~1 and ~1e7: rescale for conditioning
    coef, _ = nnls(w / scale, np.ones_like(t))
    coef = coef / scale
    flags, undetermined = [], []
    if len(sizes) == 1:
        flags.append(f"one message size ({int(sizes[0])} B): alpha and beta are told apart only by how 2 log2(P) and "
                     f"2 (P-1)/P grow over P = {counts}, which barely differ; measure several sizes (benchmarks/allreduce.py)")
    se = _standard_errors(w / scale, coef * scale)
    se = None if se is None else se / scale
    if se is None:
        flags.append(f"{p.size} times for 2 parameters: no residual, so no uncertainty; measure more sizes or repetitions")
    ranges: list[Optional[tuple[float, float]]] = []
    for k, name in enumerate(("alpha", "beta")):
        if coef[k] <= 0 or (se is not None and coef[k] <= 2 * se[k]):
            undetermined.append(name)
            # Each time bounds the parameter (with the other at 0); noise can put the estimate's own
            # range above that bound, and the range must hold the estimate.
            upper = max(float(np.min(t / a[:, k])), float(coef[k] + 2 * se[k]) if se is not None else 0.0)
            how = "fitted to 0" if coef[k] <= 0 else f"{coef[k]:.3g} +- {se[k]:.2g} (1 s.e.) includes 0"  # type: ignore[index]
            flags.append(f"{name} not determined by these measurements ({how}); it may be anything from 0 to {upper:.3g}")
            ranges.append((0.0, upper))
        else:
            ranges.append(None if se is None else (max(0.0, float(coef[k] - 2 * se[k])), float(coef[k] + 2 * se[k])))
    return AlphaBeta(float(coef[0]), float(coef[1]),
                     f"fitted to {p.size} Allreduce times (P in {counts}, {len(sizes)} message size(s))",
                     tuple(flags), tuple(undetermined), ranges[0], ranges[1])


def _standard_errors(w: np.ndarray, coef: np.ndarray) -> Optional[np.ndarray]:
    """Standard errors of the relative least-squares fit (residual variance x (W'W)^-1); None
    without a residual degree of freedom."""
    dof = w.shape[0] - 2
    if dof < 1:
        return None
    resid = w @ coef - 1.0
    cov = float(resid @ resid) / dof * np.linalg.inv(w.T @ w)
    return np.sqrt(np.maximum(np.diag(cov), 0.0))


def epoch_time(ranks: Any, batch: int, n_examples: int, compute_per_example_s: float, n_bytes: float, ab: AlphaBeta) -> np.ndarray:
    """Predicted seconds per epoch at each P in ranks (see the module docstring)."""
    p = np.atleast_1d(np.asarray(ranks, dtype=np.float64))
    steps = math.ceil(n_examples / batch)
    local = np.ceil(batch / p)  # the slowest rank's share; ranks beyond B sit idle
    return steps * (local * compute_per_example_s + allreduce_time(p, n_bytes, ab))


def speedup(ranks: Any, batch: int, n_examples: int, compute_per_example_s: float, n_bytes: float, ab: AlphaBeta) -> np.ndarray:
    """Predicted T(1) / T(P)."""
    t1 = epoch_time(1, batch, n_examples, compute_per_example_s, n_bytes, ab)[0]
    return t1 / epoch_time(ranks, batch, n_examples, compute_per_example_s, n_bytes, ab)


def rank_grid(max_ranks: int = MAX_RANKS) -> np.ndarray:
    """Powers of two from 1 to max_ranks: where the model is evaluated and plotted."""
    return 2 ** np.arange(int(math.log2(max_ranks)) + 1)


def load_alpha_beta(path: str) -> AlphaBeta:
    """Read alpha_s and beta_s_per_byte (and the fit's flags and ranges, where given) from a
    benchmarks/allreduce.py JSON file: its top-level fit, the between-nodes one when it measured
    several nodes."""
    import json

    from pbp_hpc.errors import ConfigError

    try:
        with open(path) as f:
            d = json.load(f)
        rng = lambda key: tuple(float(x) for x in d[key]) if d.get(key) else None  # noqa: E731
        return AlphaBeta(float(d["alpha_s"]), float(d["beta_s_per_byte"]), f"measured, from {path}" +
                         (f" ({d['level']})" if d.get("level") else ""), tuple(str(f) for f in d.get("flags") or ()),
                         tuple(str(u) for u in d.get("undetermined") or ()), rng("alpha_range"), rng("beta_range"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read alpha/beta from {path} (expects keys alpha_s, beta_s_per_byte): {exc}") from None
