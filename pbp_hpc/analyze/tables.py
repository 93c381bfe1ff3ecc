"""The report's tables: the Table/Column machinery, building the performance, time-to-accuracy,
scaling, model and problem tables from points (and records), and writing them as text, CSV and JSON.

A Table keeps whole rows (every field the row functions compute) and prints only its
columns; the CSV and JSON output carry every field, so scripts see more than the text shows.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.accuracy import best_line, by_target, time_to_target_rows
from pbp_hpc.analyze.spread import plus_minus
from pbp_hpc.analyze.models import ModelSeries, model_check_rows, model_rows, model_series
from pbp_hpc.analyze.points import SPREAD_WARN, Case, Point
from pbp_hpc.analyze.records import Record
from pbp_hpc.analyze.scaling import performance_rows, strong_scaling_rows, weak_scaling_rows

MODEL_TABLE_RANKS = (2, 4, 16, 64, 256, 1024)  # predicted speedups shown in the text table


# ---------------------------------------------------------------------------------------------
# Tables as text


@dataclass
class Column:
    """One printed column: the row field it shows, its header, and how a value is formatted
    (the formatter also gets the whole row, for cells built from several fields)."""

    key: str
    header: str
    fmt: Callable[[Any, dict[str, Any]], str]


def num(spec: str, scale: float = 1.0) -> Callable[[Any, dict[str, Any]], str]:
    """A number formatter: value x scale in format spec; "-" where the value is missing."""
    return lambda v, row: "-" if v is None else format(v * scale, spec)


def text(v: Any, row: dict[str, Any]) -> str:
    """The value as it is; "-" where missing."""
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
        """The title, a header, aligned rows (text columns left, numbers right), then the notes;
        a table without rows is the title and one line saying so, never a bare header."""
        if not self.rows:
            return "\n".join([self.title, "  (none)"] + [f"  {n}" for n in self.notes])
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


# ---------------------------------------------------------------------------------------------
# The report's tables


def _range(v: Any, row: dict[str, Any]) -> str:
    if row.get("reps", 1) < 2:
        return "-"
    return f"{row['tpe_min_s']:.4g}–{row['tpe_max_s']:.4g}"


def _cores(v: Any, row: dict[str, Any]) -> str:
    return f"{row['ranks']}x{row['threads']}" + OVER_MARK * bool(row.get("oversubscribed"))


def _run(v: Any, row: dict[str, Any]) -> str:
    return str(v) + OVER_MARK * bool(row.get("oversubscribed"))


def _spread(v: Any, row: dict[str, Any]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%" + (SPREAD_MARK if v > SPREAD_WARN else "")


OVER_MARK = "!"  # after PxT: more threads than cores
SPREAD_MARK = " <"  # after the spread: repetitions differ by more than SPREAD_WARN
OVER_NOTE = f"{OVER_MARK} after PxT: oversubscribed, ranks x threads > the node's cores: it measures cores time-shared, not scaling."


def spread_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One warning naming the rows whose repetitions spread more than SPREAD_WARN; none if none do."""
    bad = [r for r in rows if (r.get("spread") or 0) > SPREAD_WARN]
    if not bad:
        return []
    which = ", ".join(f"B={r['batch_size']} {r.get('run') or r['implementation'] + ' ' + _cores(None, r)} {100 * r['spread']:.0f}%"
                      for r in bad[:8]) + (f", and {len(bad) - 8} more" if len(bad) > 8 else "")
    return [f"WARNING: {len(bad)} point(s) whose repetitions' TPEs spread more than {100 * SPREAD_WARN:.0f}% "
            f"((max - min) / median, marked{SPREAD_MARK}): {which}. Rerun them on a quiet machine or add repetitions."]


