"""The report's figures as PNG files, from the points pbp_hpc.analyze.points aggregates.

Per network (and precision / data size, when several were measured): time per epoch,
GFLOP/s and speedup against batch size (the report's figures 5-10), strong and weak scaling
with the ideal line and the efficiency, and the alpha-beta model's predicted speedup out to
1024 ranks beside the measured points. Built on matplotlib's object API with the Agg canvas,
so nothing needs a display and no global pyplot state is touched.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.models import ModelSeries, choose_alpha_beta, model_series, predict
from pbp_hpc.analyze.points import Case, Point
from pbp_hpc.analyze.records import IMPLEMENTATIONS
from pbp_hpc.analyze.scaling import performance_rows, strong_scaling_rows, weak_scaling_rows

COLORS = {"naive-serial": "tab:brown", "example-parallel": "tab:orange", "blas-serial": "tab:blue",
          "blas-threaded": "tab:cyan", "hybrid": "tab:green", "gpu": "tab:red", "framework": "tab:purple"}
MARKERS = "osD^v<>ph*"


def _slug(case: Case, unique_network: bool) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", case.network).strip("-")
    return base if unique_network else f"{base}_{case.dtype}_n{case.n_train}"


def _log2_axis(ax: Any, ticks: list[int]) -> None:
    """A log2 x axis labelled with the measured values themselves (32, 64, ...), not 2^k."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _new(title: str, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(6.4 * ncols, 4.8), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0].tolist()
    fig.suptitle(title)
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    written.append(path)


def _style(impl: str, i: int, cores: int = 1) -> dict[str, Any]:
    """Colour by implementation; dashed when it uses more than one core, so 1x1 and PxT differ."""
    return {"color": COLORS.get(impl), "marker": MARKERS[i % len(MARKERS)], "linestyle": "-" if cores == 1 else "--"}


