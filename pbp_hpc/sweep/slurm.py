"""`--slurm`: submit a sweep as a Slurm job array (one point per task, slurm/sweep.sh) and a merge
job after it (slurm/merge.sh), or print both sbatch commands.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pbp_hpc.errors import ConfigError
from pbp_hpc.sweep.expand import Sweep
from pbp_hpc.sweep.spec import ROOT


def slurm_commands(sweep: Sweep, results_dir: Path, sbatch_args: list[str], array_job: str) -> tuple[list[str], list[str], dict[str, str]]:
    """The two sbatch commands (array of points, then the merge after array_job) and their environment."""
    if sweep.split_cores is not None and sweep.spec.cores is None:
        # Here (a login node) the split sizes the allocation; in the array task the allocation sizes the split.
        raise ConfigError(f"{sweep.path}: hybrid_split: best with --slurm needs `cores:` in the sweep file (the cores of "
                          "one array task's allocation, e.g. a node's): the hybrid splits must be chosen for the same "
                          f"cores where the array is submitted and where each task runs (here: {sweep.split_cores})")
    n = len(sweep.points)
    ranks = max(p.ranks for p in sweep.points)
    threads = max(p.threads for p in sweep.points)
    env = {"PBP_JOBFILE": str(sweep.path.resolve()), "PBP_RESULTS_DIR": str(results_dir.resolve()), "PBP_SWEEP_POINTS": str(n)}
    array = ["sbatch", "--parsable", f"--array=0-{n - 1}", f"--ntasks={ranks}", f"--cpus-per-task={threads}",
             *sbatch_args, str(ROOT / "slurm" / "sweep.sh")]
    merge = ["sbatch", "--parsable", f"--dependency=afterany:{array_job}", *sbatch_args, str(ROOT / "slurm" / "merge.sh")]
    return array, merge, env


def _sbatch(cmd: list[str], env: dict[str, str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if p.returncode != 0:
        raise ConfigError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"


def submit(sweep: Sweep, results_dir: Path, sbatch_args: list[str], dry_run: bool, say: Any = print) -> int:
    """Submit the points as a job array and the merge job after it (or print both commands)."""
    if dry_run:
        array, merge, env = slurm_commands(sweep, results_dir, sbatch_args, "<array job id>")
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        say(f"{prefix} {shlex.join(array)}\n{prefix} {shlex.join(merge)}")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs sbatch, which is not on PATH: run it on a Slurm login node")
    results_dir.mkdir(parents=True, exist_ok=True)
    array, _, env = slurm_commands(sweep, results_dir, sbatch_args, "")
    array_id = _sbatch(array, env)
    merge_id = _sbatch(slurm_commands(sweep, results_dir, sbatch_args, array_id)[1], env)
    say(f"submitted array job {array_id} ({len(sweep.points)} points) and merge job {merge_id}; "
        f"results in {results_dir}/point-*.h5, merged into {results_dir}/merged.h5")
    return 0
