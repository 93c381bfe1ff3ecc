"""Speedup, parallel efficiency, and strong and weak scaling, derived from points.

Each function returns plain rows (dicts): the same rows feed the text tables, the CSV and
JSON output and the figures, so every view shows the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any, Callable, Optional

from pbp_hpc.analyze.points import Case, Point, find
from pbp_hpc.analyze.records import steps_per_epoch

# The report's speedup baselines: each implementation against the serial code it parallelises.
# The same-named ones (and framework) are compared with themselves at 1 rank x 1 thread.
SERIAL_COUNTERPART = {
    "naive-serial": "naive-serial",
    "example-parallel": "naive-serial",
    "blas-serial": "blas-serial",
    "blas-threaded": "blas-serial",
    "hybrid": "blas-serial",
    "gpu": "blas-serial",
    "framework": "framework",
}
MPI_IMPLEMENTATIONS = ("example-parallel", "hybrid")  # the ones the alpha-beta model extrapolates


# ---------------------------------------------------------------------------------------------
# Speedup against one core


def counterpart(points: list[Point], p: Point) -> Optional[Point]:
    """The serial run a point's speedup is measured against (the same network, data and batch)."""
    impl = SERIAL_COUNTERPART.get(p.implementation)
    return find(points, p.case, p.batch_size, impl, 1, 1) if impl else None


def fastest_serial(points: list[Point], case: Case, batch: int) -> Optional[Point]:
    """The quickest CPU run on one core (1 rank x 1 thread) for this network, data and batch."""
    serial = [q for q in points if q.case == case and q.batch_size == batch and q.cores == 1 and q.implementation != "gpu"]
    return min(serial, key=lambda q: q.tpe_s) if serial else None


def efficiency(speedup: Optional[float], p: Point) -> Optional[float]:
    """Speedup per core used; not defined for the GPU (its cores are not CPU cores)."""
    if speedup is None or p.implementation == "gpu":
        return None
    return speedup / p.cores


