"""Accuracy stated with its spread: mean, standard deviation, min and max over a configuration's
runs (its seeds, from a sweep's `seeds: N`, and any repetitions), and the fraction of them that
reached the target. One seed's 97.88% against another's 97.84% says nothing; these numbers say
whether a difference is larger than the seeds' own.

The standard deviation is the sample one (n - 1); with one run it is 0 and the table shows the
run count beside it, so a single seed is never mistaken for a measured spread.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Optional

from pbp_hpc.analyze.records import Record, _cfg


def summary(values: Iterable[Optional[float]]) -> dict[str, Optional[float]]:
    """mean, std (sample; 0 for one value), min, max of the values given (None ignored); Nones if none."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vs), "std": statistics.stdev(vs) if len(vs) > 1 else 0.0,
            "min": min(vs), "max": max(vs)}


def spread_fields(runs: list[Record], reached: list[dict[str, Any]]) -> dict[str, Any]:
    """A time-to-accuracy row's spread: over all runs for test accuracy, over the runs that
    reached the target for time, epochs and steps to it (`reached`: their target records)."""
    out: dict[str, Any] = {"seeds": len({_cfg(r, "train", "seed") for r in runs}),
                           "reached_fraction": len(reached) / len(runs) if runs else 0.0}
    for name, values in (("test_accuracy", [r.get("test_accuracy") for r in runs]),
                         ("best_val", [r.get("best_val_accuracy") for r in runs]),
                         ("time_to_target", [t.get("time_s") for t in reached]),
                         ("epochs_to_target", [t.get("epochs") for t in reached]),
                         ("steps_to_target", [t.get("steps") for t in reached])):
        for stat, v in summary(values).items():
            out[f"{name}_{stat}"] = v
    return out


def plus_minus(row: dict[str, Any], name: str, scale: float = 1.0, spec: str = ".2f", span: bool = True) -> str:
    """`97.85 ± 0.07 (97.76–97.93)` from a row's {name}_mean/_std/_min/_max; "-" where missing."""
    mean = row.get(f"{name}_mean")
    if mean is None:
        return "-"
    text = f"{format(mean * scale, spec)} ± {format(row[f'{name}_std'] * scale, spec)}"
    if span and row[f"{name}_max"] != row[f"{name}_min"]:
        text += f" ({format(row[f'{name}_min'] * scale, spec)}–{format(row[f'{name}_max'] * scale, spec)})"
    return text
