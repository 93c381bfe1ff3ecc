"""How one point is started: the MPI launcher's words (mpiexec or srun, with or without binding),
the point's command line and the environment its ranks get.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import hybrid
from pbp_hpc.sweep.expand import Point, Sweep, available_cores
from pbp_hpc.sweep.spec import yaml_value


def default_mpiexec() -> str:
    """mpiexec on PATH, else the one next to this Python (an MPI installed into the venv)."""
    return shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))


def launcher_prefix(launcher: str, ranks: int, threads: int, bind: bool = False) -> list[str]:
    """The MPI launcher's words before the program; PBP_MPIEXEC / PBP_SRUN replace the defaults.

    A replacement may use {ranks} and {threads}; without {ranks}, `-n <ranks>` is appended; it is
    used as it is (bind or not). bind: the default launcher binds each rank to its own `threads`
    cores -- srun --cpu-bind=cores; mpiexec as its flavour spells it (MPICH's Hydra, Open MPI;
    pbp_hpc.hybrid.mpiexec_args), nothing for an mpiexec it does not recognise. Pass bind only
    when ranks x threads fit the cores: binding more ranks than cores stacks them on the first.
    """
    if launcher == "srun":
        template = os.environ.get("PBP_SRUN") or (f"srun --mpi={os.environ.get('PBP_SRUN_MPI') or 'pmi2'} --kill-on-bad-exit=1 "
                                                 + ("--cpu-bind=cores " if bind else "") + "--cpus-per-task={threads}")
    elif os.environ.get("PBP_MPIEXEC"):
        template = os.environ["PBP_MPIEXEC"]
    else:
        mpiexec = default_mpiexec()
        return [mpiexec, *hybrid.mpiexec_args(ranks, threads, hybrid.mpi_flavour(mpiexec) if bind else None)]
    var = "PBP_SRUN" if launcher == "srun" else "PBP_MPIEXEC"
    try:
        words = [w.format(ranks=ranks, threads=threads) for w in shlex.split(template)]
    except (KeyError, IndexError, ValueError, AttributeError) as exc:  # {rank}, {0}, an unmatched { or quote
        raise ConfigError(f"{var}={template!r} is not a usable launcher template ({type(exc).__name__}: {exc}); it may "
                          "use {ranks} and {threads}, and {{ }} for literal braces") from None
    return words if "{ranks}" in template else [*words, "-n", str(ranks)]


def checkpoint_path(results_path: Path, key: str) -> Path:
    """A run's checkpoint: next to the results file, hidden, one per run key (removed once recorded)."""
    return results_path.parent / f".{results_path.name}.checkpoints" / f"{key}.h5"


def trace_path(results_path: Path, key: str) -> Path:
    """A run's timeline, where the sweep asks for one (trace: true): kept beside the results."""
    return results_path.with_suffix(".traces") / f"{key}.json"


def command(sweep: Sweep, point: Point, launcher: str, ckpt: Optional[Path], data_dir: Optional[str],
            cores: Optional[int] = None, trace: Optional[Path] = None) -> list[str]:
    """The point's command line; cores (default available_cores) decides whether its ranks are bound."""
    if cores is None:
        cores = available_cores(sweep.spec, launcher)
    # Each rank gets its own `threads` cores when they fit, as the benchmark measured the splits.
    # Unbound, Linux stacked two communicating ranks on one core (a waiting rank yields and the
    # scheduler wakes its peer on the CPU where it slept): 2x1 ran 3-5x slower than 1x1 at times
    # on the 2-core machine. Oversubscribed points are left unbound: binding would stack ranks.
    bind = point.ranks * point.threads <= cores
    cmd = [*launcher_prefix(launcher, point.ranks, point.threads, bind=bind), sys.executable, "-m", point.rule.module]
    if sweep.base_path:
        cmd += ["--config", str(sweep.base_path)]
    for item in point.overrides:
        cmd += ["--set", item]
    if ckpt is not None and point.rule.module == "pbp_hpc.train":
        # Per point, so a SIGUSR1/SIGTERM'd point resumes where it stopped when the sweep runs again.
        cmd += ["--set", f"checkpoint.path={yaml_value(str(ckpt.resolve()))}", "--set", "checkpoint.resume=true"]
    if trace is not None and point.rule.module == "pbp_hpc.train":
        trace.parent.mkdir(parents=True, exist_ok=True)
        cmd += ["--set", f"train.trace={yaml_value(str(trace.resolve()))}"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return [*cmd, "--json"]


def child_env(point: Point) -> dict[str, str]:
    """This environment, with every BLAS/OpenMP thread count set to the point's threads per rank."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(point.threads)
    return env
