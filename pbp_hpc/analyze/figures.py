"""The report's figures as PNG files, from the points pbp_hpc.analyze.points aggregates.

Per network (and precision / data size, when several were measured): time per epoch,
GFLOP/s and speedup against batch size (the report's figures 5-10), strong and weak scaling
with the ideal line and the efficiency, and the alpha-beta model's predicted speedup out to
1024 ranks beside the measured points. Built on matplotlib's object API with the Agg canvas,
so nothing needs a display and no global pyplot state is touched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.figstyle import (
    MARKERS,
    chunks,
    draw_series,
    legend_below,
    log2_axis,
    oversubscribed_handle,
    panels,
    plain_log,
    save,
    series_handle,
    series_styles,
)
from pbp_hpc.analyze.models import ModelSeries, choose_alpha_beta, model_series, projection
from pbp_hpc.analyze.points import Case, Point
from pbp_hpc.analyze import time_split
from pbp_hpc.analyze.figstyle import varies
from pbp_hpc.analyze.records import IMPLEMENTATIONS
from pbp_hpc.analyze.scaling import performance_rows, strong_scaling_rows, weak_scaling_rows

_log2_axis = log2_axis  # the name accuracy_figures imports
__all__ = ["MARKERS", "write_all"]


def _slug(case: Case, unique_network: bool) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", case.network).strip("-")
    return base if unique_network else f"{base}_{case.dtype}_n{case.n_train}"


def _impl_order(impl: str) -> int:
    return IMPLEMENTATIONS.index(impl) if impl in IMPLEMENTATIONS else 99


def _facets(series: dict[Any, list[dict[str, Any]]], panel_of: Callable[[Any], Any]) -> list[tuple[Any, list[Any]]]:
    """(panel key, series keys) with at most MAX_SERIES series each: series grouped by panel_of,
    large groups split."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for k in series:
        groups[panel_of(k)].append(k)
    return [(g, chunk) for g, keys in groups.items() for chunk in chunks(keys)]


def _has_over(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("oversubscribed") for r in rows)


def _legend(fig: Any, handles: list[Any], rows: list[dict[str, Any]], title: str) -> None:
    legend_below(fig, handles + ([oversubscribed_handle()] if _has_over(rows) else []), title)


def _reps_note(rows: list[dict[str, Any]]) -> str:
    reps = sorted({r["reps"] for r in rows if r.get("reps")})
    if not reps or reps == [1]:
        return "one run per point"
    return f"{'-'.join(map(str, (reps[0], reps[-1])) if len(reps) > 1 else str(reps[0]))} repetitions: median, bars min-max"


BATCH_PLOTS: list[tuple[str, str, str, bool]] = [
    ("tpe", "tpe_s", "time per epoch (s, log scale)", True),
    ("gflops", "gflops", "GFLOP/s (log scale)", True),
    ("speedup", "speedup", "speedup over serial counterpart (x)", False),
]


def _batch_range(r: dict[str, Any], key: str) -> tuple[float, float]:
    """The value's min-max over repetitions: TPE directly; GFLOP/s and speedup scale as 1/TPE."""
    v = r[key]
    if key == "tpe_s":
        return r["tpe_min_s"], r["tpe_max_s"]
    return v * r["tpe_s"] / r["tpe_max_s"], v * r["tpe_s"] / r["tpe_min_s"]


