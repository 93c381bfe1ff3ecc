"""The time-to-accuracy figures as PNG files, from the rows of pbp_hpc.analyze.accuracy.

Per case (network, precision, training-set size) and target accuracy:

* `accuracy_vs_time_*.png`: validation accuracy against training time (evaluation passes
  excluded), one line per configuration -- the slides' "running time vs. accuracy". A panel per
  optimizer/schedule and rank count; one colour and marker per batch size throughout the figure.
* `time_to_target_vs_batch_*.png`: training time to the target against batch size, one series
  per rank count (and implementation), a panel per optimizer/schedule.
* `epochs_tpe_vs_batch_*.png`: epochs to the target (left) beside time per epoch (right)
  against batch size: time to target = epochs x TPE, the two forces of the batch size.
* `steps_vs_batch_*.png` (where an optimizer ran at several batch sizes): steps and epochs to
  the target, and test accuracy, against batch size, one line per optimizer/schedule -- Shallue
  et al.'s figure; the mean over seeds with min–max bars (accuracy: mean ± std).

At most MAX_SERIES series share a panel (more are split across panels), every series has its
own colour and marker, the legend sits outside the data, and ticks read as plain numbers.
Configurations that did not reach the target are drawn as crosses along the top edge.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pbp_hpc.analyze.accuracy import by_target, curves, row_key, time_to_target_rows
from pbp_hpc.analyze import batch_scaling, figstyle
from pbp_hpc.analyze.figstyle import MARKERS, varies
from pbp_hpc.analyze.figstyle import chunks as _chunks
from pbp_hpc.analyze.figstyle import log2_axis as _log2_axis
from pbp_hpc.analyze.figstyle import plain_log as _plain_log
from pbp_hpc.analyze.figures import _slug
from pbp_hpc.analyze.points import Case
from pbp_hpc.analyze.records import Record

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]
NOT_REACHED = "x"


def _style(i: int) -> dict[str, Any]:
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)]}


def _grid(title: str, n: int, ncols: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    """figstyle.panels at this module's panel size."""
    return figstyle.panels(title, n, ncols, width, height)


def _wrap(text: str, width: int = 64) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _legend(fig: Figure, handles: list[Any], title: str) -> None:
    """Below the panels, outside the data (and clear of the title, whatever the figure's width)."""
    fig.legend(handles=handles, loc="outside lower center", title=title, fontsize="small", ncols=min(len(handles), 5))


