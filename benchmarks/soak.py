"""Soak test: run a 100-point sweep while killing its processes at random; nothing may be lost.

    python benchmarks/soak.py [--job jobs/soak_tiny.yaml] [--results DIR] [--seed 0] [--kill-every 4]

Rounds of `python -m pbp_hpc.sweep JOB --retry-failed` are started until one finishes with every
point recorded. During a round, every few seconds (uniform in 0.5 .. 2 x --kill-every) one of
these is done at random: SIGKILL to a training process of the running point, SIGKILL to the
point's mpiexec, SIGTERM to the sweep (it stops after the point; resumes next round), SIGKILL to
the sweep itself (mid-point or mid-record). At the end the results file must hold every point
exactly once, each with status ok, and no temporary files or checkpoints may be left behind.
Prints one JSON line with the counts; exit 0 when nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pbp_hpc import results  # noqa: E402
from pbp_hpc.sweep import expand  # noqa: E402


def _kill_one(sweep: subprocess.Popen, rng: random.Random, counts: dict[str, int]) -> bool:
    """Do one random harm to the running sweep; whether the sweep itself was ended."""
    try:
        children = psutil.Process(sweep.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return True
    ranks = [p for p in children if "pbp_hpc.train" in " ".join(_cmdline(p)) and "mpiexec" not in _cmdline(p)[0]]
    launchers = [p for p in children if "mpiexec" in (_cmdline(p) or [""])[0]]
    choice = rng.choice(["rank", "rank", "mpiexec", "sweep-term", "sweep-kill"])
    target = {"rank": ranks, "mpiexec": launchers}.get(choice)
    if target is not None:
        if not target:
            return False
        try:
            rng.choice(target).send_signal(signal.SIGKILL)
            counts[f"killed {choice}"] += 1
        except psutil.NoSuchProcess:
            pass
        return False
    if choice == "sweep-term":
        sweep.send_signal(signal.SIGTERM)
    else:
        for p in children:  # a killed sweep's children die with it (prctl PDEATHSIG); make sure
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        sweep.kill()
    counts[choice] += 1
    return True


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline() or [""]
    except psutil.Error:
        return [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(ROOT / "jobs/soak_tiny.yaml"))
    ap.add_argument("--results", default=None, help="directory for the results file (default: a new temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between harms")
    ap.add_argument("--max-rounds", type=int, default=400)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out_dir = Path(args.results or tempfile.mkdtemp(prefix="pbp_soak."))
    res = out_dir / "soak.h5"
    n_points = len(expand(args.job).points)
    counts = {k: 0 for k in ("rounds", "killed rank", "killed mpiexec", "sweep-term", "sweep-kill")}
    t0 = time.monotonic()
    env = {**os.environ, "MPIR_CVAR_CH4_NETMOD": os.environ.get("MPIR_CVAR_CH4_NETMOD", "ofi")}
    finished = False
    while counts["rounds"] < args.max_rounds:
        counts["rounds"] += 1
        sweep = subprocess.Popen([sys.executable, "-m", "pbp_hpc.sweep", args.job, "--results", str(res), "--retry-failed"],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ended = False
        while sweep.poll() is None and not ended:
            deadline = time.monotonic() + rng.uniform(0.5, 2 * args.kill_every)
            while sweep.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if sweep.poll() is None:
                ended = _kill_one(sweep, rng, counts)
        out, _ = sweep.communicate()
        if sweep.returncode == 0 and res.exists():
            statuses = results.statuses(res)
            if len(statuses) == n_points and all(s == "ok" for s in statuses.values()):
                finished = True
                break
    runs = results.read_runs(res) if res.exists() else []
    keys = [r["key"] for r in runs]
    leftovers = [p.name for p in out_dir.rglob("*") if p.suffix in (".tmp", ".part") or p.name.endswith(".h5.tmp")]
    checkpoints = list(out_dir.glob(".soak.h5.checkpoints/*"))
    lost = n_points - len(set(keys))
    report = {"points": n_points, "recorded": len(keys), "unique": len(set(keys)), "lost": lost,
              "duplicates": len(keys) - len(set(keys)), "not_ok": sum(r["status"] != "ok" for r in runs),
              "leftover_temporary_files": leftovers, "leftover_checkpoints": len(checkpoints),
              "finished": finished, "seconds": round(time.monotonic() - t0, 1), **counts, "results": str(res)}
    print(json.dumps(report))
    good = finished and lost == 0 and report["duplicates"] == 0 and report["not_ok"] == 0 and not leftovers \
        and not checkpoints
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