def batch_figures(points: list[Point], outdir: Path, slugs: dict[Case, str]) -> list[Path]:
    """Figures 5-10: TPE, GFLOP/s and speedup against batch size, one series per implementation
    and ranks x threads, at most MAX_SERIES per panel."""
    written: list[Path] = []
    by_case: dict[Case, list[dict[str, Any]]] = defaultdict(list)
    for r in performance_rows(points):
        by_case[Case(r["network"], r["dtype"], r["n_train"])].append(r)
    for case, crows in by_case.items():
        if not varies(crows, "batch_size", f"{case.label()}: no figure against batch size"):
            continue
        lines: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
        for r in sorted(crows, key=lambda r: r["batch_size"]):
            lines[(r["implementation"], r["ranks"], r["threads"])].append(r)
        order = sorted(lines, key=lambda k: (_impl_order(k[0]), k))
        styles = series_styles(order)
        batches = [r["batch_size"] for r in crows]
        for stem, key, ylabel, logy in BATCH_PLOTS:
            facets = chunks([k for k in order if any(r.get(key) is not None for r in lines[k])])
            if not facets:
                continue
            fig, axes = panels(f"{case.label()}\n{ylabel.split(' (')[0]} vs batch size ({_reps_note(crows)})",
                               len(facets), min(2, len(facets)))
            for ax, keys in zip(axes, facets):
                for k in keys:
                    pts = [r for r in lines[k] if r.get(key) is not None]
                    rng = [_batch_range(r, key) for r in pts]
                    draw_series(ax, [r["batch_size"] for r in pts], [r[key] for r in pts], [a for a, _ in rng],
                                [b for _, b in rng], [bool(r.get("oversubscribed")) for r in pts], styles[k],
                                linestyle="-" if k[1] * k[2] == 1 else "--")
                if key == "speedup":
                    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
                log2_axis(ax, batches)
                if logy:
                    plain_log(ax, "y")
                ax.set_xlabel("batch size B (examples, log2 scale)")
                ax.set_ylabel(ylabel)
            handles = [series_handle(f"{i} ({P}x{T})", styles[(i, P, T)], linestyle="-" if P * T == 1 else "--")
                       for (i, P, T) in order]
            _legend(fig, handles, crows, "implementation (ranks x threads); dashed: more than one core")
            save(fig, outdir / f"{stem}_vs_batch_{slugs[case]}.png", written)
    return written


def _scaling_panels(title: str, rows: list[dict[str, Any]], series_key: Callable[[dict[str, Any]], Any],
                    panel_key: Callable[[Any], Any], label: Callable[[Any], str],
                    plots: list[tuple[str, Callable[[dict[str, Any]], tuple[float, float, float]], str]],
                    ideal: list[Optional[Callable[[Axes, list[int]], None]]], legend_title: str) -> Figure:
    """Rows of panels, one row per facet (at most MAX_SERIES series), one column per quantity:
    each plot gives a row's (value, min, max). A series key's last element (the batch) sets its
    colour and marker, the same in every panel; label names it in the legend."""
    series = {k: sorted(v, key=lambda r: r["ranks"]) for k, v in _group(rows, series_key).items()}
    facets = _facets(dict(sorted(series.items())), panel_key)
    styles = series_styles(sorted({k[-1] for k in series}))
    fig, axes = panels(title, len(facets) * len(plots), len(plots))
    ranks = [r["ranks"] for r in rows]
    for f, (group, keys) in enumerate(facets):
        for c, (what, value, ylabel) in enumerate(plots):
            ax = axes[f * len(plots) + c]
            for k in keys:
                vals = [value(r) for r in series[k]]
                draw_series(ax, [r["ranks"] for r in series[k]], [v[0] for v in vals], [v[1] for v in vals],
                            [v[2] for v in vals], [bool(r.get("oversubscribed")) for r in series[k]], styles[k[-1]])
            if ideal[c] is not None:
                ideal[c](ax, ranks)  # type: ignore[misc]
            log2_axis(ax, ranks)
            ax.set_xlabel("MPI ranks P (log2 scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{group}: {what}" if group else what, fontsize="medium")
    handles = [series_handle(label(b), styles[b]) for b in styles]
    handles.append(Line2D([], [], color="k", linestyle="--", linewidth=1, label="ideal"))
    _legend(fig, handles, rows, legend_title)
    return fig


def _ideal_speedup(ax: Axes, ranks: list[int]) -> None:
    grid = np.array(sorted(set(ranks)))
    ax.plot(grid, grid / grid[0], "k--", linewidth=1)


