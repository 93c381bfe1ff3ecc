"""The sweep's measurement of the network (pbp_hpc.parallel.netprobe, run under the sweep's
launcher on the ranks its points use), before the first point; no MPI in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from pbp_hpc.sweep.launch import launcher_prefix

RETRIES, RETRY_PAUSE_S = 2, 3.0


def for_sweep(points: list[Any], cores: Any, launcher: str, timeout_s: float = 120.0) -> tuple[Any, str]:
    """Measure the network for a sweep's points (a subprocess under the sweep's launcher): on the
    most ranks that fit the cores, bound, or where none fit, on the fewest multi-rank count
    (oversubscribed, and said so). (the measurement or None, a line for the sweep's log)."""
    multi = sorted({p.ranks for p in points if p.ranks > 1})
    if not multi:
        return None, "network: not measured (no point has more than one rank)"
    fit = [r for r in multi if cores is None or r <= cores]
    ranks, over = (fit[-1], False) if fit else (multi[0], True)
    cmd = [*launcher_prefix(launcher, ranks, 1, bind=not over), sys.executable, "-m", "pbp_hpc.parallel.netprobe"]
    out, why = None, ""
    for attempt in range(RETRIES + 1):  # a start can fail for a passing reason (shared memory taken by a job beside it)
        if attempt:
            time.sleep(RETRY_PAUSE_S)
        out, why = _run(cmd, timeout_s)
        if out is not None or why.startswith("TimeoutExpired"):
            break
    if out is None:
        return None, f"network: not measured ({why}); analyze falls back to the runs' own times"
    out["oversubscribed"] = over
    world = [s for s in out["samples"] if s["level"] == "world"]
    big = max(world, key=lambda s: s["bytes"])
    lat = out["latency"].get("same_node_s") or out["latency"].get("other_node_s")
    return out, (f"network: measured on {ranks} ranks, {out['nodes']} node(s): Allreduce {big['bytes']} B in "
                 f"{1e3 * big['seconds']:.3g} ms" + (f", latency {1e6 * lat:.3g} us" if lat else "")
                 + (" (oversubscribed: no rank count fits the cores; the times include waits for a core)" if over else ""))


def _run(cmd: list[str], timeout_s: float) -> tuple[Any, str]:
    """The probe's JSON, or None and why not (its own error, not the launcher's closing words)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode == 0 and proc.stdout.strip():
            return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["no output"]
    own = [ln for ln in lines if not ln.startswith(("srun:", "slurmstepd:"))]
    return None, f"exit {proc.returncode}: " + " | ".join((own or lines)[-3:])
