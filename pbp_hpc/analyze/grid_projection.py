"""The grid model (gridmodel.py) applied to a model-parallel study's records: its predictions
beside the measured times and counted bytes, and its projection to a cluster.

Two tables per (network, precision), for runs of a study like jobs/model_parallel.yaml:

- model_parallel_model: per batch and parallelism, the measured seconds per epoch beside the
  model's (with alpha and beta as measured with the runs), the model's time per step by part,
  and the bytes a step sends as the run counted them beside the model's volumes, which must be
  equal (the model's volumes are parallel/volumes.py's formulas; a difference is a WARNING;
  gradients are compared where the data group sums with one blocking, uncompressed Allreduce).
- model_parallel_projection: per batch and number of ranks P (powers of two from 8 to
  --max-ranks, or the grids named with --grid), the predicted best grid of every one pbp_hpc
  builds (data x tensor, data x pipeline at its best M), with the best of each parallelism
  beside it, for an epoch of 50,000 examples, with alpha and beta as given (--alpha/--beta/
  --alpha-beta) or else as measured.

The compute rate comes from the study's own 1-rank, 1-thread runs, per batch.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from typing import Any, Optional

from pbp_hpc.analyze import gridmodel
from pbp_hpc.analyze.model_parallel import FULL_EPOCH, is_study, parallelism_of, reducer_of
from pbp_hpc.analyze.perfmodel import AlphaBeta, rank_grid
from pbp_hpc.analyze.records import (
    DTYPE_BYTES,
    Record,
    _cfg,
    batch_of,
    dtype_of,
    grid_of,
    network_of,
    run_examples,
    run_oversubscribed,
    run_tpe,
    timed_epochs,
)
from pbp_hpc.analyze.tables import OVER_MARK, Column, Table, num, text
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import volumes

MIN_PROJECTED_RANKS = 8
NamedGrid = tuple[gridmodel.Grid, Optional[int]]


def parse_grid(text_: str) -> NamedGrid:
    """`DxTxS` or `DxTxS:M` (e.g. `4x2x1`, `8x1x2:16`) as ((D, T, S), M or None); ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)(?::(\d+))?\s*", text_)
    if not m or min(int(g) for g in m.groups()[:3]) < 1 or (m.group(4) and int(m.group(4)) < 1):
        raise ConfigError(f"--grid {text_!r}: expected DATAxTENSORxPIPELINE[:MICROBATCHES], e.g. 4x2x1 or 8x1x2:16")
    D, T, S = (int(g) for g in m.groups()[:3])
    if T > 1 and S > 1:
        raise ConfigError(f"--grid {text_!r}: tensor and pipeline together are not built (choose T = 1 or S = 1)")
    return (D, T, S), int(m.group(4)) if m.group(4) else None


def _ok(rec: Record) -> bool:
    return rec.get("status", "ok") == "ok" and run_tpe(rec) is not None and bool(batch_of(rec))