def _save(fig: Figure, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing cut off, whatever the titles' lengths
    written.append(path)


def _series_label(r: dict[str, Any], impls: set[str]) -> str:
    """Ranks (x threads), and the implementation where several were run."""
    label = f"P={r['ranks']}" + (f"x{r['threads']}" if r["threads"] != 1 else "")
    return f"{label} {r['implementation']}" if len(impls) > 1 else label


def _not_reached(ax: Axes, x: list[float], style: dict[str, Any], i: int) -> None:
    """Crosses along the top edge of the panel at the batch sizes that never reached the target
    (one row per series, so that crosses of several series do not hide one another)."""
    if x:
        ax.plot(x, [0.97 - 0.045 * i] * len(x), linestyle="none", transform=ax.get_xaxis_transform(), markersize=8,
                clip_on=False, color=style["color"], marker=NOT_REACHED)


def _not_reached_handle() -> Line2D:
    return Line2D([], [], color="k", marker=NOT_REACHED, linestyle="none", markersize=9, label="target not reached (top edge)")


def accuracy_vs_time(rows: list[dict[str, Any]], runs: dict[tuple[Any, ...], list[list[dict[str, Any]]]], case: Case,
                     target: float, path: Path, written: list[Path]) -> None:
    batches = sorted({r["batch_size"] for r in rows})
    style = {b: _style(i) for i, b in enumerate(batches)}
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if row_key(r) in runs:
            panels[(r["variant"], r["ranks"], r["implementation"], r["threads"])].append(r)
    flat = [(k, chunk) for k, prow in panels.items() for chunk in _chunks(sorted(prow, key=lambda r: r["batch_size"]))]
    if not flat:
        return
    variants = {r["variant"] for r in rows}
    fig, axes = _grid(f"{case.label()}\nvalidation accuracy vs training time (evaluation passes excluded), target "
                      f"{100 * target:g}%", len(flat), min(2, len(flat)))
    lowest = 1.0
    for ax, ((variant, *_), chunk) in zip(axes, flat):
        for r in chunk:
            for i, curve in enumerate(runs[row_key(r)]):
                pts = [(p["time_s"], p["val_accuracy"]) for p in curve if p.get("val_accuracy") is not None
                       and p.get("time_s") is not None and p["time_s"] > 0]
                if not pts:
                    continue
                lowest = min(lowest, min(a for _, a in pts[len(pts) // 4 :]))
                ax.plot(*zip(*pts), markevery=max(1, len(pts) // 8), markersize=5, linewidth=1.4 if i == 0 else 0.7,
                        alpha=1.0 if i == 0 else 0.5, **style[r["batch_size"]])
        ax.axhline(target, color="k", linestyle="--", linewidth=1)
        span = f"B={chunk[0]['batch_size']}..{chunk[-1]['batch_size']}" if len(chunk) > 1 else f"B={chunk[0]['batch_size']}"
        head = f"{chunk[0]['ranks']} rank(s) x {chunk[0]['threads']} thread(s), {chunk[0]['implementation']}, {span}"
        ax.set_title(f"{_wrap(variant)}\n{head}" if len(variants) > 1 else head, fontsize="medium")
        _plain_log(ax, "x")
        ax.set_xlabel("training time (s, log scale)")
        ax.set_ylabel("validation accuracy")
    for ax in axes:  # the same range everywhere; the first quarter of each curve may fall below it
        ax.set_ylim(max(0.0, min(lowest, target) - 0.05), 1.0)
    handles = [Line2D([], [], label=f"B={b}", **style[b]) for b in batches]
    handles.append(Line2D([], [], color="k", linestyle="--", label=f"target {100 * target:g}%"))
    if len(variants) == 1:
        handles.append(Line2D([], [], linestyle="none", label=_wrap(next(iter(variants)), 40)))
    _legend(fig, handles, "batch size")
    _save(fig, path, written)


def _by_variant(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[tuple[Any, ...], list[dict[str, Any]]]]]]:
    """Panels: per variant, its series (ranks, implementation, threads) in chunks of MAX_SERIES."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        series: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["variant"] == variant:
                series[(r["ranks"], r["implementation"], r["threads"])].append(r)
        for chunk in _chunks(sorted(series.items())):
            out.append((variant, chunk))
    return out


def _draw_vs_batch(ax: Axes, chunk: list[tuple[tuple[Any, ...], list[dict[str, Any]]]], key: str, styles: dict[Any, Any],
                   impls: set[str], needs_reached: bool) -> None:
    """One line per series against batch size. Series are dodged by a few hundredths of an octave
    (and drawn with hollow markers after the first, _series_styles): with the same global batch the
    ranks train the same steps, so epochs to target coincide across rank counts and would hide
    each other."""
    for i, (skey, srows) in enumerate(chunk):
        srows = sorted(srows, key=lambda r: r["batch_size"])
        st = {**styles[skey], "markersize": 7}
        dodge = 2 ** (0.06 * (i - (len(chunk) - 1) / 2))
        ok = [r for r in srows if r.get(key) is not None and (r["reached"] or not needs_reached)]
        if ok:
            x, y = [r["batch_size"] * dodge for r in ok], [r[key] for r in ok]
            ax.plot(x, y, label=_series_label(ok[0], impls), **st)
            if key == "time_to_target_s":
                lo = [r[key] - r["time_min_s"] for r in ok]
                hi = [r["time_max_s"] - r[key] for r in ok]
                if any(lo) or any(hi):
                    ax.errorbar(x, y, yerr=[lo, hi], linestyle="none", capsize=3, color=st["color"])
        if needs_reached:
            _not_reached(ax, [r["batch_size"] * dodge for r in srows if not r["reached"]], st, i)


def time_to_target_vs_batch(rows: list[dict[str, Any]], case: Case, target: float, path: Path, written: list[Path]) -> None:
    panels = _by_variant(rows)
    impls = {r["implementation"] for r in rows}
    styles = _series_styles(rows)
    fig, axes = _grid(f"{case.label()}\ntraining time to {100 * target:g}% validation accuracy vs batch size",
                      len(panels), min(2, len(panels)))
    for ax, (variant, chunk) in zip(axes, panels):
        _draw_vs_batch(ax, chunk, "time_to_target_s", styles, impls, True)
        ax.set_title(_wrap(variant), fontsize="medium")
        _log2_axis(ax, [r["batch_size"] for r in rows])
        _plain_log(ax, "y")
        ax.set_xlabel("batch size B (log2 scale)")
        ax.set_ylabel("time to target (s, log scale)")
    _legend(fig, _handles(styles, rows, impls) + [_not_reached_handle()], "ranks")
    _save(fig, path, written)


def epochs_and_tpe_vs_batch(rows: list[dict[str, Any]], case: Case, target: float, path: Path, written: list[Path]) -> None:
    panels = _by_variant(rows)
    impls = {r["implementation"] for r in rows}
    styles = _series_styles(rows)
    fig, axes = _grid(f"{case.label()}\nepochs to {100 * target:g}% validation accuracy and time per epoch vs batch size",
                      2 * len(panels), 2)
    for i, (variant, chunk) in enumerate(panels):
        ax_e, ax_t = axes[2 * i], axes[2 * i + 1]
        _draw_vs_batch(ax_e, chunk, "epochs_to_target", styles, impls, True)
        _draw_vs_batch(ax_t, chunk, "tpe_s", styles, impls, False)
        for ax, what in ((ax_e, "epochs to target"), (ax_t, "time per epoch (s)")):
            ax.set_title(f"{_wrap(variant)}\n{what}", fontsize="medium")
            _log2_axis(ax, [r["batch_size"] for r in rows])
            _plain_log(ax, "y")
            ax.set_xlabel("batch size B (log2 scale)")
            ax.set_ylabel(f"{what.split(' (')[0]} ({'s, ' if 'time' in what else ''}log scale)")
    _legend(fig, _handles(styles, rows, impls) + [_not_reached_handle()], "ranks")
    _save(fig, path, written)


def steps_vs_batch(rows: list[dict[str, Any]], case: Case, target: float, path: Path, written: list[Path]) -> bool:
    """Steps, epochs to target and test accuracy vs batch, a line per variant; False if no series."""
    lines = batch_scaling.series(rows)
    if not lines:
        return False
    fig, axes = _grid(f"{case.label()}\nsteps and epochs to {100 * target:g}% validation accuracy, and test accuracy, "
                      "vs batch size (mean over seeds; bars: min–max, accuracy ± std)", 3, 3, 4.6, 3.6)
    handles = []
    for i, ((variant, impl, ranks, threads), srows) in enumerate(lines.items()):
        st = {**_style(i), "markersize": 6}
        dodge = 2 ** (0.05 * (i - (len(lines) - 1) / 2))
        for ax, name in ((axes[0], "steps_to_target"), (axes[1], "epochs_to_target"), (axes[2], "test_accuracy")):
            ok = [r for r in srows if r.get(f"{name}_mean") is not None]
            if not ok:
                continue
            x, y = [r["batch_size"] * dodge for r in ok], [r[f"{name}_mean"] for r in ok]
            if name == "test_accuracy":
                err = [[r[f"{name}_std"] for r in ok]] * 2
            else:
                err = [[r[f"{name}_mean"] - r[f"{name}_min"] for r in ok], [r[f"{name}_max"] - r[f"{name}_mean"] for r in ok]]
            ax.errorbar(x, y, yerr=err, capsize=3, **st)
            if name != "test_accuracy":
                _not_reached(ax, [r["batch_size"] * dodge for r in srows if not r["reached"]], st, i)
        handles.append(Line2D([], [], label=_wrap(f"{variant} ({ranks}x{threads})", 50), **st))
    batches = [r["batch_size"] for s in lines.values() for r in s]
    for ax, what in zip(axes, ("steps to target", "epochs to target", "test accuracy")):
        _log2_axis(ax, batches)
        if what != "test accuracy":
            _plain_log(ax, "y")
        ax.set_title(what, fontsize="medium")
        ax.set_xlabel("batch size B (log2 scale)")
        ax.set_ylabel(what + ("" if what == "test accuracy" else " (log scale)"))
    _legend(fig, handles + [_not_reached_handle()], "optimizer, schedule, rate")
    _save(fig, path, written)
    return True


def _series_styles(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Colour and marker per (ranks, implementation, threads); hollow markers after the first."""
    keys = sorted({(r["ranks"], r["implementation"], r["threads"]) for r in rows})
    return {k: {**_style(i), **({"markerfacecolor": "none"} if i else {})} for i, k in enumerate(keys)}


def _handles(styles: dict[Any, Any], rows: list[dict[str, Any]], impls: set[str]) -> list[Line2D]:
    first = {(r["ranks"], r["implementation"], r["threads"]): r for r in rows}
    return [Line2D([], [], label=_series_label(first[k], impls), markersize=7, **st) for k, st in styles.items()]


def write_all(records: Iterable[Record], outdir: Path) -> list[Path]:
    """The three figures per case and target; none if no run had a target. Returns the paths."""
    records = list(records)
    rows = time_to_target_rows(records)
    if not rows:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    runs = curves(records)
    written: list[Path] = []
    groups = by_target(rows)
    cases = sorted({case for case, _ in groups})
    networks = [c.network for c in cases]
    for (case, target), trows in groups.items():
        stem = f"{_slug(case, networks.count(case.network) == 1)}_to{100 * target:g}"
        accuracy_vs_time(trows, runs, case, target, outdir / f"accuracy_vs_time_{stem}.png", written)
        if varies(trows, "batch_size", f"{case.label()}, target {100 * target:g}%: no figure against batch size"):
            time_to_target_vs_batch(trows, case, target, outdir / f"time_to_target_vs_batch_{stem}.png", written)
            epochs_and_tpe_vs_batch(trows, case, target, outdir / f"epochs_tpe_vs_batch_{stem}.png", written)
            steps_vs_batch(trows, case, target, outdir / f"steps_vs_batch_{stem}.png", written)
    return written