PERF_COLUMNS = [
    Column("batch_size", "B", text), Column("implementation", "implementation", text), Column("ranks", "PxT", _cores),
    Column("reps", "reps", text), Column("tpe_s", "TPE s", num(".4g")), Column("tpe_min_s", "TPE min–max s", _range),
    Column("spread", "spread", _spread), Column("gflops", "GFLOP/s", num(".3g")), Column("speedup", "speedup", num(".3g")),
    Column("speedup_vs_fastest_serial", "vs fastest serial", num(".3g")), Column("efficiency", "efficiency", num(".2f")),
    Column("compute_fraction", "compute %", num(".1f", 100)), Column("comm_fraction", "comm %", num(".1f", 100)),
    Column("wait_fraction", "wait %", num(".1f", 100)), Column("test_accuracy", "test acc %", num(".2f", 100)),
]
PERF_NOTES = [
    "TPE: median over repetitions of each run's median epoch time (warm-up and partial epochs dropped); min–max over repetitions.",
    "speedup: TPE of the serial counterpart / TPE (example-parallel vs naive-serial; blas-threaded, hybrid, gpu vs blas-serial;",
    "  framework vs framework 1x1); vs fastest serial: against the fastest 1x1 CPU run of the same network and batch.",
    "efficiency: speedup / (P x T), CPU only.  compute %, comm %, wait %: compute_s, comm_s (the transfers), wait_s (for",
    "  other ranks) / time_s of the slowest rank, median over timed epochs; the rest is other_s (- for files before schema 3).",
    f"spread: (max - min) / median of the repetitions' TPEs;{SPREAD_MARK} above {100 * SPREAD_WARN:.0f}%.",
    OVER_NOTE,
]


def _to_target(v: Any, row: dict[str, Any]) -> str:
    return "not reached" if not row["reached"] else f"{v:.4g}"


def _tpe_cell(v: Any, row: dict[str, Any]) -> str:
    return "-" if v is None else f"{v:.4g}" + ("*" if row.get("tpe_from") != "timed epochs" else "")


TTA_COLUMNS = [
    Column("variant", "optimizer, schedule, rate", text), Column("batch_size", "B", text), Column("b_noise", "B_noise", num(".0f")),
    Column("implementation", "implementation", text), Column("ranks", "PxT", _cores), Column("reps", "runs", text),
    Column("seeds", "seeds", text),
    Column("reached", "reached", lambda v, r: f"{v}/{r['reps']}"), Column("time_to_target_s", "to target s", _to_target),
    Column("time_to_target_mean", "mean ± std", lambda v, r: plus_minus(r, "time_to_target", 1, ".3g", False)),
    Column("eval_time_s", "eval s", num(".3g")), Column("epochs_to_target", "epochs", num(".3g")),
    Column("epochs_to_target_mean", "mean ± std", lambda v, r: plus_minus(r, "epochs_to_target", 1, ".3g", False)),
    Column("tpe_s", "TPE s", _tpe_cell), Column("val_accuracy_at_target", "val acc %", num(".2f", 100)),
    Column("best_val_accuracy", "best val %", num(".2f", 100)),
    Column("test_accuracy_mean", "test % mean ± std (min–max)", lambda v, r: plus_minus(r, "test_accuracy", 100)),
    Column("best", "", lambda v, r: "<- fastest" if v else ""),
]
TTA_NOTES = [
    "to target s: training time until the first validation pass at or above the target (evaluation passes excluded), median",
    "  over the runs that reached it; eval s: the time in validation passes until then, apart; epochs: steps / steps per epoch",
    "  at that pass. TPE: as in the performance table (timed full epochs); * where the run had none (the target came in the",
    "  warm-up or first epoch): time to target / epochs to target. best val %: the best pass (median over runs).",
    "B_noise: the gradient noise scale tr(Sigma)/|G|^2 (McCandlish et al. 2018) at the target pass (else at the end), median",
    "  over runs; - where not estimated (one rank, or a reducer without the whole local gradient: docs/analysis.md).",
    "mean ± std: over the runs (seeds, repetitions) that reached the target; test %: over all runs, with min–max. A row of",
    "  one seed has std 0: compare rows by their spread only where seeds > 1.",
]


