"""The grid model's projection as a PNG (analyze.grid_projection; the model is analyze.gridmodel).

`model_parallel_projection.png`: which parallelism wins at which scale -- predicted time per
epoch of 50,000 examples against the ranks P (log axes), one panel per network, precision and
batch, one series per parallelism: data only, the best grid with tensor parallelism, the best
with pipeline parallelism (each at its best M), and one rank as a dashed line. The caption
gives alpha, beta and the model's assumptions.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from pbp_hpc.analyze import figstyle, gridmodel
from pbp_hpc.analyze.grid_projection import networks, projection_rows
from pbp_hpc.analyze.model_parallel import FULL_EPOCH, is_study
from pbp_hpc.analyze.perfmodel import AlphaBeta
from pbp_hpc.analyze.records import Record

NAME = "model_parallel_projection.png"
SERIES = {"data": "data P", "tensor": "best with tensor", "pipeline": "best with pipeline"}


def draw(rows: list[dict[str, Any]], ab: AlphaBeta, path: Path, written: list[Path]) -> None:
    panels: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(r["network"], r["dtype"], r["batch_size"])].append(r)
    caption = f"alpha-beta: {ab.describe()}. Assumptions: " + "; ".join(gridmodel.ASSUMPTIONS) + "."
    fig, axes = figstyle.panels(f"Which parallelism wins at which scale: the alpha-beta model, {FULL_EPOCH:,} examples an epoch",
                                len(panels), min(4, len(panels)), width=4.2, height=3.4, caption=caption)
    styles = figstyle.series_styles(list(SERIES))
    for ax, ((network, dtype, batch), prs) in zip(axes, sorted(panels.items())):
        prs = sorted(prs, key=lambda r: r["ranks"])
        ranks = [r["ranks"] for r in prs]
        for fam in SERIES:
            pts = [(r["ranks"], r[f"{fam}_s"]) for r in prs if r.get(f"{fam}_s")]
            if pts:
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                figstyle.draw_series(ax, x, y, y, y, [False] * len(x), styles[fam], linewidth=1.4)
        ax.axhline(prs[0]["one_rank_s"], color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"{network} ({dtype}), B = {batch}", fontsize="medium")
        ax.set_xlabel("ranks P")
        ax.set_ylabel("predicted s per epoch")
        figstyle.log2_axis(ax, ranks)
        ax.set_yscale("log")
        figstyle.plain_log(ax, "y")
    handles = [figstyle.series_handle(label, styles[fam], linewidth=1.4) for fam, label in SERIES.items()]
    handles.append(figstyle.series_handle("1 rank", {"color": "k", "linestyle": "--"}, linewidth=0.8))
    figstyle.legend_below(fig, handles, "parallelism", ncols=4)
    figstyle.save(fig, path, written)


def write_all(records: Iterable[Record], outdir: Path, ab: AlphaBeta, max_ranks: int) -> list[Path]:
    """The figure, for a model-parallel study with 1-rank runs to take the compute rate from."""
    records = list(records)
    written: list[Path] = []
    if not is_study(records) or not networks(records):
        return written
    rows = projection_rows(records, ab, max_ranks)
    if not figstyle.varies(rows, "ranks", "model-parallel projection figure"):
        return written
    outdir.mkdir(parents=True, exist_ok=True)
    draw(rows, ab, outdir / NAME, written)
    return written