def _ideal_one(ax: Axes, ranks: list[int]) -> None:
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))


def _panel_name(impl: str, threads: int) -> str:
    return f"{impl}, {threads} thread(s) per rank"


def strong_figures(points: list[Point], outdir: Path, slugs: dict[Case, str]) -> list[Path]:
    """Per case: speedup and efficiency against ranks at a fixed global batch, with the ideal line;
    a row of panels per implementation and threads (and per MAX_SERIES batch sizes)."""
    written: list[Path] = []
    by_case: dict[Case, list[dict[str, Any]]] = defaultdict(list)
    for r in strong_scaling_rows(points):
        by_case[Case(r["network"], r["dtype"], r["n_train"])].append(r)
    for case, crows in by_case.items():
        if not varies(crows, "ranks", f"{case.label()}: no strong-scaling figure"):
            continue
        eff = lambda r: (r["efficiency"], r["speedup_min"] * r["efficiency"] / r["speedup"],  # noqa: E731
                         r["speedup_max"] * r["efficiency"] / r["speedup"])
        fig = _scaling_panels(
            f"{case.label()}: strong scaling (fixed global batch B and data set; {_reps_note(crows)})", crows,
            lambda r: (_impl_order(r["implementation"]), r["implementation"], r["threads"], r["batch_size"]),
            lambda k: _panel_name(k[1], k[2]), lambda b: f"B={b}",
            [("speedup", lambda r: (r["speedup"], r["speedup_min"], r["speedup_max"]), "speedup over the first point (x)"),
             ("efficiency", eff, "parallel efficiency (speedup / ideal)")],
            [_ideal_speedup, _ideal_one], "global batch B (P=1: the serial counterpart)")
        save(fig, outdir / f"strong_scaling_{slugs[case]}.png", written)
    return written


def _data_size(rows: list[dict[str, Any]]) -> str:
    sizes = sorted({r["n_train"] for r in rows})
    if len(sizes) == 1:
        return f"{sizes[0]} training examples"
    return f"{sizes[0]}-{sizes[-1]} training examples (grows with P)"


def weak_figures(points: list[Point], outdir: Path) -> list[Path]:
    """Per network and precision (a weak series may span data sizes): time per step and efficiency,
    a row of panels per implementation and threads (and per MAX_SERIES batches per rank)."""
    written: list[Path] = []
    for (network, dtype), nrows in _group(weak_scaling_rows(points), lambda r: (r["network"], r["dtype"])).items():
        if not varies(nrows, "ranks", f"{network} ({dtype}): no weak-scaling figure"):
            continue
        step = lambda r: (r["step_s"] * 1e3, r["step_min_s"] * 1e3, r["step_max_s"] * 1e3)  # noqa: E731
        # The first point of a series is its own reference (efficiency 1 exactly): no bar there.
        eff = lambda r: (r["efficiency"], r["efficiency"] * (1 if r["run"] == r["baseline"] else r["step_s"] / r["step_max_s"]),  # noqa: E731
                         r["efficiency"] * (1 if r["run"] == r["baseline"] else r["step_s"] / r["step_min_s"]))
        fig = _scaling_panels(
            f"{network} ({dtype}, {_data_size(nrows)}): weak scaling (fixed batch per rank; {_reps_note(nrows)})", nrows,
            lambda r: (_impl_order(r["implementation"]), r["implementation"], r["threads"], r["batch_per_rank"]),
            lambda k: _panel_name(k[1], k[2]), lambda b: f"B/P={b}",
            [("time per step", step, "time per step (ms)"), ("efficiency", eff, "weak efficiency T_step(first) / T_step(P)")],
            [None, _ideal_one], "batch per rank B/P (P=1: the serial counterpart)")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", network).strip("-")
        save(fig, outdir / f"weak_scaling_{slug}_{dtype}.png", written)
    return written


