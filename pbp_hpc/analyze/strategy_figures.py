"""The strategy study's figures as PNG files (runs of jobs/strategies.yaml; see analyze.strategies).

Per case (network, precision, training-set size) and target:

* `strategies_accuracy_vs_time_*.png`: validation accuracy against training time, one line per
  strategy (one colour and marker each, the same in every panel), one panel per straggler
  factor and rank count; the target as a dashed line.
* `strategies_staleness_*.png`: how stale the asynchronous strategies' updates were: the share of
  updates (y) with each staleness (x), one bar series per strategy, a panel per straggler factor
  and rank count.

Repetitions of a configuration are drawn each (thin lines of the same style), not averaged:
their spread is what a reader should see.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from matplotlib.lines import Line2D

from pbp_hpc.analyze.accuracy import straggler_of, strategy_of, target_of
from pbp_hpc.analyze.accuracy_figures import _grid, _legend, _save, _style
from pbp_hpc.analyze.points import Case, case_of
from pbp_hpc.analyze.records import Record
from pbp_hpc.analyze.strategies import ORDER, is_study


def _panels(runs: list[Record]) -> dict[tuple[float, int, int], list[Record]]:
    out: dict[tuple[float, int, int], list[Record]] = defaultdict(list)
    for r in runs:
        out[(straggler_of(r), int(r.get("ranks") or 1), int(r.get("batch_size") or 0))].append(r)
    return dict(sorted(out.items()))


def _panel_title(key: tuple[float, int, int]) -> str:
    factor, ranks, batch = key
    return f"straggler {'none' if factor == 1.0 else f'x{factor:g}'}, P={ranks}, B={batch}"


def _strategy_styles(runs: list[Record]) -> dict[str, dict[str, Any]]:
    names = sorted({strategy_of(r) for r in runs}, key=lambda s: (ORDER.index(s) if s in ORDER else 99, s))
    return {name: _style(i) for i, name in enumerate(names)}


def accuracy_vs_time(runs: list[Record], case: Case, target: float, path: Path, written: list[Path]) -> None:
    panels = _panels(runs)
    styles = _strategy_styles(runs)
    fig, axes = _grid(f"Validation accuracy against training time, strategies: {case.label()}", len(panels),
                      min(3, len(panels)))
    for ax, (key, rs) in zip(axes, panels.items()):
        for r in rs:
            curve = [p for p in r.get("evaluations") or [] if p.get("val_accuracy") is not None]
            if not curve:
                continue
            st = styles[strategy_of(r)]
            ax.plot([p["time_s"] for p in curve], [100 * p["val_accuracy"] for p in curve], color=st["color"],
                    marker=st["marker"], markersize=4, linewidth=1.2)
        ax.axhline(100 * target, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(_panel_title(key), fontsize="medium")
        ax.set_xlabel("training time (s, evaluations excluded)")
        ax.set_ylabel("validation accuracy (%)")
        lo = min((100 * p["val_accuracy"] for r in rs for p in r.get("evaluations") or [] if p.get("val_accuracy")),
                 default=100 * target - 5)
        ax.set_ylim(max(lo, 100 * target - 10) - 0.5, 100)
    handles = [Line2D([], [], label=name, **st) for name, st in styles.items()]
    handles.append(Line2D([], [], color="k", linestyle="--", label=f"target {100 * target:g}%"))
    _legend(fig, handles, "strategy")
    _save(fig, path, written)


def staleness(runs: list[Record], case: Case, path: Path, written: list[Path]) -> bool:
    stale = [r for r in runs if r.get("staleness_histogram")]
    if not stale:
        return False
    panels = _panels(stale)
    styles = _strategy_styles(stale)
    fig, axes = _grid(f"Staleness of asynchronous updates: {case.label()}", len(panels), min(3, len(panels)))
    for ax, (key, rs) in zip(axes, panels.items()):
        by: dict[str, np.ndarray] = {}
        for r in rs:  # repetitions pooled: a histogram of every update of the configuration
            h = np.asarray(r["staleness_histogram"], dtype=float)
            old = by.get(strategy_of(r), np.zeros(0))
            n = max(len(old), len(h))
            by[strategy_of(r)] = np.pad(old, (0, n - len(old))) + np.pad(h, (0, n - len(h)))
        width = 0.8 / max(len(by), 1)
        for i, (name, h) in enumerate(sorted(by.items(), key=lambda kv: list(styles).index(kv[0]))):
            x = np.arange(len(h))
            ax.bar(x + (i - (len(by) - 1) / 2) * width, 100 * h / h.sum(), width=width, color=styles[name]["color"],
                   label=name)
        ax.set_title(_panel_title(key), fontsize="medium")
        ax.set_xlabel("staleness (updates applied between a read and its write)")
        ax.set_ylabel("updates (%)")
    handles = [Line2D([], [], color=st["color"], marker="s", linestyle="none", label=name) for name, st in styles.items()]
    _legend(fig, handles, "strategy")
    _save(fig, path, written)
    return True


def write_all(records: Iterable[Record], outdir: Path) -> list[Path]:
    """Both figures per case and target, for runs that compare strategies or stragglers; the paths written."""
    records = [r for r in records if r.get("status", "ok") == "ok" and target_of(r) is not None]
    written: list[Path] = []
    if not is_study(records):
        return written
    outdir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[Case, float], list[Record]] = defaultdict(list)
    for r in records:
        groups[(case_of(r), float((target_of(r) or {})["accuracy"]))].append(r)
    for (case, target), runs in groups.items():
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{case.network}_{case.dtype}_n{case.n_train}_{100 * target:g}").strip("-")
        accuracy_vs_time(runs, case, target, outdir / f"strategies_accuracy_vs_time_{slug}.png", written)
        staleness(runs, case, outdir / f"strategies_staleness_{slug}.png", written)
    return written
