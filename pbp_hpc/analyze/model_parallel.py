"""Parallelism inside the network compared: which split wins at which batch.

For runs of a model-parallel study (jobs/model_parallel.yaml: one rank, one rank with threads,
data, tensor and pipeline parallelism on the same cores), one row per (network, precision,
batch, parallelism): the median time per epoch (its timed epochs, over repetitions), the
examples an epoch had, the bytes a rank sends a step by kind (the record's `bytes_per_step`:
activations counted in the tensor and pipeline steps; the data group's gradient reduction, the
reducer's count), and how much slower than the fastest it is. Under each table, per batch, the
fastest parallelism. Oversubscribed runs (more threads than cores: data 2 x tensor 2 on 2
cores) are shown, marked, and left out of the choice of the fastest: they measure cores shared
in time, not a split of the work.

A run's parallelism is named from its grid, ranks and threads (records.grid_of), not from the
sweep's labels, so `train --json` output reads the same. Plain rows (dicts);
pbp_hpc.analyze.model_parallel_figures draws them.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import Any, Iterable, Optional

from pbp_hpc.analyze.records import (
    Record,
    _cfg,
    batch_of,
    dtype_of,
    grid_of,
    model_split,
    network_of,
    run_examples,
    run_oversubscribed,
    run_tpe,
)
from pbp_hpc.analyze.tables import OVER_MARK, OVER_NOTE, Column, Table, num, text

FULL_EPOCH = 50_000  # MNIST's training examples after the 5:1 split: the figure's common epoch


def parallelism_of(rec: Record) -> str:
    """The run's parallelism in words: `1 rank`, `1 rank x 2 threads`, `data 2`, `tensor 2`,
    `pipeline 2`, `data 2 x tensor 2` (`, 2 threads` where each rank has more than one)."""
    D, T, S = grid_of(rec)
    threads = int(rec.get("threads_per_rank") or 1)
    parts = [f"{kind} {n}" for kind, n in (("data", D), ("tensor", T), ("pipeline", S)) if n > 1]
    if not parts:
        return "1 rank" + (f" x {threads} threads" if threads > 1 else "")
    return " x ".join(parts) + (f", {threads} threads" if threads > 1 else "")


def order_key(rec: Record) -> tuple[int, int, int, int]:
    """Parallelisms in the study's order: fewer ranks first, then data, tensor, pipeline."""
    D, T, S = grid_of(rec)
    return D * T * S, T, S, int(rec.get("threads_per_rank") or 1)


def is_study(records: Iterable[Record]) -> bool:
    """Whether any ok run splits the model (else there is nothing to compare here)."""
    return any(rec.get("status", "ok") == "ok" and model_split(rec) for rec in records)


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [float(v) for v in values if v is not None]
    return float(statistics.median(vs)) if vs else None


def reducer_of(rec: Record) -> Optional[str]:
    """The data group's reducer as the run chose it (its `communication` line), where it has a data group."""
    m = re.search(r" with reducer (\w+):", rec.get("communication") or "")
    return m.group(1) if m and grid_of(rec)[0] > 1 else None


def _bytes(rec: Record, kind: str) -> Optional[float]:
    b = rec.get("bytes_per_step")
    return b.get(kind) if isinstance(b, dict) else None