def performance_rows(points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: TPE, GFLOP/s, speedups against its serial counterpart and the fastest serial run."""
    rows = []
    for p in points:
        base, fast = counterpart(points, p), fastest_serial(points, p.case, p.batch_size)
        s_own = base.tpe_s / p.tpe_s if base else None
        rows.append({
            **asdict(p.case), "batch_size": p.batch_size, "implementation": p.implementation, "ranks": p.ranks,
            "threads": p.threads, "reps": p.reps, "tpe_s": p.tpe_s, "tpe_min_s": p.tpe_min_s, "tpe_max_s": p.tpe_max_s,
            "gflops": p.gflops, "serial_counterpart": base.label if base else None, "speedup": s_own,
            "fastest_serial": fast.label if fast else None, "speedup_vs_fastest_serial": fast.tpe_s / p.tpe_s if fast else None,
            "efficiency": efficiency(s_own, p), "comm_fraction": p.comm_fraction, "test_accuracy": p.test_accuracy,
            "compute_fraction": p.compute_fraction, "wait_fraction": p.wait_fraction,
            "oversubscribed": p.oversubscribed, "spread": p.spread if p.reps > 1 else None,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Scaling series: growing ranks


def serial_base(points: list[Point], first: Point, batch: int, same_case: bool = True) -> Optional[Point]:
    """The 1-rank start of a scaling series that has none (the sweep runs example-parallel and
    hybrid only at P > 1): its serial counterpart at `batch`, 1 rank x 1 thread."""
    if first.ranks == 1 or first.threads != 1 or first.implementation not in MPI_IMPLEMENTATIONS:
        return None
    impl = SERIAL_COUNTERPART[first.implementation]
    cands = [q for q in points if q.implementation == impl and q.cores == 1 and q.batch_size == batch
             and (q.case == first.case if same_case else (q.case.network, q.case.dtype) == (first.case.network, first.case.dtype))]
    return min(cands, key=lambda q: q.case.n_train) if cands else None


def _series(points: list[Point], key: Callable[[Point], Any], base_of: Callable[[Point], Optional[Point]]) -> dict[Any, list[Point]]:
    """Points grouped by key and sorted by ranks, started at 1 rank by base_of where they lack
    one; only series with at least two rank counts."""
    groups: dict[Any, list[Point]] = defaultdict(list)
    for p in points:
        groups[key(p)].append(p)
    out = {}
    for k, pts in groups.items():
        pts = sorted(pts, key=lambda p: p.ranks)
        base = base_of(pts[0])
        pts = [base, *pts] if base is not None else pts
        if len({p.ranks for p in pts}) >= 2:
            out[k] = pts
    return out


def strong_scaling_rows(points: list[Point]) -> list[dict[str, Any]]:
    """Fixed global batch and data, growing ranks: speedup and efficiency against the fewest ranks."""
    rows = []
    key = lambda p: (p.case, p.batch_size, p.implementation, p.threads)  # noqa: E731
    for (case, batch, impl, threads), pts in _series(points, key, lambda f: serial_base(points, f, f.batch_size)).items():
        base = pts[0]
        for p in pts:
            s = base.tpe_s / p.tpe_s
            rows.append({**asdict(case), "batch_size": batch, "implementation": impl, "threads": threads, "ranks": p.ranks,
                         "run": p.label, "tpe_s": p.tpe_s, "baseline": base.label, "base_ranks": base.ranks, "speedup": s,
                         "ideal": p.ranks / base.ranks, "efficiency": s * base.ranks / p.ranks, "comm_fraction": p.comm_fraction,
                         "compute_fraction": p.compute_fraction, "wait_fraction": p.wait_fraction,
                         **_spread_fields(p, base)})
    return rows


def step_time(p: Point) -> float:
    """Seconds per training step: TPE / ceil(examples / B)."""
    return p.tpe_s / steps_per_epoch(p.examples or p.case.n_train, p.batch_size)


def weak_scaling_rows(points: list[Point]) -> list[dict[str, Any]]:
    """Fixed batch per rank, growing ranks: efficiency = T_step(fewest ranks) / T_step(P).

    Time per *step* rather than per epoch, so that the series is weak scaling whether or not
    the data set grew with the ranks (data.scale_with_ranks): with a fixed data set a P-rank
    epoch has P times fewer steps. With data that grows with P the two are the same thing.
    """
    divisible = [p for p in points if p.batch_size % p.ranks == 0]
    key = lambda p: (p.case.network, p.case.dtype, p.implementation, p.threads, p.batch_size // p.ranks)  # noqa: E731
    base_of = lambda f: serial_base(points, f, f.batch_size // f.ranks, same_case=False)  # noqa: E731
    rows = []
    for (network, dtype, impl, threads, per_rank), pts in _series(divisible, key, base_of).items():
        base = pts[0]
        for p in pts:
            rows.append({"network": network, "dtype": dtype, "implementation": impl, "threads": threads,
                         "batch_per_rank": per_rank, "ranks": p.ranks, "run": p.label, "batch_size": p.batch_size,
                         "n_train": p.case.n_train, "tpe_s": p.tpe_s, "step_s": step_time(p), "baseline": base.label,
                         "base_ranks": base.ranks, "efficiency": step_time(base) / step_time(p),
                         "step_min_s": step_time(p) * p.tpe_min_s / p.tpe_s, "step_max_s": step_time(p) * p.tpe_max_s / p.tpe_s,
                         **_spread_fields(p, base)})
    return rows


def _spread_fields(p: Point, base: Point) -> dict[str, Any]:
    """What a scaling row carries of its repetitions: whether it was oversubscribed, the
    spread, and the speedup's range (the base's median over the point's max and min TPE)."""
    own = p is base  # a series' first point is its own reference: 1 exactly, whatever its spread
    return {"reps": p.reps, "oversubscribed": p.oversubscribed, "spread": p.spread if p.reps > 1 else None,
            "speedup_min": 1.0 if own else base.tpe_s / p.tpe_max_s, "speedup_max": 1.0 if own else base.tpe_s / p.tpe_min_s}
