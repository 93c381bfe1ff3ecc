"""The figure of where the time goes: per point, its time per epoch stacked as compute,
communication (the transfers), waiting for other ranks and the rest (pbp_hpc.parallel.accounting),
so a scaling curve's loss shows at a glance. One figure per case; points of results files written
before schema 3 (no wait_s) are left out, and a case with fewer than two such points gets none.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from pbp_hpc.analyze.figstyle import panels, save, varies
from pbp_hpc.analyze.points import Case, Point

PARTS = (("compute", "compute_fraction", "tab:blue"), ("communication", "comm_fraction", "tab:orange"),
         ("waiting for other ranks", "wait_fraction", "tab:red"), ("other", "other_fraction", "tab:gray"))


def _label(p: Point) -> str:
    return f"{p.implementation}\n{p.ranks}x{p.threads}" + ("!" if p.oversubscribed else "") + f"\nB={p.batch_size}"


def figures(points: list[Point], outdir: Path, slugs: dict[Case, str]) -> list[Path]:
    """One stacked-bar figure per case with at least two points that give the split."""
    written: list[Path] = []
    by_case: dict[Case, list[Point]] = defaultdict(list)
    for p in points:
        if p.wait_fraction is not None and p.compute_fraction is not None:
            by_case[p.case].append(p)
    for case, pts in by_case.items():
        rows = [{"point": _label(p).replace("\n", " ")} for p in pts]
        if not varies(rows, "point", f"{case.label()}: no time-split figure"):
            continue
        fig, (ax,) = panels(f"{case.label()}\nwhere the time per epoch goes (slowest rank; median over timed epochs "
                            "and repetitions)", 1, 1, width=max(5.4, 0.9 * len(pts) + 2))
        x = list(range(len(pts)))
        bottom = [0.0] * len(pts)
        for name, key, color in PARTS:
            h = [p.tpe_s * (getattr(p, key) or 0.0) for p in pts]
            ax.bar(x, h, bottom=bottom, color=color, label=name, width=0.7)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set_xticks(x, [_label(p) for p in pts], fontsize=8)
        ax.set_ylabel("time per epoch (s)")
        ax.set_xlabel("implementation, ranks x threads (! oversubscribed), global batch")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        save(fig, outdir / f"time_split_{slugs[case]}.png", written)
    return written
