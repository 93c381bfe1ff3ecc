"""Tables and figures from sweep results: `python -m pbp_hpc.analyze results/X.h5 [...] [--plots DIR]`.

Reads run records (pbp_hpc.results HDF5 files, or the JSON that `train --json` prints),
groups the repetitions of each measured point, and derives what the report tabulates: time
per epoch (TPE), GFLOP/s, speedups, parallel efficiency, communication fraction, accuracy,
strong and weak scaling, and the alpha-beta model's extrapolation (pbp_hpc.perfmodel).
Runs that failed, diverged, timed out or have no timed epoch are listed at the end, never
dropped silently. docs/analysis.md explains every column.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pbp_hpc.analyze import perfmodel
from pbp_hpc.errors import ConfigError, PbpError, ResultsError

Record = dict[str, Any]

IMPLEMENTATIONS = ("naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework")
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
NETWORK_NAMES = {(784, 1024, 10): "net1h", (784, 1024, 1024, 10): "net2h"}
DTYPE_BYTES = {"float32": 4, "float64": 8}
MODEL_TABLE_RANKS = (2, 4, 16, 64, 256, 1024)  # predicted speedups shown in the text table


# ---------------------------------------------------------------------------------------------
# One run record


def _cfg(rec: Record, *path: str) -> Any:
    node: Any = rec.get("config") or {}
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def network_of(rec: Record) -> str:
    """The record's network label; derived from the layer sizes for records without one."""
    if rec.get("network"):
        return str(rec["network"])
    layers = _cfg(rec, "model", "layers")
    return NETWORK_NAMES.get(tuple(layers), str(layers)) if layers else "?"


def batch_of(rec: Record) -> Optional[int]:
    b = rec.get("batch_size") or _cfg(rec, "train", "batch_size")
    return int(b) if b else None


def implementation_of(rec: Record) -> str:
    """The record's implementation; inferred from its config for plain `train --json` output."""
    if rec.get("implementation"):
        return str(rec["implementation"])
    if "framework" in (rec.get("provenance") or {}):
        return "framework"
    if _cfg(rec, "backend") == "cupy":
        return "gpu"
    ranks, threads = rec.get("ranks") or 1, rec.get("threads_per_rank") or 1
    if _cfg(rec, "algorithm") == "per_example":
        return "naive-serial" if ranks == 1 else "example-parallel"
    if ranks > 1:
        return "hybrid"
    return "blas-serial" if threads == 1 else "blas-threaded"


def timed_epochs(rec: Record) -> list[dict[str, Any]]:
    """The epochs that count for timing: after the first warmup_epochs, not partial, with a time."""
    skip = rec.get("warmup_epochs") or 0
    return [e for e in (rec.get("epochs") or [])[skip:] if not e.get("partial") and e.get("time_s") is not None]


def run_tpe(rec: Record) -> Optional[float]:
    """Time per epoch of one run: median of its timed epochs' (slowest-rank) times."""
    times = [e["time_s"] for e in timed_epochs(rec)]
    return float(statistics.median(times)) if times else None


def _median_of(rec: Record, fn: Callable[[dict[str, Any]], Optional[float]]) -> Optional[float]:
    values = [v for v in (fn(e) for e in timed_epochs(rec)) if v is not None and math.isfinite(v)]
    return float(statistics.median(values)) if values else None


def run_comm_fraction(rec: Record) -> Optional[float]:
    """Median over timed epochs of allreduce_s / time_s."""
    return _median_of(rec, lambda e: e["allreduce_s"] / e["time_s"] if e.get("allreduce_s") is not None and e["time_s"] > 0 else None)


def run_examples(rec: Record) -> Optional[float]:
    return _median_of(rec, lambda e: e.get("examples") if (e.get("examples") or 0) > 0 else None)


def steps_per_epoch(examples: float, batch: int) -> int:
    return math.ceil(examples / batch)


def run_compute_per_example(rec: Record) -> Optional[float]:
    """Seconds of compute per example (compute_s / examples), median over timed epochs."""
    return _median_of(rec, lambda e: e["compute_s"] / e["examples"] if e.get("compute_s") is not None and (e.get("examples") or 0) > 0 else None)


