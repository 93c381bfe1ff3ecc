"""From the worker's records to what is shown: rows, the table, the goal checks, and the best
splits merged into the file pbp_hpc.hybrid reads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pbp_hpc.bench.cases import Spec, splits_of
from pbp_hpc.parallel import hybrid

COLUMNS = ["net", "batch", "split", "TPE s", "GFLOP/s", "peak%", "in%", "GEMM s", "/GEMM", "torch s", "/torch",
           "jax s", "/jax", "speedup", "comm%", "KB/step", "RSS MB", "budget MB", "heap B/step", "best"]
GOALS = {"gemm_1024": 1.08, "gemm_128": 1.20, "torch": 0.80, "speedup_1024": 1.85, "speedup_128": 1.60}
TYPED = "as typed"  # the split column of the rows of `mpiexec -n C python -m pbp_hpc.train` (bench.typed)
TUNED = "tuned"  # ... and of the same command tuned by hand, run right after it (bench.typed.TUNED_*)


def _median(xs: list[float]) -> Optional[float]:
    return float(np.median(xs)) if xs else None


def rows_of(records: list[dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """One row per (network, batch, split), with every column computed; then the group's `as typed`
    row where the records have one."""
    from pbp_hpc.engine.model import flops_per_example

    head = next(r for r in records if r["type"] == "header")
    peaks = head["peak_gflops"]
    typed = {(r["net"], r["batch"]): r for r in records if r["type"] == "typed"}
    tuned = {(r["net"], r["batch"]): r for r in records if r["type"] == "tuned"}
    rows: list[dict[str, Any]] = []
    for g in (r for r in records if r["type"] == "group"):
        by = {(c["kind"], c["ranks"], c["threads"], c["label"]): c for c in g["cases"]}
        med = {k: _median(c["times"]) for k, c in by.items()}
        base = med.get(("ours", 1, 1, "1x1"))
        flops = flops_per_example(g["layers"]) * g["n_train"]
        full = [(r, t) for r, t in splits_of(spec.cores) if r * t == spec.cores]
        timed_full = {(r, t): med.get(("ours", r, t, f"{r}x{t}")) for r, t in full}
        best = min((v, k) for k, v in timed_full.items() if v is not None)[1] if any(timed_full.values()) else None
        for c in g["cases"]:
            if c["kind"] != "ours":
                continue
            r, t, label = c["ranks"], c["threads"], c["label"]
            tpe = med[("ours", r, t, label)]
            gemm = med.get(("gemm", r, t, label))
            if gemm is None and not c.get("grid"):  # a reducer's row: its split's GEMMs (a grid's GEMMs are others)
                gemm = med.get(("gemm", r, t, f"{r}x{t}"))
            torch = med.get(("torch", 1, r * t, f"1x{r * t}"))
            jax = med.get(("jax", 1, r * t, f"1x{r * t}"))
            comm = _median(c["comm"]) if r > 1 else None
            mem = [m for m in g["memory"].get(str(r), [])]
            peak_rss = max((m["peak_rss"] for m in mem), default=None)
            budget = max((m["budget"] for m in mem), default=None)
            growth = max((m["heap_growth"] / m["steps"] for m in mem), default=None)
            base_rss = g["memory"]["base_rss"]
            rows.append({
                "net": g["net"], "layers": g["layers"], "batch": g["batch"], "split": label, "kind": "ours",
                "ranks": r, "threads": t,
                "reducer": c["reducer"], "n_train": g["n_train"], "times": c["times"],
                "tpe": tpe, "gflops": flops / tpe / 1e9 if tpe else None, "active": c.get("active"),
                "peak_frac": (flops / tpe / 1e9) / peaks[f"{r}x{t}"] if tpe and f"{r}x{t}" in peaks else None,
                "gemm": gemm, "gemm_ratio": tpe / gemm if tpe and gemm else None,
                "torch": torch, "torch_ratio": tpe / torch if tpe and torch else None,
                "jax": jax, "jax_ratio": tpe / jax if tpe and jax else None,
                "speedup": base / tpe if base and tpe else None, "comm_frac": comm,
                "grid": c.get("grid", ""), "bytes_per_step": c.get("bytes_per_step"),
                "rss_mb": (peak_rss - base_rss) / 2**20 if peak_rss and not _variant(c) else None,
                "rss_abs_mb": peak_rss / 2**20 if peak_rss and not _variant(c) else None,
                "budget_mb": budget / 2**20 if budget and not _variant(c) else None,
                "heap": growth if not _variant(c) else None,
                "best": (r, t) == best and not _variant(c),
            })
        for found, split in ((typed, TYPED), (tuned, TUNED)):
            if (g["net"], g["batch"]) in found:
                rows.append(_typed_row(found[(g["net"], g["batch"])], g, med, base, flops, peaks, spec, split))
    return rows


def _typed_row(rec: dict[str, Any], g: dict[str, Any], med: dict[Any, Optional[float]], base: Optional[float],
               flops: float, peaks: dict[str, float], spec: Spec, split: str = TYPED) -> dict[str, Any]:
    """The `as typed` row: its epochs' times, against the job's cases of the split it ran as
    (C ranks x the threads train chose): that split's GEMMs and peak, the peers on C threads."""
    r, t = rec.get("ranks") or spec.cores, rec.get("threads") or 1
    tpe = _median(rec["times"])
    flops = flops / g["n_train"] * rec.get("n_train", g["n_train"])
    gemm = med.get(("gemm", r, t, f"{r}x{t}"))
    torch, jax = med.get(("torch", 1, r * t, f"1x{r * t}")), med.get(("jax", 1, r * t, f"1x{r * t}"))
    comm = _median(rec["comm"]) if r > 1 else None
    return {
        "net": g["net"], "layers": g["layers"], "batch": g["batch"], "split": split, "kind": "typed",
        "ranks": r, "threads": t, "reducer": rec.get("reducer"), "n_train": rec.get("n_train", g["n_train"]),
        "times": rec["times"], "command": rec.get("command"), "error": rec.get("error"),
        "tpe": tpe, "gflops": flops / tpe / 1e9 if tpe else None, "active": rec.get("active"),
        "peak_frac": (flops / tpe / 1e9) / peaks[f"{r}x{t}"] if tpe and f"{r}x{t}" in peaks else None,
        "gemm": gemm, "gemm_ratio": tpe / gemm if tpe and gemm else None,
        "torch": torch, "torch_ratio": tpe / torch if tpe and torch else None,
        "jax": jax, "jax_ratio": tpe / jax if tpe and jax else None,
        "speedup": base / tpe if base and tpe else None, "comm_frac": comm,
        "grid": rec.get("grid"), "bytes_per_step": rec.get("bytes_per_step"),
        "rss_mb": None, "rss_abs_mb": None, "budget_mb": None, "heap": None, "best": False,
    }


