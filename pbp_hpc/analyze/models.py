"""The alpha-beta model applied to the measured points: choosing alpha and beta, and the rows
of the model's tables (predicted speedups, and predictions against the measurements).

The model itself (the Allreduce time, the epoch time, the fit) is pbp_hpc.analyze.perfmodel,
which knows nothing of run records; this module connects the two.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.points import Case, Point, find
from pbp_hpc.analyze.scaling import MPI_IMPLEMENTATIONS, SERIAL_COUNTERPART


def allreduce_samples(points: list[Point], between_nodes: Optional[bool] = None) -> list[tuple[int, int, float]]:
    """(P, bytes, seconds per Allreduce) from every multi-rank point with a blocking reducer that
    was not oversubscribed (its Allreduce time is mostly waiting for a descheduled rank); only
    those inside one node (between_nodes False) or spanning nodes (True), if given."""
    return [(p.ranks, p.gradient_bytes, p.allreduce_per_step_s) for p in points
            if p.ranks > 1 and p.gradient_bytes and p.allreduce_per_step_s and not p.oversubscribed
            and (between_nodes is None or _spans_nodes(p) == between_nodes)]


def _spans_nodes(p: Point) -> bool:
    return p.ranks_per_node is not None and p.ranks_per_node < p.ranks


def probe_samples(records: list[dict[str, Any]]) -> tuple[list[tuple[int, int, float]], str, int]:
    """(P, bytes, seconds) from the sweeps' own network measurements (record["interconnect"],
    pbp_hpc.parallel.netprobe), each measurement once: between nodes where one spanned nodes,
    else the whole world; (samples, which level, oversubscribed measurements left out)."""
    seen, found, over = set(), [], 0
    for rec in records:
        m = rec.get("interconnect")
        if not isinstance(m, dict) or not isinstance(m.get("samples"), list):
            continue
        key = (m.get("measured_at"), tuple(m.get("hosts") or ()), m.get("ranks"))
        if key in seen:
            continue
        seen.add(key)
        if m.get("oversubscribed"):
            over += 1
            continue
        found += [s for s in m["samples"] if isinstance(s, dict)]
    level = "inter_node" if any(s.get("level") == "inter_node" for s in found) else "world"
    rows = [(int(s["ranks"]), int(s["bytes"]), float(s["seconds"])) for s in found if s.get("level") == level]
    return rows, ("between nodes" if level == "inter_node" else "inside one node" if rows and all(
        s.get("nodes", 1) == 1 for s in found) else "all ranks"), over


def choose_alpha_beta(points: list[Point], path: Optional[str] = None, alpha: Optional[float] = None,
                      beta: Optional[float] = None, records: Optional[list[dict[str, Any]]] = None) -> perfmodel.AlphaBeta:
    """Flags beat a file, a file beats the sweep's own network measurements, those beat the fit
    to these runs' Allreduce times, the fit beats the defaults.

    Runs inside one node and runs across nodes are fitted apart (their networks differ); the
    model uses the between-nodes fit when there are such runs, as that is what more ranks need."""
    probed, level, over_probes = probe_samples(records or [])
    if path:
        ab = perfmodel.load_alpha_beta(path)
    elif probed:
        ab = perfmodel.fit_alpha_beta(*zip(*probed))
        ab = replace(ab, source=f"measured by the sweep, {level}: {ab.source.replace('Allreduce times', 'probe Allreduce times')}")
        if over_probes:
            ab = replace(ab, flags=ab.flags + (f"{over_probes} oversubscribed network measurement(s) left out",))
    else:
        across = allreduce_samples(points, between_nodes=True)
        samples = across or allreduce_samples(points, between_nodes=False)
        ab = perfmodel.fit_alpha_beta(*zip(*samples)) if samples else perfmodel.fit_alpha_beta([], [], [])
        if samples:
            ab = replace(ab, source=f"{'between nodes' if across else 'inside one node'}: {ab.source}")
        over = sum(1 for p in points if p.ranks > 1 and p.allreduce_per_step_s and p.oversubscribed)
        if over:
            ab = replace(ab, flags=ab.flags + (f"{over} oversubscribed point(s) left out of the fit: their Allreduce "
                                               "times are mostly waits for a rank without a core",))
    if alpha is not None or beta is not None:
        ab = _given(ab, alpha, beta)
    return ab


def _given(ab: perfmodel.AlphaBeta, alpha: Optional[float], beta: Optional[float]) -> perfmodel.AlphaBeta:
    """ab with alpha and/or beta replaced by exact given values; what the other one keeps of the
    fit (its range, its flags) stays."""
    given = " and ".join(n for n, v in (("alpha", alpha), ("beta", beta)) if v is not None)
    kept = [n for n, v in (("alpha", alpha), ("beta", beta)) if v is None]
    exact = lambda v, rng: (v, v) if v is not None else rng  # noqa: E731
    ranges = (exact(alpha, ab.alpha_range), exact(beta, ab.beta_range))
    return perfmodel.AlphaBeta(ab.alpha_s if alpha is None else alpha, ab.beta_s_per_byte if beta is None else beta,
                               f"{given} from the command line; otherwise {ab.source}",
                               tuple(f for f in ab.flags if any(f.startswith(k) for k in kept)),
                               tuple(u for u in ab.undetermined if u in kept),
                               *(ranges if kept and None not in ranges else (None, None)))


@dataclass
class ModelSeries:
    """One (network, batch, implementation, threads) extrapolated from its 1-rank compute rate."""

    case: Case
    batch_size: int
    implementation: str
    threads: int
    base: Point  # where the compute rate comes from
    measured: list[Point] = field(default_factory=list)  # multi-rank points of the same series

    @property
    def label(self) -> str:
        return f"B={self.batch_size} {self.implementation} (T={self.threads})"


def model_series(points: list[Point]) -> list[ModelSeries]:
    """The series to extrapolate: every MPI implementation measured per (case, batch).

    Compute rate from the series' own 1-rank point, else (at 1 thread) from its serial
    counterpart. Where no MPI implementation was measured, pbp_hpc's MPI code (hybrid, one
    thread per rank) is modelled from blas-serial.
    """
    out = []
    by_case: dict[tuple[Case, int], list[Point]] = defaultdict(list)
    for p in points:
        by_case[(p.case, p.batch_size)].append(p)
    for (case, batch), pts in sorted(by_case.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        keys = sorted({(p.implementation, p.threads) for p in pts if p.implementation in MPI_IMPLEMENTATIONS}) or [("hybrid", 1)]
        for impl, threads in keys:
            base = find(points, case, batch, impl, 1, threads)
            if base is None and threads == 1:
                base = find(points, case, batch, SERIAL_COUNTERPART[impl], 1, 1)
            if base is None or not base.compute_per_example_s or not base.gradient_bytes:
                continue
            measured = [p for p in pts if p.implementation == impl and p.threads == threads and p.ranks > 1]
            out.append(ModelSeries(case, batch, impl, threads, base, sorted(measured, key=lambda p: p.ranks)))
    return out


def predict(s: ModelSeries, ranks: Any, ab: perfmodel.AlphaBeta) -> Any:
    """Predicted speedup over 1 rank at each P in ranks (a numpy array).

    N, which sets the steps (and so the Allreduces) per epoch, is the examples per epoch the
    base run measured; n_train where the record has no per-epoch count.
    """
    n = int(s.base.examples or s.case.n_train)
    return perfmodel.speedup(ranks, s.batch_size, n, s.base.compute_per_example_s, s.base.gradient_bytes, ab)


def projection(s: ModelSeries, ranks: Any, ab: perfmodel.AlphaBeta) -> tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(predicted speedup, its low end, its high end) at each P in ranks: the value is None where
    alpha or beta was not determined (only the range means anything then); the ends are None
    where the values have no range (given, or fitted without residual)."""
    center = None if ab.undetermined else predict(s, ranks, ab)
    if not ab.uncertain:
        return center, None, None
    fastest, slowest = ab.corners()
    return center, predict(s, ranks, slowest), predict(s, ranks, fastest)


