"""`--slurm`: submit a sweep as a Slurm job array (one point per task, slurm/sweep.sh) and a merge
job after it (slurm/merge.sh), or print both sbatch commands. Each submission's job logs go to a
folder of their own beside the results (RESULTS/logs/<date-time>/), not to the submit directory, so
that job IDs used again (a restarted test bed) can neither append to nor overwrite older logs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from pbp_hpc.errors import ConfigError
from pbp_hpc.sweep.expand import Sweep
from pbp_hpc.sweep.spec import ROOT


def log_dir_for(results_dir: Path, now: Optional[float] = None) -> Path:
    """The folder for one submission's job logs: RESULTS/logs/<date-time>, with -2, -3, ... when taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = results_dir / "logs" / stamp
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{stamp}-{n}")
    return candidate


def slurm_commands(sweep: Sweep, results_dir: Path, sbatch_args: list[str], array_job: str,
                   log_dir: Optional[Path] = None) -> tuple[list[str], list[str], dict[str, str]]:
    """The two sbatch commands (array of points, then the merge after array_job) and their environment.

    Their logs go to log_dir (default RESULTS/logs); --output in sbatch_args comes later and wins.
    """
    if sweep.split_cores is not None and sweep.spec.cores is None:
        # Here (a login node) the split sizes the allocation; in the array task the allocation sizes the split.
        raise ConfigError(f"{sweep.path}: hybrid_split: best with --slurm needs `cores:` in the sweep file (the cores of "
                          "one array task's allocation, e.g. a node's): the hybrid splits must be chosen for the same "
                          f"cores where the array is submitted and where each task runs (here: {sweep.split_cores})")
    n = len(sweep.points)
    ranks = max(p.ranks for p in sweep.points)
    threads = max(p.threads for p in sweep.points)
    logs = (log_dir or results_dir / "logs").resolve()
    env = {"PBP_JOBFILE": str(sweep.path.resolve()), "PBP_RESULTS_DIR": str(results_dir.resolve()), "PBP_SWEEP_POINTS": str(n),
           "PBP_LOG_DIR": str(logs)}
    array = ["sbatch", "--parsable", f"--output={logs}/%x-%A_%a.out", f"--array=0-{n - 1}", f"--ntasks={ranks}",
             f"--cpus-per-task={threads}", *sbatch_args, str(ROOT / "slurm" / "sweep.sh")]
    merge = ["sbatch", "--parsable", f"--output={logs}/%x-%j.out", f"--dependency=afterany:{array_job}", *sbatch_args,
             str(ROOT / "slurm" / "merge.sh")]
    return array, merge, env


def check_allocation(sweep: Sweep, k: int, jobfile: Path) -> None:
    """In an array task (srun launcher): refuse, before training, a point that needs more ranks than
    the allocation's tasks, naming the sbatch options that fit every point (srun would otherwise fail
    the point with "More processors requested than permitted" and record it as failed)."""
    ntasks = os.environ.get("SLURM_NTASKS")
    point = sweep.points[k]
    if not ntasks or not ntasks.isdigit() or point.ranks <= int(ntasks):
        return
    n = len(sweep.points)
    ranks = max(p.ranks for p in sweep.points)
    threads = max(p.threads for p in sweep.points)
    raise ConfigError(f"point {k} needs {point.ranks} ranks x {point.threads} threads, but this array task has "
                      f"--ntasks={ntasks}: submit with  sbatch --array=0-{n - 1} --ntasks={ranks} "
                      f"--cpus-per-task={threads} slurm/sweep.sh {jobfile}  (every point's largest), or let "
                      f"python -m pbp_hpc.sweep {jobfile} --slurm  size it")


def _sbatch(cmd: list[str], env: dict[str, str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if p.returncode != 0:
        raise ConfigError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"


def submit(sweep: Sweep, results_dir: Path, sbatch_args: list[str], dry_run: bool, say: Any = print) -> int:
    """Submit the points as a job array and the merge job after it (or print both commands)."""
    log_dir = log_dir_for(results_dir)
    if dry_run:
        array, merge, env = slurm_commands(sweep, results_dir, sbatch_args, "<array job id>", log_dir)
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        say(f"{prefix} {shlex.join(array)}\n{prefix} {shlex.join(merge)}")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs sbatch, which is not on PATH: run it on a Slurm login node")
    log_dir.mkdir(parents=True)  # Slurm does not create the folder of --output: without it a job loses its log
    array, _, env = slurm_commands(sweep, results_dir, sbatch_args, "", log_dir)
    array_id = _sbatch(array, env)
    merge_id = _sbatch(slurm_commands(sweep, results_dir, sbatch_args, array_id, log_dir)[1], env)
    say(f"submitted array job {array_id} ({len(sweep.points)} points) and merge job {merge_id}; "
        f"results in {results_dir}/point-*.h5, merged into {results_dir}/merged.h5; job logs in {log_dir}/")
    return 0