def networks(records: list[Record]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (network, dtype): its layer sizes and its compute rate from the 1-rank, 1-thread runs
    (seconds per example = time per epoch / examples, median over runs, per batch); only those
    with such runs."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    per_batch: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if not _ok(rec) or not _cfg(rec, "model", "layers"):
            continue
        key = (network_of(rec), dtype_of(rec))
        found.setdefault(key, {"sizes": list(_cfg(rec, "model", "layers"))})
        examples = run_examples(rec)
        if grid_of(rec) == (1, 1, 1) and int(rec.get("threads_per_rank") or 1) == 1 and examples:
            per_batch[key][int(batch_of(rec) or 0)].append((run_tpe(rec) or 0.0) / examples)
    out = {}
    for key, info in found.items():
        if per_batch.get(key):
            out[key] = {**info, "rate": gridmodel.Rate.of({b: statistics.median(v) for b, v in per_batch[key].items()})}
    return out


def _check_bytes(rec: Record, sizes: list[int], itemsize: int) -> dict[str, Any]:
    """The run's counted bytes a step beside the model's (mean over an epoch's steps)."""
    D, T, S = grid_of(rec)
    batch, examples = int(batch_of(rec) or 0), int(run_examples(rec) or 0)
    model = volumes.mean_bytes_per_step(sizes, (D, T, S), batch, examples, itemsize) if examples else {}
    counted = rec.get("bytes_per_step") if isinstance(rec.get("bytes_per_step"), dict) else {}
    out: dict[str, Any] = {}
    for kind in ("activations", "gradients"):
        c, m = counted.get(kind), model.get(kind)
        comparable = kind == "activations" or D == 1 or (
            reducer_of(rec) == "blocking" and (_cfg(rec, "parallel", "compression") or "none") == "none")
        out[f"counted_{kind}"], out[f"model_{kind}"] = c, m if comparable else None
        out[f"equal_{kind}"] = None if c is None or m is None or not comparable else math.isclose(c, m, rel_tol=1e-9, abs_tol=1e-9)
    return out


def _measured_ms(runs: list[Record], batch: int, *parts: str) -> Optional[float]:
    """Milliseconds a step in the epochs' parts (compute_s; comm_s + wait_s), median over the
    runs' timed epochs; None where the records do not split the epoch's time."""
    values = [1e3 * sum(e[p] for p in parts) / math.ceil(e["examples"] / batch) for r in runs for e in timed_epochs(r)
              if all(e.get(p) is not None for p in parts) and (e.get("examples") or 0) > 0]
    return statistics.median(values) if values else None


def model_rows(records: list[Record], ab: AlphaBeta) -> list[dict[str, Any]]:
    """One row per (network, dtype, batch, parallelism) of the study's ok runs (threads within
    one rank are not modelled: no prediction there)."""
    nets = networks(records)
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for rec in records:
        key = (network_of(rec), dtype_of(rec))
        if _ok(rec) and key in nets:
            D, T, S = grid_of(rec)
            groups[(*key, batch_of(rec), D * T * S, T, S, int(rec.get("threads_per_rank") or 1))].append(rec)
    out = []
    for key in sorted(groups):
        runs = groups[key]
        network, dtype, batch = key[:3]
        info, itemsize, first = nets[(network, dtype)], DTYPE_BYTES.get(dtype, 4), runs[0]
        grid, threads = grid_of(first), int(first.get("threads_per_rank") or 1)
        M = int(_cfg(first, "parallel", "microbatches") or 1) if grid[2] > 1 else 1
        examples = int(run_examples(first) or 0)
        checks = [_check_bytes(r, info["sizes"], itemsize) for r in runs]
        row: dict[str, Any] = {
            "network": network, "dtype": dtype, "batch_size": batch, "parallelism": parallelism_of(first),
            "microbatches": M if grid[2] > 1 else None, "tpe_s": statistics.median(run_tpe(r) or 0.0 for r in runs),
            "oversubscribed": any(run_oversubscribed(r) for r in runs), "examples": examples, **checks[0],
            "equal": [c[f"equal_{k}"] for c in checks for k in ("activations", "gradients") if c[f"equal_{k}"] is not None],
            "measured_compute_ms": _measured_ms(runs, int(batch), "compute_s"),
            "measured_comm_ms": _measured_ms(runs, int(batch), "comm_s", "wait_s"),
        }
        if threads == 1 and examples:
            e = gridmodel.epoch_seconds(info["sizes"], grid, int(batch), M, examples, itemsize, info["rate"], ab)
            steps = sum(k for _, k in volumes.batches_of_epoch(examples, int(batch)))
            row.update({"model_s": e["total"], "ratio": e["total"] / row["tpe_s"] if row["tpe_s"] else None,
                        **{f"{k}_ms": 1e3 * e[k] / steps for k in ("compute", "data", "tensor", "pipeline")},
                        "comm_ms": 1e3 * (e["data"] + e["tensor"] + e["pipeline"]) / steps})
        out.append(row)
    return out


def _bytes(v: Any, row: dict[str, Any]) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _model_bytes(kind: str) -> Any:
    def fmt(v: Any, row: dict[str, Any]) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" + ("" if row.get(f"equal_{kind}") is not False else " (differs!)")
    return fmt


def _name(v: Any, row: dict[str, Any]) -> str:
    return str(v) + (f" (M={row['microbatches']})" if row.get("microbatches") else "") + OVER_MARK * bool(row.get("oversubscribed"))


MODEL_COLUMNS = [
    Column("batch_size", "B", text), Column("parallelism", "parallelism", _name),
    Column("tpe_s", "s/epoch", num(".4g")), Column("model_s", "model s/epoch", num(".4g")),
    Column("ratio", "model/measured", num(".2f")),
    Column("measured_compute_ms", "compute ms/step", num(".3g")), Column("compute_ms", "model", num(".3g")),
    Column("measured_comm_ms", "comm+wait ms/step", num(".3g")), Column("comm_ms", "model", num(".3g")),
    Column("counted_activations", "activations B/step", _bytes), Column("model_activations", "model", _model_bytes("activations")),
    Column("counted_gradients", "gradients B/step", _bytes), Column("model_gradients", "model", _model_bytes("gradients")),
]


def _model_notes(rows: list[dict[str, Any]], ab: AlphaBeta) -> list[str]:
    equal = [e for r in rows for e in r["equal"]]
    bad = [f"B={r['batch_size']} {r['parallelism']}" for r in rows if False in r["equal"]]
    notes = [f"bytes per step: {sum(equal)} of {len(equal)} counted volumes (per run, activations and blocking "
             f"gradients) equal the model's"]
    if bad:  # a WARNING line of its own: analyze repeats those on stderr
        notes.append(f"WARNING: the counted bytes a step differ from the model's volumes at {', '.join(bad)}")
    return notes + [
        f"model: parallel/volumes.py's volumes, alpha-beta {ab.describe()};",
        "  compute from the 1-rank, 1-thread runs' time per example at each batch. ms/step: measured (the epochs'",
        "  compute_s, comm_s + wait_s over their steps) | the model's (comm: data + tensor + pipeline; each in CSV/JSON).",
        "  gradients model '-': not one blocking Allreduce of the whole shard (shm, shared_batch: node-shared memory, no",
        "  message on one node; overlap: buckets; parallel.compression: 16-bit words), so not compared.",
    ]


def projection_rows(records: list[Record], ab: AlphaBeta, max_ranks: int,
                    named: Optional[list[NamedGrid]] = None) -> list[dict[str, Any]]:
    """Per (network, dtype, batch) of the study and P (or named grid): the predicted best grid
    and the best of each parallelism, for an epoch of FULL_EPOCH examples."""
    nets, out = networks(records), []
    batches: dict[tuple[str, str], set[int]] = defaultdict(set)
    for rec in records:
        if _ok(rec):
            batches[(network_of(rec), dtype_of(rec))].add(int(batch_of(rec) or 0))
    for (network, dtype), info in sorted(nets.items()):
        sizes, rate, itemsize = info["sizes"], info["rate"], DTYPE_BYTES.get(dtype, 4)
        for batch in sorted(batches[(network, dtype)]):
            one = gridmodel.best_of(sizes, (1, 1, 1), batch, FULL_EPOCH, itemsize, rate, ab).seconds
            base = {"network": network, "dtype": dtype, "batch_size": batch, "one_rank_s": one}
            if named:
                preds = [gridmodel.best_of(sizes, g, batch, FULL_EPOCH, itemsize, rate, ab, M) for g, M in named]
                best = min(preds, key=lambda p: p.seconds)
                out += [{**base, "ranks": math.prod(p.grid), "best": p.name + " *" * (p is best), "best_s": p.seconds,
                         "speedup": one / p.seconds} for p in preds]
                continue
            for P in (int(p) for p in rank_grid(max_ranks) if p >= min(MIN_PROJECTED_RANKS, max_ranks)):
                preds = gridmodel.project(sizes, P, batch, FULL_EPOCH, itemsize, rate, ab)
                row = {**base, "ranks": P, "best": preds[0].name, "best_s": preds[0].seconds, "speedup": one / preds[0].seconds}
                for fam in ("data", "tensor", "pipeline"):
                    mine = [p for p in preds if gridmodel.family(p.grid) == fam]
                    row[f"{fam}_grid"] = mine[0].name if mine else None
                    row[f"{fam}_s"] = mine[0].seconds if mine else None
                out.append(row)
    return out


PROJECTION_COLUMNS = [
    Column("batch_size", "B", text), Column("ranks", "P", text), Column("best", "predicted best grid", text),
    Column("best_s", "s/epoch", num(".3g")), Column("speedup", "x 1 rank", num(".3g")),
    Column("data_s", "data P s/epoch", num(".3g")),
    Column("tensor_grid", "best with tensor", text), Column("tensor_s", "s/epoch", num(".3g")),
    Column("pipeline_grid", "best with pipeline", text), Column("pipeline_s", "s/epoch", num(".3g")),
]
NAMED_COLUMNS = [PROJECTION_COLUMNS[0], PROJECTION_COLUMNS[1], Column("best", "grid", text), *PROJECTION_COLUMNS[3:5]]


def _projection_verdicts(rows: list[dict[str, Any]], named: bool) -> list[str]:
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["batch_size"]].append(r)
    lines = []
    for batch, rs in sorted(by.items()):
        best = min(rs, key=lambda r: r["best_s"])
        ends = "" if len(rs) < 2 or named else (f"; best grid at P={rs[0]['ranks']}: {rs[0]['best']}, "
                                                f"at P={rs[-1]['ranks']}: {rs[-1]['best']}")
        lines.append(f"B={batch}: least time {best['best'].rstrip(' *')} ({best['ranks']} ranks, {best['best_s']:.3g} s/epoch, "
                     f"{best['speedup']:.3g}x 1 rank){ends}")
    return lines