def batch_figures(points: list[Point], outdir: Path, slugs: dict[Case, str]) -> list[Path]:
    """Figures 5-10: TPE, GFLOP/s and speedup against batch size, one line per configuration."""
    rows = performance_rows(points)
    written: list[Path] = []
    by_case: dict[Case, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[Case(r["network"], r["dtype"], r["n_train"])].append(r)
    plots: list[tuple[str, str, str, bool]] = [
        ("tpe", "tpe_s", "time per epoch (s, log scale)", True),
        ("gflops", "gflops", "GFLOP/s (log scale)", True),
        ("speedup", "speedup", "speedup over serial counterpart (x)", False),
    ]
    for case, crows in by_case.items():
        lines: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
        for r in crows:
            lines[(r["implementation"], r["ranks"], r["threads"])].append(r)
        batches = [r["batch_size"] for r in crows]
        for stem, key, ylabel, logy in plots:
            fig, (ax,) = _new(f"{case.label()}\n{ylabel.split(' (')[0]} vs batch size")
            fig.set_size_inches(9.0, 4.8)
            drawn = 0
            for i, ((impl, P, T), lrows) in enumerate(sorted(lines.items(), key=lambda kv: IMPLEMENTATIONS.index(kv[0][0]) if kv[0][0] in IMPLEMENTATIONS else 99)):
                pts = sorted((r["batch_size"], r[key], r) for r in lrows if r.get(key) is not None)
                if not pts:
                    continue
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                yerr = None
                if key == "tpe_s":
                    yerr = np.array([[p[2]["tpe_s"] - p[2]["tpe_min_s"] for p in pts], [p[2]["tpe_max_s"] - p[2]["tpe_s"] for p in pts]])
                ax.errorbar(x, y, yerr=yerr, label=f"{impl} ({P}x{T})", capsize=3, **_style(impl, i, P * T))
                drawn += 1
            if key == "speedup":
                ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            if logy and drawn:
                ax.set_yscale("log")
            _log2_axis(ax, batches)
            ax.set_xlabel("batch size B (examples, log2 scale)")
            ax.set_ylabel(ylabel)
            if drawn:
                ax.legend(title="implementation (ranks x threads)", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
            _save(fig, outdir / f"{stem}_vs_batch_{slugs[case]}.png", written)
    return written


def strong_figures(points: list[Point], outdir: Path, slugs: dict[Case, str]) -> list[Path]:
    """Per case: speedup and efficiency against ranks at a fixed global batch, with the ideal line."""
    rows = strong_scaling_rows(points)
    written: list[Path] = []
    by_case: dict[Case, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[Case(r["network"], r["dtype"], r["n_train"])].append(r)
    for case, crows in by_case.items():
        fig, (ax_s, ax_e) = _new(f"{case.label()}: strong scaling (fixed global batch B and data set)", ncols=2)
        series = _group(crows, lambda r: (r["batch_size"], r["implementation"], r["threads"]))
        ranks = [r["ranks"] for r in crows]
        for i, ((B, impl, T), s) in enumerate(sorted(series.items())):
            label = f"B={B} {impl} (T={T}), from {s[0]['baseline']}"
            ax_s.plot([r["ranks"] for r in s], [r["speedup"] for r in s], label=label, **_style(impl, i))
            ax_e.plot([r["ranks"] for r in s], [r["efficiency"] for r in s], label=label, **_style(impl, i))
        base = min(ranks)
        grid = np.array(sorted(set(ranks)))
        ax_s.plot(grid, grid / base, "k--", linewidth=1, label="ideal")
        ax_e.axhline(1.0, color="k", linestyle="--", linewidth=1, label="ideal")
        for ax in (ax_s, ax_e):
            _log2_axis(ax, ranks)
            ax.set_xlabel("MPI ranks P (log2 scale)")
        ax_s.set_ylabel(f"speedup over {base} rank(s) (x)")
        ax_e.set_ylabel("parallel efficiency (speedup / ideal)")
        ax_e.set_ylim(0, max(1.1, max(r["efficiency"] for r in crows) * 1.1))
        ax_s.legend(fontsize="small")
        _save(fig, outdir / f"strong_scaling_{slugs[case]}.png", written)
    return written


def weak_figures(points: list[Point], outdir: Path) -> list[Path]:
    """Per network and precision (a weak series may span data sizes): time per step and efficiency."""
    rows = weak_scaling_rows(points)
    written: list[Path] = []
    for (network, dtype), nrows in _group(rows, lambda r: (r["network"], r["dtype"])).items():
        fig, (ax_t, ax_e) = _new(f"{network} ({dtype}): weak scaling (fixed batch per rank)", ncols=2)
        series = _group(nrows, lambda r: (r["batch_per_rank"], r["implementation"], r["threads"]))
        ranks = [r["ranks"] for r in nrows]
        for i, ((b, impl, T), s) in enumerate(sorted(series.items())):
            label = f"B/P={b} {impl} (T={T}), from {s[0]['baseline']}"
            ax_t.plot([r["ranks"] for r in s], [r["step_s"] * 1e3 for r in s], label=label, **_style(impl, i))
            ax_e.plot([r["ranks"] for r in s], [r["efficiency"] for r in s], label=label, **_style(impl, i))
        ax_e.axhline(1.0, color="k", linestyle="--", linewidth=1, label="ideal")
        for ax in (ax_t, ax_e):
            _log2_axis(ax, ranks)
            ax.set_xlabel("MPI ranks P (log2 scale)")
        ax_t.set_ylabel("time per step (ms)")
        ax_e.set_ylabel("weak efficiency T_step(first) / T_step(P)")
        ax_e.set_ylim(0, max(1.1, max(r["efficiency"] for r in nrows) * 1.1))
        ax_e.legend(fontsize="small")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", network).strip("-")
        _save(fig, outdir / f"weak_scaling_{slug}_{dtype}.png", written)
    return written


def model_figures(points: list[Point], outdir: Path, slugs: dict[Case, str], ab: perfmodel.AlphaBeta,
                  max_ranks: int = perfmodel.MAX_RANKS) -> list[Path]:
    """Predicted speedup to max_ranks (lines) with the measured speedups (markers), per network."""
    written: list[Path] = []
    grid = perfmodel.rank_grid(max_ranks)
    by_case: dict[Case, list[ModelSeries]] = defaultdict(list)
    for s in model_series(points):
        by_case[s.case].append(s)
    for case, series in by_case.items():
        fig, (ax,) = _new(f"{case.label()}: alpha-beta model\nalpha={ab.alpha_s * 1e6:.3g} us, "
                          f"beta={ab.beta_s_per_byte * 1e9:.3g} ns/B ({ab.source})")
        fig.set_size_inches(11.0, 6.4)
        ax.plot(grid, grid, "k--", linewidth=1, label="ideal (S = P)")
        for i, s in enumerate(series):
            color = f"C{i % 10}"
            ax.plot(grid, predict(s, grid, ab), color=color, label=f"model {s.label}")
            if s.measured:
                ax.plot([p.ranks for p in s.measured], [s.base.tpe_s / p.tpe_s for p in s.measured], linestyle="none",
                        marker=MARKERS[i % len(MARKERS)], markersize=8, color=color, label=f"measured {s.label}")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        _log2_axis(ax, [int(g) for g in grid])
        ax.set_xlabel("MPI ranks P (log2 scale)")
        ax.set_ylabel("speedup over 1 rank (x, log2 scale)")
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        caption = textwrap.fill("Assumptions: " + "; ".join(perfmodel.ASSUMPTIONS) + ".", width=170)
        fig.text(0.01, 0.005, caption, fontsize="x-small", va="bottom")
        bottom = 0.02 + 0.025 * (caption.count("\n") + 1)
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))  # (left, bottom, width, height): room for the caption
        _save(fig, outdir / f"model_speedup_{slugs[case]}.png", written)
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
            + weak_figures(points, outdir) + model_figures(points, outdir, slugs, ab, max_ranks))
