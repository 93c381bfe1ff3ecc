"""The model-parallel study's figure as a PNG (runs of jobs/model_parallel.yaml; see analyze.model_parallel).

`model_parallel_vs_batch.png`: which parallelism wins at which batch -- time per epoch against
the batch, log axes, one series per parallelism (the same colour and marker in every panel), one
panel per network and precision. Where a panel's batches had epochs of different sizes (the
study's smaller subsets at small batches), every time is scaled to an epoch of 50,000 examples
(seconds per example x 50,000), and the axis says so. Oversubscribed runs are drawn hollow;
min-max bars span the repetitions.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from pbp_hpc.analyze import figstyle
from pbp_hpc.analyze.model_parallel import FULL_EPOCH, is_study, rows
from pbp_hpc.analyze.records import Record

NAME = "model_parallel_vs_batch.png"


def _series_order(rs: list[dict[str, Any]]) -> list[str]:
    keyed = {r["parallelism"]: (r["data"] * r["tensor"] * r["pipeline"], r["tensor"], r["pipeline"], r["threads"]) for r in rs}
    return sorted(keyed, key=lambda p: (keyed[p], p))


def draw(rs: list[dict[str, Any]], path: Path, written: list[Path]) -> None:
    """One panel per (network, dtype): s/epoch against batch, a series per parallelism."""
    panels: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rs:
        panels[(r["network"], r["dtype"])].append(r)
    styles = figstyle.series_styles(_series_order(rs))
    fig, axes = figstyle.panels("Which parallelism wins at which batch: time per epoch", len(panels), min(2, len(panels)))
    over = False
    for ax, ((network, dtype), prs) in zip(axes, sorted(panels.items())):
        sizes = {r["examples"] for r in prs}
        scaled = len(sizes) > 1 or None in sizes
        for name in styles:
            pts = sorted((r for r in prs if r["parallelism"] == name), key=lambda r: r["batch_size"])
            if not pts:
                continue
            k = [FULL_EPOCH / r["examples"] if scaled and r["examples"] else 1.0 for r in pts]
            figstyle.draw_series(ax, [r["batch_size"] for r in pts], [r["tpe_s"] * f for r, f in zip(pts, k)],
                                 [r["tpe_min_s"] * f for r, f in zip(pts, k)], [r["tpe_max_s"] * f for r, f in zip(pts, k)],
                                 [bool(r["oversubscribed"]) for r in pts], styles[name], linewidth=1.4)
            over = over or any(r["oversubscribed"] for r in pts)
        ax.set_title(f"{network} ({dtype})", fontsize="medium")
        ax.set_xlabel("batch (global)")
        ax.set_ylabel(f"s per epoch of {FULL_EPOCH:,} examples (scaled)" if scaled
                      else f"s per epoch ({next(iter(sizes)):,.0f} examples)")
        figstyle.log2_axis(ax, [r["batch_size"] for r in prs])
        figstyle.plain_log(ax, "y")
    handles = [figstyle.series_handle(name, st, linewidth=1.4) for name, st in styles.items()]
    if over:
        handles.append(figstyle.oversubscribed_handle())
    figstyle.legend_below(fig, handles, "parallelism")
    figstyle.save(fig, path, written)


def write_all(records: Iterable[Record], outdir: Path) -> list[Path]:
    """The figure, for runs that split the model; the paths written."""
    records = list(records)
    written: list[Path] = []
    if not is_study(records):
        return written
    rs = rows(records)
    if not figstyle.varies(rs, "batch_size", "model-parallel figure"):
        return written
    outdir.mkdir(parents=True, exist_ok=True)
    draw(rs, outdir / NAME, written)
    return written