def run_allreduce_per_step(rec: Record) -> Optional[float]:
    """Seconds in Allreduce per step; None for 1-rank runs and for the overlapping reducer
    (whose allreduce_s is only the wait left after overlap, not the Allreduce's length)."""
    batch = batch_of(rec)
    if (rec.get("ranks") or 1) < 2 or batch is None or (_cfg(rec, "parallel", "reducer") or "blocking") != "blocking":
        return None
    return _median_of(rec, lambda e: e["allreduce_s"] / steps_per_epoch(e["examples"], batch)
                      if e.get("allreduce_s") is not None and (e.get("examples") or 0) > 0 else None)


def gradient_bytes(rec: Record) -> Optional[int]:
    """Bytes one Allreduce moves: the gradient (its two extra scalars are negligible)."""
    n, dtype = rec.get("n_params"), _cfg(rec, "model", "dtype") or "float32"
    return int(n) * DTYPE_BYTES.get(dtype, 4) if n else None


# ---------------------------------------------------------------------------------------------
# Points: the repetitions of one configuration


@dataclass(frozen=True, order=True)
class Case:
    """What makes TPEs comparable at all: the network, its precision, the training set size."""

    network: str
    dtype: str
    n_train: int

    def label(self) -> str:
        return f"{self.network} ({self.dtype}, {self.n_train} training examples)"


@dataclass
class Point:
    case: Case
    batch_size: int
    implementation: str
    ranks: int
    threads: int
    reps: int
    tpe_s: float  # median over repetitions of the runs' TPEs
    tpe_min_s: float
    tpe_max_s: float
    gflops: Optional[float]
    comm_fraction: Optional[float]
    test_accuracy: Optional[float]
    compute_per_example_s: Optional[float]
    allreduce_per_step_s: Optional[float]
    gradient_bytes: Optional[int]
    examples: Optional[float]

    @property
    def cores(self) -> int:
        return self.ranks * self.threads

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.ranks}x{self.threads}"


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [v for v in values if v is not None]
    return float(statistics.median(vs)) if vs else None


def case_of(rec: Record) -> Case:
    return Case(network_of(rec), _cfg(rec, "model", "dtype") or "float32", int(rec.get("n_train") or 0))


def _point_key(rec: Record) -> tuple[Any, ...]:
    return (case_of(rec), batch_of(rec), implementation_of(rec), int(rec.get("ranks") or 1), int(rec.get("threads_per_rank") or 1))


def make_point(key: tuple[Any, ...], runs: list[Record]) -> Point:
    tpes = [run_tpe(r) for r in runs]
    examples = _median(run_examples(r) for r in runs)
    tpe = float(statistics.median(tpes))
    flops = _median(r.get("flops_per_example") for r in runs)
    return Point(*key, reps=len(runs), tpe_s=tpe, tpe_min_s=min(tpes), tpe_max_s=max(tpes),
                 gflops=flops * examples / tpe / 1e9 if flops and examples and tpe > 0 else None,
                 comm_fraction=_median(run_comm_fraction(r) for r in runs),
                 test_accuracy=_median(r.get("test_accuracy") for r in runs),
                 compute_per_example_s=_median(run_compute_per_example(r) for r in runs),
                 allreduce_per_step_s=_median(run_allreduce_per_step(r) for r in runs),
                 gradient_bytes=gradient_bytes(runs[0]), examples=examples)


def problem_row(rec: Record, why: Optional[str] = None) -> dict[str, Any]:
    err = (why or rec.get("error") or "").strip().splitlines()
    return {"sweep": rec.get("sweep"), "point": rec.get("point"), "repetition": rec.get("repetition"),
            "network": network_of(rec), "batch_size": batch_of(rec), "implementation": implementation_of(rec),
            "ranks": rec.get("ranks"), "threads": rec.get("threads_per_rank"), "status": rec.get("status") or "?",
            "error": err[-1] if err else ""}


