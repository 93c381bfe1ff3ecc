"""The race's rows, its tables in the issue's layout (markdown), and its goals.

Goals (issue 26): each as-typed cell (1 rank on 1 core, 2 ranks on 2 cores) <= 0.95x JAX and
<= 0.80x PyTorch on the same cores; 2 ranks as typed no slower than 1 rank x 2 threads; a cell
that misses is judged against its GEMM floor: within 8% of it (typed / floor <= 1.08).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from pbp_hpc.bench.race import CELLS

TITLES = {"typed1": "1 rank, 1 core", "jax1": "JAX 1 core", "torch1": "PyTorch 1 thread", "typed2": "2 ranks as typed",
          "threads2": "1 rank × 2 threads", "jax2": "JAX 2 cores", "torch2": "PyTorch 2 threads"}
GOALS = {"jax": 0.95, "torch": 0.80, "threads": 1.00, "floor": 1.08}
# the ratio columns: (name, numerator cell, denominator cell or "floor", goal key)
RATIOS = [("1 core /JAX", "typed1", "jax1", "jax"), ("1 core /PyTorch", "typed1", "torch1", "torch"),
          ("1 core /floor", "typed1", "floor", "floor"),
          ("2 ranks /JAX", "typed2", "jax2", "jax"), ("2 ranks /PyTorch", "typed2", "torch2", "torch"),
          ("2 ranks /1×2 threads", "typed2", "threads2", "threads"), ("2 ranks /floor", "typed2", "floor", "floor")]
FLOORS = [("GEMM floor 1 core", "typed1"), ("GEMM floor 2 ranks", "typed2")]


def _median(xs: list[float]) -> Optional[float]:
    return float(np.median(xs)) if xs else None


def rows_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, network, batch): each cell's median over repetitions, its floors, the ratios."""
    groups: dict[tuple[str, str, int], dict[str, Any]] = {}
    for rec in records:
        key = (rec["mode"], rec["net"], rec["batch"])
        row = groups.setdefault(key, {"mode": key[0], "net": key[1], "batch": key[2], "times": {}, "errors": {},
                                      "floor": {}, "splits": {}})
        if rec["type"] == "floor":
            row["floor"][rec["cell"]] = rec.get("tpe")
            if rec.get("error"):
                row["errors"][f"floor {rec['cell']}"] = rec["error"]
            continue
        if rec.get("tpe") is not None:
            row["times"].setdefault(rec["cell"], []).append(rec["tpe"])
        elif rec.get("error"):
            row["errors"][rec["cell"]] = rec["error"]
        if rec["cell"] in ("typed1", "typed2", "threads2") and rec.get("ranks"):
            grid = rec.get("grid") or {}
            row["splits"][rec["cell"]] = (f"{rec['ranks']}x{rec['threads']} "
                                         f"{rec.get('reducer_used') or rec.get('reducer')}"
                                         + (f" tensor {grid['tensor']}" if grid.get("tensor", 1) > 1 else "")
                                         + (f" pipeline {grid['pipeline']}" if grid.get("pipeline", 1) > 1 else ""))
    rows = []
    for row in groups.values():
        tpe = {cell: _median(row["times"].get(cell, [])) for cell in CELLS}
        ratios = {}
        for name, num, den, _ in RATIOS:
            d = row["floor"].get(num) if den == "floor" else tpe.get(den)
            ratios[name] = tpe[num] / d if tpe.get(num) and d else None
        rows.append({**row, "tpe": tpe, "ratios": ratios})
    return rows


def _fmt(v: Optional[float], fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ratio(v: Optional[float], goal: str, bold: bool) -> str:
    text = _fmt(v, ".2f")
    return f"**{text}**" if bold and v is not None and v > GOALS[goal] else text


def markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def tables(rows: list[dict[str, Any]]) -> str:
    """The issue's table (s/epoch; as-typed cells that miss a goal in bold), then the ratios (misses in bold)."""
    times = markdown(["mode, net, batch"] + [TITLES[c] for c in CELLS], [
        [f"{r['mode']} {r['net']} {r['batch']}"]
        + [f"**{_fmt(r['tpe'][c])}**" if c in ("typed1", "typed2") and _misses(r, c) else _fmt(r["tpe"][c]) for c in CELLS]
        for r in rows])
    ratios = markdown(["mode, net, batch"] + [n for n, _ in FLOORS] + [n for n, *_ in RATIOS], [
        [f"{r['mode']} {r['net']} {r['batch']}"] + [_fmt(r["floor"].get(c)) for _, c in FLOORS]
        + [_ratio(r["ratios"][n], goal, goal != "floor") for n, _, _, goal in RATIOS] for r in rows])
    return f"s/epoch (median of the repetitions; each the median of its epochs):\n\n{times}\n\n" \
           f"ratios (as typed / the column; the goals: /JAX <= {GOALS['jax']}, /PyTorch <= {GOALS['torch']}, " \
           f"2 ranks /1×2 threads <= {GOALS['threads']}; a cell that misses: /floor <= {GOALS['floor']}):\n\n{ratios}"


def _misses(row: dict[str, Any], cell: str) -> bool:
    return any(v is not None and v > GOALS[goal] for n, num, den, goal in RATIOS
               if num == cell and den != "floor" for v in [row["ratios"][n]])


def checks(rows: list[dict[str, Any]]) -> list[str]:
    """Each as-typed cell against each goal; a miss says whether the cell is within 8% of its GEMM floor."""
    out = []
    for r in rows:
        for name, num, den, goal in RATIOS:
            v = r["ratios"][name]
            if den == "floor" or v is None:
                continue
            ok = v <= GOALS[goal]
            line = f"  {'ok  ' if ok else 'MISS'} {r['mode']} {r['net']} b{r['batch']} {name} = {v:.3f} (<= {GOALS[goal]:.2f})"
            floor = r["ratios"][f"{'1 core' if num == 'typed1' else '2 ranks'} /floor"]
            if not ok and floor is not None:
                line += f"; {floor:.3f}x its GEMM floor ({'within' if floor <= GOALS['floor'] else 'not within'} 8%)"
            out.append(line)
        for cell, err in r["errors"].items():
            out.append(f"  n/a  {r['mode']} {r['net']} b{r['batch']} {cell}: {err}")
    return out


def splits(rows: list[dict[str, Any]]) -> list[str]:
    """How each pbp_hpc cell ran (ranks x threads, reducer, grid), as train's record says."""
    return [f"  {r['mode']} {r['net']} b{r['batch']}: " + "; ".join(f"{TITLES[c]} ran as {s}" for c, s in r["splits"].items())
            for r in rows]