def accuracy_tables(records: list[Record]) -> list[Table]:
    """Time to the target accuracy, one table per case and target; none if no run had a target."""
    tables = []
    for (case, target), rows in by_target(time_to_target_rows(records)).items():
        tables.append(Table("time_to_accuracy", f"Time to {100 * target:g}% validation accuracy: {case.label()}",
                            TTA_COLUMNS, rows, [best_line(rows)], "variant"))
    if tables:
        tables[-1].notes = tables[-1].notes + TTA_NOTES
    return tables


def _by_case(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["network"], r["dtype"], r["n_train"])].append(r)
    return out


def build_tables(points: list[Point], problems: list[dict[str, Any]], ab: perfmodel.AlphaBeta,
                 max_ranks: int = perfmodel.MAX_RANKS, records: Optional[list[Record]] = None) -> list[Table]:
    """Every table the points support, in the report's order; the problem table always comes last.
    With the records, the time-to-accuracy tables follow the performance tables."""
    tables = []
    for (net, dtype, n), rows in _by_case(performance_rows(points)).items():
        tables.append(Table("performance", f"Performance: {Case(net, dtype, n).label()}", PERF_COLUMNS, rows,
                            spread_warnings(rows), "batch_size"))
    if tables:
        tables[-1].notes = tables[-1].notes + PERF_NOTES  # once, under the last network's table, not repeated per network
    if records is not None:
        tables += accuracy_tables(records)
    strong = strong_scaling_rows(points)
    if strong:
        tables.append(Table("strong_scaling", "Strong scaling (fixed global batch B and data; speedup and efficiency vs the fewest ranks)", [
            Column("network", "network", text), Column("n_train", "N", text), Column("batch_size", "B", text),
            Column("implementation", "series", text), Column("run", "run (PxT)", _run), Column("tpe_s", "TPE s", num(".4g")),
            Column("spread", "spread", _spread),
            Column("speedup", "speedup", num(".3g")), Column("ideal", "ideal", num(".3g")),
            Column("efficiency", "efficiency", num(".2f")), Column("compute_fraction", "compute %", num(".1f", 100)),
            Column("comm_fraction", "comm %", num(".1f", 100)), Column("wait_fraction", "wait %", num(".1f", 100))],
            strong, ["speedup = TPE(fewest ranks) / TPE(P); ideal = P / fewest ranks; efficiency = speedup / ideal.",
             "a series measured only at P > 1 (example-parallel, hybrid) starts from its serial counterpart at 1 rank.",
             OVER_NOTE], "batch_size"))
    weak = weak_scaling_rows(points)
    if weak:
        tables.append(Table("weak_scaling", "Weak scaling (fixed batch per rank B/P; efficiency = T_step(fewest ranks) / T_step(P))", [
            Column("network", "network", text), Column("implementation", "series", text), Column("batch_per_rank", "B/P", text),
            Column("run", "run (PxT)", _run), Column("batch_size", "B", text),
            Column("n_train", "N", text), Column("tpe_s", "TPE s", num(".4g")), Column("spread", "spread", _spread),
            Column("step_s", "step ms", num(".4g", 1e3)),
            Column("efficiency", "efficiency", num(".2f"))],
            weak, ["T_step = TPE / ceil(N / B): per-rank work per step is constant along a series, ideal efficiency 1.",
            "a series measured only at P > 1 starts from its serial counterpart at 1 rank and batch B/P.", OVER_NOTE],
            "batch_per_rank"))
    series = model_series(points)
    if series:
        tables += _model_tables(series, ab, max_ranks)
    tables.append(Table("problems", f"Runs not in the tables above ({len(problems)}: failed, diverged, timed out, or no timed epoch)", [
        Column("sweep", "sweep", text), Column("point", "point", text), Column("repetition", "rep", text),
        Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
        Column("ranks", "P", text), Column("threads", "T", text), Column("status", "status", text),
        Column("error", "error", lambda v, r: (v or "")[:90])], problems))
    return tables