def aggregate(records: Iterable[Record]) -> tuple[list[Point], list[dict[str, Any]]]:
    """Group ok runs into points; every other run becomes a problem row."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    problems = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            problems.append(problem_row(rec))
        elif batch_of(rec) is None:
            problems.append(problem_row(rec, "no batch size in the record"))
        elif run_tpe(rec) is None:
            problems.append(problem_row(rec, f"no timed epoch ({len(rec.get('epochs') or [])} epoch(s), "
                                             f"warmup_epochs={rec.get('warmup_epochs') or 0})"))
        else:
            groups[_point_key(rec)].append(rec)
    order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
    points = [make_point(k, v) for k, v in groups.items()]
    points.sort(key=lambda p: (p.case, p.batch_size, order.get(p.implementation, 99), p.implementation, p.ranks, p.threads))
    return points, problems


# ---------------------------------------------------------------------------------------------
# Derived metrics


def find(points: list[Point], case: Case, batch: int, impl: str, ranks: int, threads: int) -> Optional[Point]:
    return next((p for p in points if (p.case, p.batch_size, p.implementation, p.ranks, p.threads) == (case, batch, impl, ranks, threads)), None)


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
        })
    return rows


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
                         "ideal": p.ranks / base.ranks, "efficiency": s * base.ranks / p.ranks, "comm_fraction": p.comm_fraction})
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
                         "base_ranks": base.ranks, "efficiency": step_time(base) / step_time(p)})
    return rows


# ---------------------------------------------------------------------------------------------
# The alpha-beta model


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
    n = int(s.base.examples or s.case.n_train)
    return perfmodel.speedup(ranks, s.batch_size, n, s.base.compute_per_example_s, s.base.gradient_bytes, ab)


def model_rows(series: list[ModelSeries], ab: perfmodel.AlphaBeta, max_ranks: int = perfmodel.MAX_RANKS) -> list[dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------------
# Tables as text, CSV and JSON


@dataclass
class Column:
    key: str
    header: str
    fmt: Callable[[Any, dict[str, Any]], str]


def num(spec: str, scale: float = 1.0) -> Callable[[Any, dict[str, Any]], str]:
    return lambda v, row: "-" if v is None else format(v * scale, spec)


def text(v: Any, row: dict[str, Any]) -> str:
    return "-" if v is None else str(v)


@dataclass
class Table:
    name: str  # CSV file stem and JSON key; several tables may share one (one per network)
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    separate_on: Optional[str] = None  # a blank line where this column's value changes

    def render(self) -> str:
        cells = [[c.header for c in self.columns]] + [[c.fmt(r.get(c.key), r) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        left = [all(isinstance(r.get(c.key), str) or r.get(c.key) is None for r in self.rows) for c in self.columns]
        fmt_row = lambda row: "  ".join(s.ljust(w) if l else s.rjust(w) for s, w, l in zip(row, widths, left)).rstrip()  # noqa: E731
        lines = [self.title, fmt_row(cells[0]), "  ".join("-" * w for w in widths)]
        for i, (r, row) in enumerate(zip(self.rows, cells[1:])):
            if self.separate_on and i > 0 and r.get(self.separate_on) != self.rows[i - 1].get(self.separate_on):
                lines.append("")
            lines.append(fmt_row(row))
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _range(v: Any, row: dict[str, Any]) -> str:
    if row.get("reps", 1) < 2:
        return "-"
    return f"{row['tpe_min_s']:.4g}–{row['tpe_max_s']:.4g}"


def _cores(v: Any, row: dict[str, Any]) -> str:
    return f"{row['ranks']}x{row['threads']}"


PERF_COLUMNS = [
    Column("batch_size", "B", text), Column("implementation", "implementation", text), Column("ranks", "PxT", _cores),
    Column("reps", "reps", text), Column("tpe_s", "TPE s", num(".4g")), Column("tpe_min_s", "TPE min–max s", _range),
    Column("gflops", "GFLOP/s", num(".3g")), Column("speedup", "speedup", num(".3g")),
    Column("speedup_vs_fastest_serial", "vs fastest serial", num(".3g")), Column("efficiency", "efficiency", num(".2f")),
    Column("comm_fraction", "comm %", num(".1f", 100)), Column("test_accuracy", "test acc %", num(".2f", 100)),
]
PERF_NOTES = [
    "TPE: median over repetitions of each run's median epoch time (warm-up and partial epochs dropped); min–max over repetitions.",
    "speedup: TPE of the serial counterpart / TPE (example-parallel vs naive-serial; blas-threaded, hybrid, gpu vs blas-serial;",
    "  framework vs framework 1x1); vs fastest serial: against the fastest 1x1 CPU run of the same network and batch.",
    "efficiency: speedup / (P x T), CPU only.  comm %: allreduce_s / time_s, median over timed epochs.",
]


def _by_case(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["network"], r["dtype"], r["n_train"])].append(r)
    return out


def build_tables(points: list[Point], problems: list[dict[str, Any]], ab: perfmodel.AlphaBeta,
                 max_ranks: int = perfmodel.MAX_RANKS) -> list[Table]:
    tables = []
    for (net, dtype, n), rows in _by_case(performance_rows(points)).items():
        tables.append(Table("performance", f"Performance: {Case(net, dtype, n).label()}", PERF_COLUMNS, rows, [], "batch_size"))
    if tables:
        tables[-1].notes = PERF_NOTES
    strong = strong_scaling_rows(points)
    if strong:
        tables.append(Table("strong_scaling", "Strong scaling (fixed global batch B and data; speedup and efficiency vs the fewest ranks)", [
            Column("network", "network", text), Column("n_train", "N", text), Column("batch_size", "B", text),
            Column("implementation", "series", text), Column("run", "run (PxT)", text), Column("tpe_s", "TPE s", num(".4g")),
            Column("speedup", "speedup", num(".3g")), Column("ideal", "ideal", num(".3g")),
            Column("efficiency", "efficiency", num(".2f")), Column("comm_fraction", "comm %", num(".1f", 100))],
            strong, ["speedup = TPE(fewest ranks) / TPE(P); ideal = P / fewest ranks; efficiency = speedup / ideal.",
             "a series measured only at P > 1 (example-parallel, hybrid) starts from its serial counterpart at 1 rank."], "batch_size"))
    weak = weak_scaling_rows(points)
    if weak:
        tables.append(Table("weak_scaling", "Weak scaling (fixed batch per rank B/P; efficiency = T_step(fewest ranks) / T_step(P))", [
            Column("network", "network", text), Column("implementation", "series", text), Column("batch_per_rank", "B/P", text),
            Column("run", "run (PxT)", text), Column("batch_size", "B", text),
            Column("n_train", "N", text), Column("tpe_s", "TPE s", num(".4g")), Column("step_s", "step ms", num(".4g", 1e3)),
            Column("efficiency", "efficiency", num(".2f"))],
            weak, ["T_step = TPE / ceil(N / B): per-rank work per step is constant along a series, ideal efficiency 1.",
            "a series measured only at P > 1 starts from its serial counterpart at 1 rank and batch B/P."], "batch_per_rank"))
    series = model_series(points)
    if series:
        tables += _model_tables(series, ab, max_ranks)
    tables.append(Table("problems", f"Runs not in the tables above ({len(problems)}: failed, diverged, timed out, or no timed epoch)", [
        Column("sweep", "sweep", text), Column("point", "point", text), Column("repetition", "rep", text),
        Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
        Column("ranks", "P", text), Column("threads", "T", text), Column("status", "status", text),
        Column("error", "error", lambda v, r: (v or "")[:90])], problems))
    return tables


def _model_tables(series: list[ModelSeries], ab: perfmodel.AlphaBeta, max_ranks: int) -> list[Table]:
    shown = [P for P in MODEL_TABLE_RANKS if P <= max_ranks]
    notes = [f"alpha-beta: {ab.describe()}", "assumptions:"] + [f"  - {a}" for a in perfmodel.ASSUMPTIONS]
    model = Table("model", f"Alpha-beta model: predicted speedup over 1 rank, out to {max_ranks} ranks", [
        Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
        Column("threads", "T", text), Column("compute_from", "compute from", text),
        Column("compute_us_per_example", "us/example", num(".3g")), Column("gradient_mb", "grad MB", num(".3g")),
        *[Column(f"speedup_p{P}", f"S({P})", num(".3g")) for P in shown],
        Column("best_ranks", "best P", text), Column("best_speedup", "best S", num(".3g"))],
        model_rows(series, ab, max_ranks), notes)
    check = model_check_rows(series, ab)
    tables = [model]
    if check:
        tables.append(Table("model_check", "Alpha-beta model against the measured points", [
            Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
            Column("threads", "T", text), Column("ranks", "P", text), Column("measured_speedup", "measured S", num(".3g")),
            Column("predicted_speedup", "model S", num(".3g")), Column("measured_allreduce_ms", "Allreduce ms", num(".3g")),
            Column("predicted_allreduce_ms", "model ms", num(".3g"))], check))
    return tables


def write_csv(tables: list[Table], directory: Path) -> list[Path]:
    """One CSV per table name, every field of every row (not only the printed columns)."""
    directory.mkdir(parents=True, exist_ok=True)
    merged: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in tables:
        merged[t.name].extend(t.rows)
    paths = []
    for name, rows in merged.items():
        path = directory / f"{name}.csv"
        keys = list(dict.fromkeys(k for r in rows for k in r)) or ["(none)"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        paths.append(path)
    return paths


def as_json(tables: list[Table], ab: perfmodel.AlphaBeta) -> dict[str, Any]:
    merged: dict[str, list[dict[str, Any]]] = {}
    for t in tables:
        merged.setdefault(t.name, []).extend(t.rows)
    return {"tables": merged, "alpha_beta": ab.to_dict(), "assumptions": list(perfmodel.ASSUMPTIONS)}


# ---------------------------------------------------------------------------------------------
# Input and command line


def _read_json_records(path: Path) -> list[Record]:
    text_ = path.read_text()
    try:
        data = json.loads(text_)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text_.splitlines() if line.strip().startswith("{")]


def read_records(paths: list[str]) -> list[Record]:
    """Records from HDF5 results files (pbp_hpc.results) and from JSON / JSON-lines files."""
    records: list[Record] = []
    h5 = [p for p in paths if not p.endswith((".json", ".jsonl"))]
    for p in paths:
        if p.endswith((".json", ".jsonl")):
            try:
                records += _read_json_records(Path(p))
            except (OSError, ValueError) as exc:
                raise ResultsError(f"cannot read run records from {p}: {exc}") from None
    if h5:
        try:
            from pbp_hpc.results import read_runs
        except ImportError as exc:
            raise ResultsError(f"reading HDF5 results needs pbp_hpc.results ({exc})") from None
        records += read_runs(h5)
    return records


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results files (.h5 from sweeps; .json/.jsonl of `train --json` output also read)")
    p.add_argument("--plots", metavar="DIR", help="write the figures as PNG files into DIR")
    p.add_argument("--csv", metavar="DIR", help="write every table as DIR/<table>.csv")
    p.add_argument("--json", action="store_true", help="print the tables as one JSON object instead of text")
    p.add_argument("--alpha-beta", metavar="FILE", help="alpha and beta from benchmarks/allreduce.py --json FILE, instead of the fit")
    p.add_argument("--alpha", type=float, metavar="SECONDS", help="Allreduce latency per message round (overrides fit and file)")
    p.add_argument("--beta", type=float, metavar="S_PER_BYTE", help="Allreduce inverse bandwidth, seconds per byte")
    p.add_argument("--max-ranks", type=int, default=perfmodel.MAX_RANKS, help="extrapolate the model to this many ranks (default 1024)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.max_ranks < 2:
            raise ConfigError("--max-ranks must be at least 2")
        records = read_records(args.files)
        if not records:
            raise ResultsError(f"no runs in {', '.join(args.files)}")
        points, problems = aggregate(records)
        ab = choose_alpha_beta(points, args.alpha_beta, args.alpha, args.beta)
        tables = build_tables(points, problems, ab, args.max_ranks)
        if args.csv:
            write_csv(tables, Path(args.csv))
        if args.plots:
            from pbp_hpc.analyze import figures
            written = figures.write_all(points, Path(args.plots), ab, args.max_ranks)
            print(f"wrote {len(written)} figure(s) to {args.plots}", file=sys.stderr)
    except PbpError as exc:
        print(f"pbp_hpc.analyze: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(tables, ab), indent=1))
    else:
        print(f"{len(records)} run(s): {sum(p.reps for p in points)} ok in {len(points)} point(s), {len(problems)} not ok\n")
        print("\n\n".join(t.render() for t in tables))
    return 0