def tables(records: list[Record], measured: AlphaBeta, cluster: AlphaBeta, max_ranks: int,
           named: Optional[list[NamedGrid]] = None) -> list[Table]:
    """The model against the study, and the projection; none unless some run splits the model."""
    if not is_study(records):
        return []
    if not networks(records):
        return [Table("model_parallel_model", "Alpha-beta model of the grids", MODEL_COLUMNS, [],
                      ["WARNING: no grid model: no ok 1-rank, 1-thread run to take the compute time per example from "
                       "(add one per network and batch to the study)"])]
    out = []
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in model_rows(records, measured):
        grouped[(r["network"], r["dtype"])].append(r)
    for (network, dtype), rows in grouped.items():
        out.append(Table("model_parallel_model", f"Alpha-beta model of the grids against the measurements: {network} ({dtype})",
                         MODEL_COLUMNS, rows, _model_notes(rows, measured), "batch_size"))
    projected: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in projection_rows(records, cluster, max_ranks, named):
        projected[(r["network"], r["dtype"])].append(r)
    for (network, dtype), rows in projected.items():
        out.append(Table("model_parallel_projection",
                         f"Projection to a cluster: {network} ({dtype}), an epoch of {FULL_EPOCH:,} examples",
                         NAMED_COLUMNS if named else PROJECTION_COLUMNS, rows, _projection_verdicts(rows, bool(named)),
                         "batch_size"))
    if projected:
        out[-1].notes += [f"alpha-beta: {cluster.describe()}",
                          "grids: every data x tensor and data x pipeline one pbp_hpc builds for P ranks (each pipeline at its"
                          " best M, a power of two)" if not named else "grids: as named with --grid (* the best per batch)",
                          "assumptions:"] + [f"  - {a}" for a in gridmodel.ASSUMPTIONS]
    return out