def _projected(key: str) -> Callable[[Any, dict[str, Any]], str]:
    """A predicted speedup with its range, "3.1 (2.5-3.4)"; the range alone where the value is
    undetermined; the value alone where there is no range."""
    lo_key, hi_key = key.replace("speedup", "speedup_lo", 1), key.replace("speedup", "speedup_hi", 1)

    def fmt(v: Any, row: dict[str, Any]) -> str:
        lo, hi = row.get(lo_key), row.get(hi_key)
        spread = f"{_g3(lo)}-{_g3(hi)}" if lo is not None and hi is not None else None
        if v is None:
            return spread or "-"
        return _g3(v) + (f" ({spread})" if spread else "")
    return fmt


def _g3(v: float) -> str:
    """Three significant digits, without an exponent for speedups up to thousands (1020, not 1.02e+03)."""
    return f"{v:.0f}" if v >= 1000 else f"{v:.3g}"


def _best_p(v: Any, row: dict[str, Any]) -> str:
    lo, hi = row.get("best_ranks_lo"), row.get("best_ranks_hi")
    spread = f"{min(lo, hi)}-{max(lo, hi)}" if lo is not None and hi is not None and lo != hi else None
    if v is None:
        return spread or (str(lo) if lo is not None else "-")
    return str(v) + (f" ({spread})" if spread else "")


def _model_tables(series: list[ModelSeries], ab: perfmodel.AlphaBeta, max_ranks: int) -> list[Table]:
    shown = [P for P in MODEL_TABLE_RANKS if P <= max_ranks]
    notes = [f"alpha-beta: {ab.describe()}"]
    if ab.undetermined:
        notes.append(f"{' and '.join(ab.undetermined)} not determined: only the range of each prediction is shown "
                     "(all its values agree with the measured Allreduce times).")
    elif ab.uncertain:
        notes.append("in brackets: the prediction with alpha and beta at the ends of their ~95% ranges.")
    else:
        notes.append("no range: the values were given, not fitted with an uncertainty.")
    notes += ["assumptions:"] + [f"  - {a}" for a in perfmodel.ASSUMPTIONS]
    model = Table("model", f"Alpha-beta model: predicted speedup over 1 rank, out to {max_ranks} ranks", [
        Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
        Column("threads", "T", text), Column("compute_from", "compute from", text),
        Column("compute_us_per_example", "us/example", num(".3g")), Column("gradient_mb", "grad MB", num(".3g")),
        *[Column(f"speedup_p{P}", f"S({P})", _projected(f"speedup_p{P}")) for P in shown],
        Column("best_ranks", "best P", _best_p), Column("best_speedup", "best S", _projected("best_speedup"))],
        model_rows(series, ab, max_ranks), notes)
    check = model_check_rows(series, ab)
    tables = [model]
    if check:
        tables.append(Table("model_check", "Alpha-beta model against the measured points", [
            Column("network", "network", text), Column("batch_size", "B", text), Column("implementation", "implementation", text),
            Column("threads", "T", text), Column("ranks", "P", lambda v, r: str(v) + OVER_MARK * bool(r.get("oversubscribed"))),
            Column("measured_speedup", "measured S", num(".3g")),
            Column("predicted_speedup", "model S", _projected("predicted_speedup")),
            Column("measured_allreduce_ms", "Allreduce ms", num(".3g")),
            Column("predicted_allreduce_ms", "model ms", num(".3g"))], check,
            [f"{OVER_MARK} after P: oversubscribed (ranks x threads > cores): not evidence for or against the model."]))
    return tables


# ---------------------------------------------------------------------------------------------
# CSV and JSON


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
    """Every table's rows by name, with the alpha and beta used and the model's assumptions."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for t in tables:
        merged.setdefault(t.name, []).extend(t.rows)
    return {"tables": merged, "alpha_beta": ab.to_dict(), "assumptions": list(perfmodel.ASSUMPTIONS)}
