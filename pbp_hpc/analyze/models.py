"""The alpha-beta model applied to the measured points: choosing alpha and beta, and the rows
of the model's tables (predicted speedups, and predictions against the measurements).

The model itself (the Allreduce time, the epoch time, the fit) is pbp_hpc.analyze.perfmodel,
which knows nothing of run records; this module connects the two.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.points import Case, Point, find
from pbp_hpc.analyze.scaling import MPI_IMPLEMENTATIONS, SERIAL_COUNTERPART


def allreduce_samples(points: list[Point]) -> list[tuple[int, int, float]]:
    """(P, bytes, seconds per Allreduce) from every multi-rank point with a blocking reducer."""
    return [(p.ranks, p.gradient_bytes, p.allreduce_per_step_s) for p in points
            if p.ranks > 1 and p.gradient_bytes and p.allreduce_per_step_s]


def choose_alpha_beta(points: list[Point], path: Optional[str] = None, alpha: Optional[float] = None,
                      beta: Optional[float] = None) -> perfmodel.AlphaBeta:
    """Flags beat a file, a file beats the fit to these runs, the fit beats the defaults."""
    if path:
        ab = perfmodel.load_alpha_beta(path)
    else:
        samples = allreduce_samples(points)
        ab = perfmodel.fit_alpha_beta(*zip(*samples)) if samples else perfmodel.fit_alpha_beta([], [], [])
    if alpha is not None or beta is not None:
        given = " and ".join(n for n, v in (("alpha", alpha), ("beta", beta)) if v is not None)
        ab = perfmodel.AlphaBeta(ab.alpha_s if alpha is None else alpha, ab.beta_s_per_byte if beta is None else beta,
                                 f"{given} from the command line; otherwise {ab.source}")
    return ab


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


def model_rows(series: list[ModelSeries], ab: perfmodel.AlphaBeta, max_ranks: int = perfmodel.MAX_RANKS) -> list[dict[str, Any]]:
    """Per series: its inputs, the predicted speedup at every power of two up to max_ranks, and the best P."""
    grid = perfmodel.rank_grid(max_ranks)
    rows = []
    for s in series:
        sp = predict(s, grid, ab)
        best = int(sp.argmax())
        row = {**asdict(s.case), "batch_size": s.batch_size, "implementation": s.implementation, "threads": s.threads,
               "compute_from": s.base.label, "compute_us_per_example": s.base.compute_per_example_s * 1e6,
               "gradient_mb": s.base.gradient_bytes / 1e6,
               "allreduce_ms_at_max": float(perfmodel.allreduce_time(int(grid[-1]), s.base.gradient_bytes, ab)[0]) * 1e3,
               "best_ranks": int(grid[best]), "best_speedup": float(sp[best])}
        row.update({f"speedup_p{int(P)}": float(v) for P, v in zip(grid, sp)})
        rows.append(row)
    return rows


def model_check_rows(series: list[ModelSeries], ab: perfmodel.AlphaBeta) -> list[dict[str, Any]]:
    """Measured against predicted, at the rank counts that were measured."""
    rows = []
    for s in series:
        for p in s.measured:
            rows.append({**asdict(s.case), "batch_size": s.batch_size, "implementation": s.implementation, "threads": s.threads,
                         "ranks": p.ranks, "measured_speedup": s.base.tpe_s / p.tpe_s, "predicted_speedup": float(predict(s, p.ranks, ab)[0]),
                         "measured_allreduce_ms": None if p.allreduce_per_step_s is None else p.allreduce_per_step_s * 1e3,
                         "predicted_allreduce_ms": float(perfmodel.allreduce_time(p.ranks, s.base.gradient_bytes, ab)[0]) * 1e3})
    return rows
