"""The gradient noise scale against training progress: B_noise at every validation pass of every
run that estimated it (pbp_hpc/parallel/noise_scale.py), one figure per case, each run's batch
drawn as a dotted line of its colour -- a batch above the curve is past where larger batches pay.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

from pbp_hpc.analyze.figstyle import COLORS, MARKERS, chunks, panels, plain_log, save, varies
from pbp_hpc.analyze.points import Case, case_of
from pbp_hpc.analyze.records import Record, batch_of, implementation_of


def _curve(rec: Record) -> list[tuple[float, float]]:
    return [(float(p["epochs"]), float(p["b_noise"])) for p in rec.get("evaluations") or []
            if p.get("b_noise") is not None and p.get("epochs") is not None and p["b_noise"] > 0]


def write_all(records: Iterable[Record], outdir: Path) -> list[Path]:
    """One figure per case with runs that estimated the noise scale at two or more passes."""
    by_case: dict[Case, list[Record]] = defaultdict(list)
    for rec in records:
        if rec.get("status", "ok") == "ok" and len(_curve(rec)) > 1:
            by_case[case_of(rec)].append(rec)
    written: list[Path] = []
    for case, runs in by_case.items():
        points = [{"epochs": e} for r in runs for e, _ in _curve(r)]
        if not varies(points, "epochs", f"{case.label()}: no noise-scale figure"):
            continue
        runs.sort(key=lambda r: (batch_of(r) or 0, r.get("ranks") or 1, str(r.get("key"))))
        groups = chunks(runs)
        fig, axes = panels(f"{case.label()}\ngradient noise scale B_noise = tr(Sigma)/|G|^2 during training "
                           "(dotted: the run's batch)", len(groups), min(2, len(groups)))
        for ax, group in zip(axes, groups):
            for i, rec in enumerate(group):
                xs, ys = zip(*_curve(rec))
                style = {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)]}
                label = f"B={batch_of(rec)}, {implementation_of(rec)} {rec.get('ranks') or 1}x{rec.get('threads_per_rank') or 1}"
                ax.plot(xs, ys, label=label, markersize=4, **style)
                if batch_of(rec):
                    ax.axhline(batch_of(rec), color=style["color"], linestyle=":", linewidth=1)
            ax.set_yscale("log")
            plain_log(ax, "y")
            ax.set_xlabel("epochs of training")
            ax.set_ylabel("B_noise (examples, log scale)")
            ax.legend(fontsize="small")
        save(fig, outdir / f"noise_scale_{_slug(case)}.png", written)
    return written


def _slug(case: Case) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", f"{case.network}_{case.dtype}_n{case.n_train}").strip("-")