def _best(grid: Any, sp: Optional[Any]) -> tuple[Optional[int], Optional[float]]:
    if sp is None:
        return None, None
    i = int(sp.argmax())
    return int(grid[i]), float(sp[i])


def model_rows(series: list[ModelSeries], ab: perfmodel.AlphaBeta, max_ranks: int = perfmodel.MAX_RANKS) -> list[dict[str, Any]]:
    """Per series: its inputs, the predicted speedup (and its range) at every power of two up to
    max_ranks, and the best P (at the value, and at either end of the range)."""
    grid = perfmodel.rank_grid(max_ranks)
    rows = []
    for s in series:
        sp, lo, hi = projection(s, grid, ab)
        (best, best_s), (best_lo, best_s_lo), (best_hi, best_s_hi) = _best(grid, sp), _best(grid, lo), _best(grid, hi)
        ar = None if ab.undetermined else float(perfmodel.allreduce_time(int(grid[-1]), s.base.gradient_bytes, ab)[0]) * 1e3
        row = {**asdict(s.case), "batch_size": s.batch_size, "implementation": s.implementation, "threads": s.threads,
               "compute_from": s.base.label, "compute_us_per_example": s.base.compute_per_example_s * 1e6,
               "gradient_mb": s.base.gradient_bytes / 1e6, "allreduce_ms_at_max": ar,
               "best_ranks": best, "best_speedup": best_s, "best_ranks_lo": best_lo, "best_speedup_lo": best_s_lo,
               "best_ranks_hi": best_hi, "best_speedup_hi": best_s_hi}
        for P, i in zip(grid, range(len(grid))):
            row[f"speedup_p{int(P)}"] = None if sp is None else float(sp[i])
            row[f"speedup_lo_p{int(P)}"] = None if lo is None else float(lo[i])
            row[f"speedup_hi_p{int(P)}"] = None if hi is None else float(hi[i])
        rows.append(row)
    return rows


def model_check_rows(series: list[ModelSeries], ab: perfmodel.AlphaBeta) -> list[dict[str, Any]]:
    """Measured against predicted (and its range), at the rank counts that were measured."""
    rows = []
    for s in series:
        for p in s.measured:
            sp, lo, hi = projection(s, p.ranks, ab)
            rows.append({**asdict(s.case), "batch_size": s.batch_size, "implementation": s.implementation, "threads": s.threads,
                         "ranks": p.ranks, "oversubscribed": p.oversubscribed, "measured_speedup": s.base.tpe_s / p.tpe_s,
                         "predicted_speedup": None if sp is None else float(sp[0]),
                         "predicted_speedup_lo": None if lo is None else float(lo[0]),
                         "predicted_speedup_hi": None if hi is None else float(hi[0]),
                         "measured_allreduce_ms": None if p.allreduce_per_step_s is None else p.allreduce_per_step_s * 1e3,
                         "predicted_allreduce_ms": None if ab.undetermined else
                         float(perfmodel.allreduce_time(p.ranks, s.base.gradient_bytes, ab)[0]) * 1e3})
    return rows
