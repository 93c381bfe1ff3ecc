"""Strategies compared: which reaches the target accuracy first, with and without a straggler.

For runs of a strategy study (jobs/strategies.yaml: `parallel.strategy` x
`study.straggler_factor` x ranks, with a target accuracy), one row per (strategy, straggler
factor, ranks) of a case and target: the median training time to the target, the epochs and the
updates it took, and the staleness of the asynchronous strategies' updates. Updates count what
changed the parameters that every worker reads: allreduce, one per global step; local_sgd, one
average per k steps (`averages`); async_ps, ssp and hogwild, one per share of a global minibatch
(P per step). Under each table, per straggler factor, the fastest strategy to the target, and how
it compares with allreduce on the same ranks.

Plain rows (dicts); pbp_hpc.analyze.strategy_figures draws the same runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable, Optional

from pbp_hpc.analyze.accuracy import reached, straggler_of, strategy_of, target_of
from pbp_hpc.analyze.points import Case, case_of
from pbp_hpc.analyze.records import Record, _cfg
from pbp_hpc.analyze.tables import Column, Table, num, text
from pbp_hpc.parallel import strategies

ORDER = strategies.names()  # the registry's order: from lockstep to fully asynchronous
# each rank's update is its own (one per share): P updates per global step
ASYNC = tuple(n for n in ORDER if strategies.facts(n).splits_decay)


def is_study(records: Iterable[Record]) -> bool:
    """Whether the runs compare strategies or stragglers (else there is nothing to show here)."""
    return any(strategy_of(r) != "allreduce" or straggler_of(r) != 1.0 for r in records)


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [float(v) for v in values if v is not None]
    return float(statistics.median(vs)) if vs else None


def _updates_to_target(rec: Record) -> Optional[float]:
    t = target_of(rec) or {}
    steps = t.get("steps")
    if steps is None:
        return None
    strategy, ranks = strategy_of(rec), int(rec.get("ranks") or 1)
    if strategy in ASYNC:
        return float(steps * ranks)
    if strategy == "local_sgd":
        return float(steps) / int(_cfg(rec, "parallel", "local_steps") or 1)
    return float(steps)


def rows(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per (case, target, straggler factor, ranks, strategy) of the ok runs with a target."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for rec in records:
        if rec.get("status", "ok") == "ok" and target_of(rec) is not None:
            t = target_of(rec) or {}
            key = (case_of(rec), float(t["accuracy"]), straggler_of(rec), int(rec.get("ranks") or 1),
                   int(rec.get("batch_size") or 0), strategy_of(rec))
            groups[key].append(rec)
    order = {name: i for i, name in enumerate(ORDER)}
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4], order.get(k[5], 99), k[5])):
        case, target, factor, ranks, batch, strategy = key
        runs = groups[key]
        hit = [r for r in runs if reached(r)]
        tgt = [target_of(r) or {} for r in hit]
        stale = [r.get("staleness_mean") for r in runs]
        out.append({
            "network": case.network, "dtype": case.dtype, "n_train": case.n_train, "target": target,
            "straggler": factor, "ranks": ranks, "batch_size": batch, "strategy": strategy,
            "reps": len(runs), "reached": len(hit),
            "time_to_target_s": _median(t.get("time_s") for t in tgt),
            "epochs_to_target": _median(t.get("epochs") for t in tgt),
            "updates_to_target": _median(_updates_to_target(r) for r in hit),
            "staleness_mean": _median(stale),
            "staleness_max": max((r["staleness_max"] for r in runs if r.get("staleness_max") is not None), default=None),
            "best_val_accuracy": _median(r.get("best_val_accuracy") for r in runs),
            "test_accuracy": _median(r.get("test_accuracy") for r in runs),
        })
    return out


def _to_target(v: Any, row: dict[str, Any]) -> str:
    if not row["reached"]:
        best = row["best_val_accuracy"]
        return "not reached" + (f" ({100 * best:.2f}%)" if best is not None else "")
    return f"{v:.4g}" + ("" if row["reached"] == row["reps"] else f" ({row['reached']}/{row['reps']})")


COLUMNS = [
    Column("straggler", "straggler", lambda v, r: "none" if v == 1.0 else f"x{v:g}"),
    Column("ranks", "P", text), Column("batch_size", "B", text), Column("strategy", "strategy", text),
    Column("reps", "reps", text), Column("time_to_target_s", "to target s", _to_target),
    Column("epochs_to_target", "epochs", num(".3g")), Column("updates_to_target", "updates", num(".4g")),
    Column("staleness_mean", "staleness mean", num(".2f")), Column("staleness_max", "max", text),
    Column("test_accuracy", "test acc %", num(".2f", 100)),
]
NOTES = [
    "to target s: training time until the first validation pass at or above the target (evaluations excluded), median over",
    "  repetitions; epochs: global steps / steps per epoch at that pass. updates: allreduce, one per step; local_sgd, one",
    "  average per k steps; async_ps, ssp, hogwild, one per share (P per step). staleness: updates applied between a",
    "  worker's read and its write (async_ps, ssp), mean over updates and the largest seen.",
    "Ranks may outnumber cores in this study (oversubscribed): the comparison between strategies on the same ranks holds,",
    "  the times themselves are not those of a machine with a core per rank.",
]


def verdicts(group: list[dict[str, Any]]) -> list[str]:
    """Per straggler factor and ranks: the fastest strategy, and each one against allreduce."""
    lines = []
    by: dict[tuple[float, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in group:
        by[(r["straggler"], r["ranks"], r["batch_size"])].append(r)
    for (factor, ranks, batch), rs in by.items():
        done = [r for r in rs if r["reached"] == r["reps"] and r["time_to_target_s"] is not None]
        where = f"straggler {'none' if factor == 1.0 else f'x{factor:g}'}, P={ranks}, B={batch}"
        if not done:
            lines.append(f"{where}: no strategy reached the target in every run")
            continue
        best = min(done, key=lambda r: r["time_to_target_s"])
        base = next((r for r in done if r["strategy"] == "allreduce"), None)
        vs = ""
        if base is not None and best is not base:
            vs = f", {base['time_to_target_s'] / best['time_to_target_s']:.2f}x faster than allreduce"
        elif base is None:
            vs = " (allreduce did not reach it)" if any(r["strategy"] == "allreduce" for r in rs) else ""
        lines.append(f"{where}: fastest {best['strategy']} ({best['time_to_target_s']:.4g} s{vs})")
    return lines


def tables(records: list[Record]) -> list[Table]:
    """One table per case and target; none unless the runs compare strategies or stragglers."""
    if not is_study(records):
        return []
    out = []
    grouped: dict[tuple[Case, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows(records):
        grouped[(Case(r["network"], r["dtype"], r["n_train"]), r["target"])].append(r)
    for (case, target), group in grouped.items():
        out.append(Table("strategies", f"Strategies to {100 * target:g}% validation accuracy: {case.label()}", COLUMNS,
                         group, verdicts(group), "straggler"))
    if out:
        out[-1].notes = out[-1].notes + NOTES
    return out
