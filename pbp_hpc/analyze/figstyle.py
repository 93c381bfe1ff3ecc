"""What every figure of the analysis shares: series styles, panels, axes that read as plain
numbers, the legend under the panels, and how oversubscribed points and repetitions look.

The rules a figure keeps (docs/analysis.md): at most MAX_SERIES series per panel (more are
split over panels), each series its own colour and marker, the legend outside the data, tick
labels as plain numbers (32, 0.5, 2), min-max bars over repetitions, and oversubscribed points
(ranks x threads > cores) drawn hollow.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

MAX_SERIES = 6
MARKERS = "osD^v<>ph*"
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]
OVERSUBSCRIBED = "hollow marker: oversubscribed (ranks x threads > cores)"


def chunks(items: Sequence[Any], size: int = MAX_SERIES) -> list[list[Any]]:
    """items in consecutive groups of at most `size`, as even as possible (9 -> 5 + 4, not 6 + 3)."""
    if not items:
        return []
    n = math.ceil(len(items) / size)
    per = math.ceil(len(items) / n)
    return [list(items[i : i + per]) for i in range(0, len(items), per)]


def series_styles(keys: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """A colour and a marker per series, in the order given: the same series looks the same in
    every panel of a figure, and no two of the first ten share a colour."""
    return {k: {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)]} for i, k in enumerate(keys)}


def log2_axis(ax: Axes, ticks: list[int]) -> None:
    """A log2 x axis labelled with the measured values themselves (32, 64, ...), not 2^k."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def plain_log(ax: Axes, axis: str = "y") -> None:
    """A log axis whose ticks read 0.5, 1, 2, 5, 10 ... rather than 10^k: denser the fewer decades
    the data spans (call it after plotting)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 3.0
    subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if decades < 0.8 else (1.0, 2.0, 3.0, 5.0) if decades < 1.6 \
        else (1.0, 2.0, 5.0) if decades < 3.5 else (1.0,)
    target.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def panels(title: str, n: int, ncols: int, width: float = 5.4, height: float = 3.8,
           caption: Optional[str] = None) -> tuple[Any, list[Axes]]:
    """A figure of n panels in rows of ncols, with a light grid; unused cells hidden. With a
    caption, the panels sit in a subfigure above a strip holding the caption in small print, so
    that a legend below the panels never covers it; the subfigure is returned then."""
    rows = math.ceil(n / ncols)
    w = max(8.5, width * ncols + 0.6)
    lines = textwrap.wrap(caption, width=int(20 * w)) if caption else []
    extra = 0.14 * len(lines) + 0.1 if lines else 0.0  # ~0.14 in a line of x-small
    root = Figure(figsize=(w, height * rows + 1.8 + extra), layout="constrained")
    fig = root
    if lines:
        fig, strip = root.subfigures(2, 1, height_ratios=[height * rows + 1.8, extra])
        strip.text(0.01, 1.0, "\n".join(lines), fontsize="x-small", va="top", ha="left")
    axes = fig.subplots(rows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    for ax in axes[:n]:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes[:n]


def legend_below(fig: Any, handles: list[Any], title: str, ncols: int = 3) -> None:
    """Below the panels, outside the data."""
    fig.legend(handles=handles, loc="outside lower center", title=title, fontsize="small", ncols=min(len(handles), ncols))


def save(fig: Any, path: Path, written: list[Path]) -> None:
    """Write the figure (the whole of it, when given a subfigure of panels) as a PNG."""
    fig.figure.savefig(path, dpi=110, bbox_inches="tight")  # nothing cut off, whatever the titles' lengths
    written.append(path)


def draw_series(ax: Axes, x: list[float], y: list[float], lo: list[float], hi: list[float], over: list[bool],
                style: dict[str, Any], **line: Any) -> None:
    """One series: its line and markers, min-max bars where the repetitions differ, and the
    oversubscribed points' markers hollow."""
    ax.plot(x, y, markersize=6, **style, **line)
    if any(h > l for l, h in zip(lo, hi)):
        ax.errorbar(x, y, yerr=[[max(0.0, v - l) for v, l in zip(y, lo)], [max(0.0, h - v) for v, h in zip(y, hi)]],
                    linestyle="none", capsize=3, color=style["color"], linewidth=1)
    hollow = [(a, b) for a, b, o in zip(x, y, over) if o]
    if hollow:
        ax.plot(*zip(*hollow), linestyle="none", marker=style["marker"], markersize=6, color=style["color"],
                markerfacecolor="white", zorder=3)


def series_handle(label: str, style: dict[str, Any], **line: Any) -> Line2D:
    return Line2D([], [], label=label, markersize=6, **style, **line)


def oversubscribed_handle() -> Line2D:
    return Line2D([], [], color="k", marker="o", markerfacecolor="white", linestyle="none", label=OVERSUBSCRIBED)


def varies(rows: list[dict[str, Any]], key: str, what: str) -> bool:
    """Whether the rows' `key` takes more than one value: a figure against it needs that. Where
    it does not, says so on stderr (what: which figure is left out), so no plot has one x."""
    values = sorted({r[key] for r in rows if r.get(key) is not None})
    if len(values) > 1:
        return True
    import sys

    print(f"pbp_hpc.analyze: {what}: every point has {key} {values[0] if values else 'unknown'}", file=sys.stderr)
    return False