def _variant(c: dict[str, Any]) -> bool:
    """A row added to compare reducers (not the table's main reducer)."""
    return "/" in c["label"]


def _fmt(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [[
        r["net"], str(r["batch"]), r["split"], _fmt(r["tpe"], ".3f"), _fmt(r["gflops"], ".1f"),
        _fmt(None if r["peak_frac"] is None else 100 * r["peak_frac"], ".0f"),
        _fmt(None if r["tpe"] is None else 100.0 if r["active"] is None else 100 * r["active"], ".0f"),
        _fmt(r["gemm"], ".3f"), _fmt(r["gemm_ratio"], ".3f"), _fmt(r["torch"], ".3f"), _fmt(r["torch_ratio"], ".2f"),
        _fmt(r.get("jax"), ".3f"), _fmt(r.get("jax_ratio"), ".2f"),
        _fmt(r["speedup"], ".2f"), _fmt(None if r["comm_frac"] is None else 100 * r["comm_frac"], ".1f"),
        _fmt(sent_kb(r.get("bytes_per_step")), ".1f"), _fmt(r["rss_mb"], ".0f"), _fmt(r["budget_mb"], ".0f"), _fmt(r["heap"], ".1f"), "*" if r["best"] else "",
    ] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def sent_kb(counted: Optional[dict[str, Any]]) -> Optional[float]:
    """KB a rank sends per step (activations + gradients, as train's `bytes_per_step` counts them)."""
    if not counted or all(v is None for v in counted.values()):
        return None
    return sum(float(v or 0) for v in counted.values()) / 1e3


def checks(rows: list[dict[str, Any]], cores: int) -> list[str]:
    """The issue's goals, each as measured in this run."""
    out = []
    for r in rows:
        if r["split"] == TYPED and r["tpe"]:  # the goal: as typed within 10% of tuned, side by side
            twin = next((x for x in rows if x["split"] == TUNED and x["net"] == r["net"] and x["batch"] == r["batch"]
                         and x["tpe"]), None)
            if twin is not None:
                out.append(_check(f"{r['net']} b{r['batch']} as typed / tuned", r["tpe"] / twin["tpe"], "<=", 1.10))
        if "/" in r["split"] or r.get("kind", "ours") != "ours":
            continue
        if r["ranks"] == 1 and r["gemm_ratio"] is not None:
            limit = GOALS["gemm_1024"] if r["batch"] >= 1024 else GOALS["gemm_128"]
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: TPE/GEMM", r["gemm_ratio"], "<=", limit))
        if r["ranks"] == 1 and r["torch_ratio"] is not None:
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: TPE/torch", r["torch_ratio"], "<=", GOALS["torch"]))
        if r["net"] == "Net-1h" and r["ranks"] == cores > 1 and r["threads"] == 1 and r["speedup"] is not None:
            limit = GOALS["speedup_1024"] if r["batch"] >= 1024 else GOALS["speedup_128"] if r["batch"] >= 128 else None
            if limit is not None:
                out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: speedup", r["speedup"], ">=", limit))
        if r["budget_mb"] is not None and r["rss_mb"] is not None:
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: RSS MB", r["rss_mb"], "<=", r["budget_mb"]))
    return out


def _check(what: str, value: float, op: str, limit: float) -> str:
    ok = value <= limit if op == "<=" else value >= limit
    return f"  {'ok  ' if ok else 'MISS'} {what} = {value:.3f} ({op} {limit:.3f})"


def write_splits(path: Path, rows: list[dict[str, Any]], cores: int, host: str) -> None:
    """Merge this run's best splits into the JSON file pbp_hpc.hybrid reads."""
    doc = hybrid.load(path) or {"about": hybrid.FILE_DOC, "machines": {}}
    machine = doc["machines"].setdefault(f"{cores} cores", {"cores": cores, "networks": {}})
    machine["host"] = host
    machine["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in rows:
        if r["best"]:
            net = machine["networks"].setdefault(hybrid.network_key(r["layers"]), {"name": r["net"], "batches": {}})
            tried = {x["split"]: round(x["tpe"], 4) for x in rows if x["net"] == r["net"] and x["batch"] == r["batch"]
                     and x["ranks"] * x["threads"] == cores and "/" not in x["split"] and x["tpe"]
                     and x.get("kind", "ours") == "ours"}
            net["batches"][str(r["batch"])] = {"ranks": r["ranks"], "threads": r["threads"], "tpe_s": tried}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
