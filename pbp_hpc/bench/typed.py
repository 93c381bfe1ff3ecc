"""The `as typed` rows: `mpiexec -n C python -m pbp_hpc.train` as a user types it, timed.

For each (network, batch) group the parent runs, after the worker job (never beside it: they
would share the cores), the command with only the group's network, training setup, batch and
data settings (Spec.typed_overrides) and none of the tuning the other rows get: no binding
flags, the config's default reducer, no threads setting, no thread variables in the
environment. It trains spec.reps + 1 epochs; the row's times are the `time_s` of the epochs
after the first (train's own per-epoch time: the slowest rank, evaluation excluded). Right after
it, the same command tuned by hand (TUNED_*) gives the `tuned` row beside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pbp_hpc.bench.stopping as stopping
from pbp_hpc.bench.cases import NETWORKS, Spec

THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPI), else the one on PATH."""
    bindir = Path(sys.executable).parent
    return str(bindir / "mpiexec") if (bindir / "mpiexec").exists() else (shutil.which("mpiexec") or "mpiexec")


# What a user who tuned the command by hand would add: the launcher binds one core per rank, one
# BLAS thread each, the shared-memory reducer. Run right after the `as typed` command of the same
# group (the "tuned" row), so that the two are compared side by side, as the goal asks,
# rather than against the worker job's rows measured minutes earlier on a noisy machine.
TUNED_LAUNCH = ["-bind-to", "core:1"]
TUNED_SETS = ["parallel.threads_per_rank=1", "parallel.reducer=shm"]


def command(spec: Spec, layers: list[int], batch: int, tuned: bool = False) -> list[str]:
    items = spec.typed_overrides(layers, batch) + (TUNED_SETS if tuned else [])
    sets = [arg for item in items for arg in ("--set", item)]
    launch = TUNED_LAUNCH if tuned else []
    return [mpiexec(), "-n", str(spec.cores), *launch, sys.executable, "-m", "pbp_hpc.train", *sets, "--json"]


def shown(cmd: list[str]) -> str:
    """The command as a user would type it: `mpiexec` and `python`, not their full paths."""
    short = ["mpiexec" if i == 0 else "python" if a == sys.executable else a for i, a in enumerate(cmd)]
    return shlex.join(short)


def run(spec: Spec, net: str, batch: int, timeout: Optional[float] = None, tuned: bool = False) -> dict[str, Any]:
    """One group's `as typed` record (type "typed"), or with tuned its hand-tuned twin (type
    "tuned"); `error` says why it has no times."""
    layers = NETWORKS[net]
    cmd = command(spec, layers, batch, tuned)
    rec: dict[str, Any] = {"type": "tuned" if tuned else "typed", "net": net, "layers": layers, "batch": batch}
    rec = timed(cmd, rec, timeout)
    return {**rec, "times": rec["epochs_s"][1:], "comm": rec["comm"][1:]}  # the first epoch pays for warming up


def timed(cmd: list[str], rec: dict[str, Any], timeout: Optional[float] = None,
          cpus: Optional[list[int]] = None) -> dict[str, Any]:
    """Run one `pbp_hpc.train ... --json` command (on the cores `cpus`, as `taskset` would, where
    given) with no thread variables in its environment; rec with its every full epoch's `time_s`
    (epochs_s) and reducer share (comm), how it ran, or `error` saying why it has no times."""
    rec = {**rec, "command": shown(cmd), "cpus": cpus, "epochs_s": [], "comm": []}
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    try:
        proc = stopping.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=timeout,
                            preexec_fn=pin)
    except subprocess.TimeoutExpired:
        return {**rec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**rec, "error": f"exit {proc.returncode}: {tail}"}
    out = json.loads(lines[-1])
    if out.get("status") != "ok":
        return {**rec, "error": f"status {out.get('status')}: {out.get('error', '')}"}
    epochs = [e for e in out["epochs"] if not e["partial"]]
    cfg = out.get("config", {})
    active = out.get("active_inputs") or {}
    used = re.search(r"with reducer (\w+)", out.get("communication") or "")
    return {**rec, "epochs_s": [e["time_s"] for e in epochs],
            "comm": [(e["comm_s"] + (e.get("wait_s") or 0.0)) / e["time_s"] for e in epochs if e["time_s"] > 0],
            "first": epochs[0]["time_s"] if epochs else None, "n_train": out["n_train"], "ranks": out["ranks"],
            "threads": out["threads_per_rank"], "reducer": cfg.get("parallel", {}).get("reducer"),
            "reducer_used": used.group(1) if used else None, "parallel": cfg.get("parallel", {}),
            "reducer_reason": out.get("reducer_reason"), "dtype": cfg.get("model", {}).get("dtype"),
            "binding": (out.get("provenance") or {}).get("binding", {}).get("how"),
            "active": active.get("mean_active_fraction"), "grid": out.get("grid"),
            "bytes_per_step": out.get("bytes_per_step")}


def run_all(spec: Spec, timeout: Optional[float] = None) -> list[dict[str, Any]]:
    """Per group, the `as typed` command and right after it the tuned one (ranks bound by the
    launcher, 1 thread, shm): the pair whose ratio the goal is about."""
    out = []
    for net in spec.nets:
        for batch in spec.batches:
            out += [run(spec, net, batch, timeout), run(spec, net, batch, timeout, tuned=True)]
    return out
