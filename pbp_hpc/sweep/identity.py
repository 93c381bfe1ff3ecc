"""Is a recorded run this point's? Keys are positional (sweep, point number, repetition): edit the
sweep file and point K may be another point, whose run the old file does not hold. Before anything
runs, check_recorded refuses a results file that holds other points under this sweep's keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pbp_hpc import results
from pbp_hpc.errors import ResultsError
from pbp_hpc.sweep.expand import Point, Sweep, describe
from pbp_hpc.sweep.spec import flatten

# Config keys that say where a run read its data, where it checkpointed, what it showed or what it
# was allowed, not what it computed: a point that differs from its recorded run only in these is
# still that run's point (--data-dir, the per-point checkpoint, oversubscribe: true, ...).
NOT_IDENTITY_PREFIXES = ("checkpoint.",)
NOT_IDENTITY_KEYS = {"data.dir", "data.download", "train.progress", "parallel.oversubscribe"}
# Config keys compared under their own names (the record's attributes) before the rest of the config.
_NAMED_CONFIG = {"model.layers", "model.dtype", "train.batch_size", "parallel.ranks", "parallel.threads_per_rank"}


def _is_identity(config_key: str) -> bool:
    return config_key not in NOT_IDENTITY_KEYS and not config_key.startswith(NOT_IDENTITY_PREFIXES)


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, type(None))) else str(value)


def _flat_config(config: Any) -> dict[str, Any]:
    return flatten(config) if isinstance(config, dict) else {}


def identity_differences(recorded: dict[str, Any], point: Point) -> list[str]:
    """How a recorded run (a `results.identities` value) differs from what `point` is now; [] if it is that point.

    Compared: implementation, layers, dtype, global batch size, ranks, threads per rank, and every
    other config key but those that are not the run's identity (NOT_IDENTITY_*): `train.epochs`,
    `data.n_train`, the learning rate, the seed, ... all make another point. What the record lacks
    (a run recorded without a config, a config key that pbp_hpc did not have then) cannot differ.
    """
    config = recorded.get("config") or {}
    flat = _flat_config(config)
    named = [("implementation", recorded.get("implementation") or None, point.implementation),
             ("layers", flat.get("model.layers"), point.layers),
             ("dtype", flat.get("model.dtype"), point.dtype),
             ("batch_size", recorded.get("batch_size"), point.batch_size),
             ("ranks", recorded.get("ranks"), point.ranks),
             ("threads_per_rank", recorded.get("threads_per_rank"), point.threads)]
    if "model.layers" not in flat:  # no config recorded: the network's label is all there is
        named.insert(1, ("network", recorded.get("network") or None, point.network))
    diffs = [f"{name}: recorded {_shown(was)}, the sweep file now gives {_shown(now)}"
             for name, was, now in named if was is not None and was != now]
    if diffs and point.split_origin and recorded.get("implementation") == point.implementation and all(
            d.startswith(("ranks:", "threads_per_rank:")) for d in diffs):
        diffs.append(f"(hybrid_split: best chose {point.ranks}x{point.threads} here: {point.split_origin}; the recorded run "
                     "got its split for other cores -- `cores:`, the Slurm allocation or the machine -- or from other "
                     "measurements in the splits file)")
    skip = set(_NAMED_CONFIG)
    if recorded.get("implementation") and recorded.get("implementation") != point.implementation:
        skip |= {"algorithm", "backend"}  # follow from the implementation, already named
    now = _flat_config(point.config)
    for key in sorted(flat.keys() & now.keys()):
        if key not in skip and _is_identity(key) and flat[key] != now[key]:
            diffs.append(f"{key}: recorded {_shown(flat[key])}, the sweep file now gives {_shown(now[key])}")
    return diffs


def _describe_recorded(rec: dict[str, Any]) -> str:
    """A recorded run as describe shows a point ('?' for what it was recorded without), and its status."""
    flat = _flat_config(rec.get("config"))

    def val(v: Any) -> str:
        return "?" if v is None else str(v)

    return (f"{rec.get('implementation') or '?'} {rec.get('network') or val(flat.get('model.layers'))} "
            f"{val(flat.get('model.dtype'))} B={val(rec.get('batch_size'))} {val(rec.get('ranks'))}x"
            f"{val(rec.get('threads_per_rank'))}, status {rec.get('status') or '?'}")


def _sweep_keys(sweep: Sweep) -> dict[str, Point]:
    """Every run key of the sweep (all points, all repetitions) -> its point."""
    return {results.run_key(sweep.spec.name, p.index, r): p for p in sweep.points for r in range(sweep.spec.repetitions)}


def mismatches(sweep: Sweep, recorded: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """key -> differences, for every run recorded under a key of this sweep that is not the point it names now."""
    out = {}
    for key, point in _sweep_keys(sweep).items():
        if key in recorded:
            diffs = identity_differences(recorded[key], point)
            if diffs:
                out[key] = diffs
    return out


MAX_SHOWN_MISMATCHES = 5


def check_recorded(sweep: Sweep, results_path: Path) -> dict[str, dict[str, Any]]:
    """The runs of the results file (`results.identities`), once every run recorded under a key of the sweep
    is known to be the point that key names now; else ResultsError saying which are not and what to do.

    All points and repetitions are checked, whatever --point says: nothing runs, nothing is skipped as
    "already recorded" and nothing is retried in a file that holds other points under this sweep's keys.
    """
    recorded = results.identities(results_path)
    bad = mismatches(sweep, recorded)
    if not bad:
        return recorded
    keys = _sweep_keys(sweep)
    lines = [f"results file {results_path} holds {len(bad)} run(s) under keys of sweep {sweep.spec.name!r} that are not "
             f"the points {sweep.path} defines now (a key is sweep.p<point>.r<repetition>, and point numbers follow the "
             "sweep file: editing its axes, base, set, where/exclude or hybrid_split changes or renumbers points):"]
    for key in list(bad)[:MAX_SHOWN_MISMATCHES]:
        point = keys[key]
        lines.append(f"  {key}: recorded {_describe_recorded(recorded[key])}; point {point.index} is now {describe(point)}")
        lines += [f"      {d}" for d in bad[key]]
    if len(bad) > MAX_SHOWN_MISMATCHES:
        lines.append(f"  ... and {len(bad) - MAX_SHOWN_MISMATCHES} more (`--list` marks them all)")
    lines.append(f"Nothing was run. Write this sweep to a new results file (--results NEW.h5; with --slurm, --results-dir "
                 f"NEW_DIR), or move {results_path} away and run again; restoring the sweep file as it was recorded "
                 "makes those runs its own again.")
    raise ResultsError("\n".join(lines))


def stale_note(sweep: Sweep, recorded: dict[str, dict[str, Any]], results_path: Path) -> Optional[str]:
    """A note on runs of this sweep's name under keys that are no point of it now (fewer points or repetitions)."""
    keys = _sweep_keys(sweep)
    stale = sorted(k for k, rec in recorded.items() if rec.get("sweep") == sweep.spec.name and k not in keys)
    if not stale:
        return None
    return (f"note: {results_path} also holds {len(stale)} run(s) of sweep {sweep.spec.name} that are no point of "
            f"{sweep.path} now ({stale[0]}{', ...' if len(stale) > 1 else ''}: the sweep file has {len(sweep.points)} "
            f"points x {sweep.spec.repetitions} repetition(s)); they stay in the file")
