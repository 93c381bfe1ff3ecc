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
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import nnls

# Used when the measurements cannot separate alpha from beta (fewer than two independent
# (P, n) combinations): typical of an InfiniBand EDR/HDR cluster with MPI, ~2 us per message
# and ~10 GB/s per link. Override with measured values (benchmarks/allreduce.py).
DEFAULT_ALPHA_S = 2e-6
DEFAULT_BETA_S_PER_BYTE = 1e-10

ASSUMPTIONS = (
    "constant per-core compute rate (time per example measured on 1 rank; small local batches are not slower per example)",
    "no overlap of computation and communication (blocking Allreduce after the backward pass)",
    "the same network and data as measured; the slowest rank computes ceil(B/P) examples per step",
    "Allreduce = Rabenseifner: 2 log2(P) alpha + 2 (P-1)/P n beta, reduction cost folded into beta",
    "alpha, beta fitted here on a single node (intra-node values) unless given with --alpha-beta/--alpha/--beta",
)

MAX_RANKS = 1024


@dataclass(frozen=True)
class AlphaBeta:
    alpha_s: float  # latency per message round, seconds
    beta_s_per_byte: float  # inverse bandwidth, seconds per byte
    source: str  # where the values came from, for tables and captions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        bw = 1.0 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else math.inf
        return f"alpha = {self.alpha_s * 1e6:.3g} us, beta = {self.beta_s_per_byte * 1e9:.3g} ns/B ({bw:.3g} GB/s), {self.source}"


DEFAULT = AlphaBeta(DEFAULT_ALPHA_S, DEFAULT_BETA_S_PER_BYTE, "defaults (typical InfiniBand cluster)")


def design(ranks: Sequence[float], n_bytes: Sequence[float]) -> np.ndarray:
    """The model's two columns: latency rounds 2 log2 P, and bytes moved 2 (P-1)/P n."""
    p = np.asarray(ranks, dtype=np.float64)
    n = np.asarray(n_bytes, dtype=np.float64)
    return np.column_stack([2.0 * np.log2(p), 2.0 * (p - 1.0) / p * n])


def allreduce_time(ranks: Any, n_bytes: Any, ab: AlphaBeta) -> np.ndarray:
    """Predicted seconds for one Allreduce of n_bytes over P ranks (0 at P = 1)."""
    cols = design(np.atleast_1d(ranks), np.broadcast_to(n_bytes, np.shape(np.atleast_1d(ranks))))
    return cols @ np.array([ab.alpha_s, ab.beta_s_per_byte])


def fit_alpha_beta(ranks: Iterable[float], n_bytes: Iterable[float], seconds: Iterable[float],
                   fallback: AlphaBeta = DEFAULT) -> AlphaBeta:
    """Least-squares alpha, beta >= 0 from measured Allreduce times; `fallback` when underdetermined.

    Residuals are relative (each row divided by its time), so 8-byte messages, which only
    the latency explains, weigh as much as 64 MiB ones, which the bandwidth dominates.
    Points at P = 1 carry no information (no communication) and are ignored.
    """
    p, n, t = (np.asarray(list(v), dtype=np.float64) for v in (ranks, n_bytes, seconds))
    keep = (p > 1) & (t > 0) & np.isfinite(t)
    p, n, t = p[keep], n[keep], t[keep]
    a = design(p, n) if p.size else np.zeros((0, 2))
    if p.size < 2 or np.linalg.matrix_rank(a) < 2:
        why = "no multi-rank Allreduce times" if p.size == 0 else f"{p.size} point(s) with {len(set(p.tolist()))} distinct P and {len(set(n.tolist()))} distinct n cannot separate alpha from beta"
        return AlphaBeta(fallback.alpha_s, fallback.beta_s_per_byte, f"{fallback.source}; {why}")
    scale = np.array([a[:, 0].max(), a[:, 1].max()])  # columns of ~1 and ~1e7: rescale for conditioning
    coef, _ = nnls(a / t[:, None] / scale, np.ones_like(t))
    alpha, beta = coef / scale
    return AlphaBeta(float(alpha), float(beta),
                     f"fitted to {p.size} Allreduce times (P in {sorted(set(int(x) for x in p))}, {len(set(n.tolist()))} message sizes)")


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
    """Read alpha_s and beta_s_per_byte from a benchmarks/allreduce.py JSON file."""
    import json

    from pbp_hpc.errors import ConfigError

    try:
        with open(path) as f:
            d = json.load(f)
        return AlphaBeta(float(d["alpha_s"]), float(d["beta_s_per_byte"]), f"measured, from {path}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read alpha/beta from {path} (expects keys alpha_s, beta_s_per_byte): {exc}") from None