def model_figures(points: list[Point], outdir: Path, slugs: dict[Case, str], ab: perfmodel.AlphaBeta,
                  max_ranks: int = perfmodel.MAX_RANKS) -> list[Path]:
    """Predicted speedup to max_ranks (lines; a band for the range alpha and beta allow, the band
    alone where one was not determined) with the measured speedups (markers, min-max bars)."""
    written: list[Path] = []
    grid = perfmodel.rank_grid(max_ranks)
    by_case: dict[Case, list[ModelSeries]] = defaultdict(list)
    for s in model_series(points):
        by_case[s.case].append(s)
    for case, series in by_case.items():
        styles = series_styles([s.label for s in series])
        facets = chunks(series)
        doubt = (f"\n{' and '.join(ab.undetermined)} not determined by the measurements: shaded, every prediction they allow"
                 if ab.undetermined else "\nshaded: alpha and beta at the ends of their ~95% ranges" if ab.uncertain else "")
        caption = f"alpha-beta: {ab.describe()}. Assumptions: " + "; ".join(perfmodel.ASSUMPTIONS) + "."
        fig, axes = panels(f"{case.label()}: alpha-beta model, predicted and measured speedup{doubt}", len(facets),
                           min(2, len(facets)), width=6.0, height=4.6, caption=caption)
        for ax, chunk in zip(axes, facets):
            ax.plot(grid, grid, "k--", linewidth=1)
            for s in chunk:
                st = styles[s.label]
                sp, lo, hi = projection(s, grid, ab)
                if lo is not None and hi is not None:
                    ax.fill_between(grid, lo, hi, color=st["color"], alpha=0.15, linewidth=0)
                if sp is not None:
                    ax.plot(grid, sp, color=st["color"])
                if s.measured:
                    m = s.measured
                    draw_series(ax, [p.ranks for p in m], [s.base.tpe_s / p.tpe_s for p in m],
                                [s.base.tpe_s / p.tpe_max_s for p in m], [s.base.tpe_s / p.tpe_min_s for p in m],
                                [bool(p.oversubscribed) for p in m], st, linestyle="none")
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
            log2_axis(ax, [int(g) for g in grid])
            ax.tick_params(axis="x", labelrotation=45)
            ax.set_xlabel("MPI ranks P (log2 scale)")
            ax.set_ylabel("speedup over 1 rank (x, log2 scale)")
        handles: list[Any] = [series_handle(s.label, styles[s.label], linestyle="-" if not ab.undetermined else "none")
                              for s in series]
        handles.append(Line2D([], [], color="k", linestyle="--", linewidth=1, label="ideal (S = P)"))
        if ab.uncertain:
            handles.append(Patch(color="grey", alpha=0.3, label="model range (alpha, beta at the ends of their ranges)"))
        handles.append(Line2D([], [], color="k", marker="o", linestyle="none", label="measured (median, bars min-max)"))
        _legend(fig, handles, [{"oversubscribed": p.oversubscribed} for s in series for p in s.measured], "series")
        save(fig, outdir / f"model_speedup_{slugs[case]}.png", written)
    return written


def _group(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return {k: sorted(v, key=lambda r: r["ranks"]) if "ranks" in v[0] else v for k, v in out.items()}


def write_all(points: list[Point], outdir: Path, ab: Optional[perfmodel.AlphaBeta] = None,
              max_ranks: int = perfmodel.MAX_RANKS) -> list[Path]:
    """Every figure the data supports; returns the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    ab = ab or choose_alpha_beta(points)
    cases = sorted({p.case for p in points})
    networks = [c.network for c in cases]
    slugs = {c: _slug(c, networks.count(c.network) == 1) for c in cases}
    return (batch_figures(points, outdir, slugs) + strong_figures(points, outdir, slugs)
            + weak_figures(points, outdir) + model_figures(points, outdir, slugs, ab, max_ranks)
            + time_split.figures(points, outdir, slugs))
