"""Steps and epochs to the target against batch size, per optimizer (Shallue et al. 2018).

From the time-to-accuracy rows (pbp_hpc.analyze.accuracy): for each optimizer/schedule (the
row's variant) run at several batch sizes, the steps and epochs to the target as mean ± std
over the seeds that reached it, the fraction that did, and the test accuracy. Perfect scaling
halves the steps when the batch doubles (epochs constant); past the critical batch the steps
stop falling and the epochs grow. Under each table, per variant, the largest batch at which
every seed still reached the target within MAX_EPOCH_RATIO times the mean epochs of the
reference batch (REFERENCE_BATCH where run, else the smallest batch run).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from pbp_hpc.analyze.accuracy import by_target, time_to_target_rows
from pbp_hpc.analyze.records import Record
from pbp_hpc.analyze.spread import plus_minus
from pbp_hpc.analyze.tables import Column, Table, text

REFERENCE_BATCH = 1024
MAX_EPOCH_RATIO = 2.0


def series(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """(variant, implementation, ranks, threads) -> its rows by batch size, where it has two or more batches."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["variant"], r["implementation"], r["ranks"], r["threads"])].append(r)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in out.items() if len({r["batch_size"] for r in v}) > 1}


def largest_batch(rows: list[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(the reference row, the largest-batch row reaching the target in every run within
    MAX_EPOCH_RATIO x the reference's mean epochs); None where the reference did not reach it."""
    ref = next((r for r in rows if r["batch_size"] == REFERENCE_BATCH), rows[0])
    if ref["reached"] < ref["reps"] or ref.get("epochs_to_target_mean") is None:
        return ref, None
    limit = MAX_EPOCH_RATIO * ref["epochs_to_target_mean"]
    ok = [r for r in rows if r["reached"] == r["reps"] and r["epochs_to_target_mean"] is not None
          and r["epochs_to_target_mean"] <= limit]
    return ref, max(ok, key=lambda r: r["batch_size"]) if ok else None


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for (variant, impl, ranks, threads), srows in series(rows).items():
        ref, best = largest_batch(srows)
        head = f"{variant} ({impl} {ranks}x{threads})"
        if best is None:
            lines.append(f"{head}: the reference batch {ref['batch_size']} did not reach the target in every run")
            continue
        lines.append(f"{head}: largest batch reaching the target within {MAX_EPOCH_RATIO:g}x the epochs of "
                     f"B={ref['batch_size']} ({ref['epochs_to_target_mean']:.3g}) in every seed: B={best['batch_size']} "
                     f"({best['epochs_to_target_mean']:.3g} epochs, {best['steps_to_target_mean']:.4g} steps)")
    return lines


def _cell(name: str, spec: str, scale: float = 1.0) -> Any:
    return lambda v, r: plus_minus(r, name, scale, spec, False)


def tables(records: list[Record]) -> list[Table]:
    """One table per case and target where some variant ran at several batch sizes; none otherwise."""
    columns = [Column("variant", "optimizer, schedule, rate", text), Column("batch_size", "B", text),
               Column("seeds", "seeds", text),
               Column("reached_fraction", "reached", lambda v, r: f"{r['reached']}/{r['reps']}"),
               Column("steps_to_target_mean", "steps to target", _cell("steps_to_target", ".4g")),
               Column("epochs_to_target_mean", "epochs to target", _cell("epochs_to_target", ".3g")),
               Column("test_accuracy_mean", "test % (all runs)", _cell("test_accuracy", ".2f", 100)),
               Column("best_val_mean", "best val %", _cell("best_val", ".2f", 100))]
    out = []
    for (case, target), rows in by_target(time_to_target_rows(records)).items():
        runs = [r for rows_ in series(rows).values() for r in rows_]
        if not runs:
            continue
        notes = verdicts(rows) + [
            "steps/epochs to target: mean ± std over the seeds that reached it; test %: mean ± std over every run (a run",
            "  stops at the target, so its test accuracy is the model's there). Perfect scaling halves the steps when B doubles."]
        out.append(Table("batch_scaling", f"Steps and epochs to {100 * target:g}% validation accuracy vs batch size: "
                         f"{case.label()}", columns, runs, notes, "variant"))
    return out