def rows(records: Iterable[Record]) -> list[dict[str, Any]]:
    """One row per (network, dtype, batch, parallelism) of the ok runs with a timed epoch; per
    (network, dtype, batch), `slower` = time per epoch / the fastest not oversubscribed one's."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for rec in records:
        if rec.get("status", "ok") == "ok" and run_tpe(rec) is not None and batch_of(rec):
            key = (network_of(rec), dtype_of(rec), batch_of(rec), order_key(rec), parallelism_of(rec))
            groups[key].append(rec)
    out = []
    for key in sorted(groups):
        network, dtype, batch, _, parallelism = key
        runs = groups[key]
        tpes = [run_tpe(r) or 0.0 for r in runs]
        examples = _median(run_examples(r) for r in runs)
        act, grad = _median(_bytes(r, "activations") for r in runs), _median(_bytes(r, "gradients") for r in runs)
        tpe = float(statistics.median(tpes))
        D, T, S = grid_of(runs[0])
        out.append({
            "network": network, "dtype": dtype, "batch_size": batch, "parallelism": parallelism,
            "data": D, "tensor": T, "pipeline": S,
            "ranks": int(runs[0].get("ranks") or 1), "threads": int(runs[0].get("threads_per_rank") or 1),
            "microbatches": _cfg(runs[0], "parallel", "microbatches") if S > 1 else None,
            "reducer": reducer_of(runs[0]),
            "reps": len(runs), "examples": examples, "tpe_s": tpe, "tpe_min_s": min(tpes), "tpe_max_s": max(tpes),
            "tpe_full_s": tpe * FULL_EPOCH / examples if examples else None,
            "bytes_activations": act, "bytes_gradients": grad,
            "bytes_total": None if act is None and grad is None else (act or 0.0) + (grad or 0.0),
            "oversubscribed": any(run_oversubscribed(r) for r in runs),
        })
    by: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in out:
        by[(r["network"], r["dtype"], r["batch_size"])].append(r)
    for group in by.values():
        best = fastest(group)
        for r in group:
            r["slower"] = r["tpe_s"] / best["tpe_s"] if best and best["tpe_s"] > 0 else None
            r["fastest"] = r is best
    return out


def fastest(group: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The row of least time per epoch among those not oversubscribed (None if all are)."""
    fair = [r for r in group if not r["oversubscribed"]]
    return min(fair, key=lambda r: r["tpe_s"]) if fair else None


def _parallelism(v: Any, row: dict[str, Any]) -> str:
    return str(v) + (f" (M={row['microbatches']})" if row.get("microbatches") else "") + " *" * bool(row.get("fastest"))


def _cores(v: Any, row: dict[str, Any]) -> str:
    return f"{row['ranks']}x{row['threads']}" + OVER_MARK * bool(row.get("oversubscribed"))


def _bytes_cell(v: Any, row: dict[str, Any]) -> str:
    return "-" if v is None else f"{v:,.0f}"


COLUMNS = [
    Column("batch_size", "B", text), Column("parallelism", "parallelism", _parallelism),
    Column("ranks", "PxT", _cores), Column("reducer", "reducer", text), Column("reps", "reps", text), Column("examples", "examples", num(",.0f")),
    Column("tpe_s", "s/epoch", num(".4g")), Column("slower", "x fastest", num(".2f")),
    Column("bytes_activations", "activations B/step", _bytes_cell),
    Column("bytes_gradients", "gradients B/step", _bytes_cell),
]
NOTES = [
    "s/epoch: median over the timed epochs (warm-up dropped) and repetitions of the slowest rank's epoch time, for an",
    "  epoch of `examples` training examples. x fastest: s/epoch over the fastest's (marked *; oversubscribed runs",
    "  are not candidates). B/step: bytes one rank sends a step, as the run counted them: activations (tensor: the",
    "  row layers' Allreduces; pipeline: activations and deltas, mean over steps), gradients (the data group's",
    "  reducer's messages at best, 2(D-1)/D of the gradient; 0 on one rank, without a data group, and for the",
    "  reducers shm and shared_batch on one node, which sum through node-shared memory and send no message).",
    "reducer: the data group's, as parallel.reducer auto chose it (tensor runs: blocking over the gradient shards).",
    OVER_NOTE,
]


def verdicts(group: list[dict[str, Any]]) -> list[str]:
    """Per batch: the fastest parallelism, and by how much it beats the next one."""
    lines = []
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in group:
        by[r["batch_size"]].append(r)
    for batch, rs in sorted(by.items()):
        best = fastest(rs)
        if best is None:
            lines.append(f"B={batch}: every run was oversubscribed; no fastest named")
            continue
        others = sorted((r for r in rs if r is not best and not r["oversubscribed"]), key=lambda r: r["tpe_s"])
        vs = f", {others[0]['tpe_s'] / best['tpe_s']:.2f}x faster than {others[0]['parallelism']}" if others else ""
        lines.append(f"B={batch}: fastest {best['parallelism']} ({best['tpe_s']:.4g} s/epoch{vs})")
    return lines


def tables(records: list[Record]) -> list[Table]:
    """One table per network and precision; none unless some run splits the model."""
    if not is_study(records):
        return []
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows(records):
        grouped[(r["network"], r["dtype"])].append(r)
    out = [Table("model_parallel", f"Parallelism inside the network: {network} ({dtype})", COLUMNS, group,
                 verdicts(group), "batch_size") for (network, dtype), group in grouped.items()]
    if out:
        out[-1].notes = out[-1].notes + NOTES
    return out
