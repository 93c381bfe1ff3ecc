"""Parameter sweeps: `python -m pbp_hpc.sweep jobs/X.yaml --results results/X.h5`.

A sweep file (jobs/*.yaml, format in docs/sweeps.md) names a base configuration and axes
(implementation, network, batch size, ranks, threads, dtype); their product, filtered by what
each implementation can be (naive-serial is 1 rank x 1 thread, ...) and by `where:`/`exclude:`,
is the list of points, numbered from 0 in a fixed order that does not depend on the machine
(a Slurm array task K must mean the same point everywhere). With `hybrid_split: best` the
`hybrid` implementation has one point per network, dtype and batch size instead, at the fastest
ranks x threads split that `python -m pbp_hpc.bench` measured for the cores the sweep plans for
(pbp_hpc.hybrid): the number of points still does not depend on the machine, their split does. Each point and repetition runs
as its own process, `mpiexec -n P python -m pbp_hpc.train ... --json`, and its JSON result
is appended to an HDF5 results file (pbp_hpc.results). Rerun, the sweep skips what is
recorded; a point that fails is recorded as failed and the sweep goes on. A run is keyed by its
point's number, so before anything runs the sweep checks that each run recorded under its keys
is still that point (check_recorded): after an edit of the sweep file, point K may be another.

What cannot run here (CuPy or torch missing, more cores than the machine has) is skipped at
run time with a reason, keeping its index.

The tool is split by job; each module imports only those above it in this list:
  spec      the sweep file's schema (RULES, SweepSpec), loading it, its errors
  expand    its points (Point, Sweep, expand; hybrid_split: best), cores, skip reasons
  launch    one point's launcher words, command line and environment
  process   one point's process: timeout, stop signals (Stop), how it ended (Outcome)
  identity  whether the runs recorded under the sweep's keys are still its points
  runner    the sweep's run: records and run_sweep
  slurm     --slurm: the job array and the merge job
  cli       arguments, --list / --dry-run lines, main
"""

from pbp_hpc.sweep.cli import DESCRIPTION, dry_run_lines, list_lines, main, parse_args
from pbp_hpc.sweep.expand import Point, Sweep, available_cores, describe, expand, planned_cores, skip_reason
from pbp_hpc.sweep.identity import (MAX_SHOWN_MISMATCHES, NOT_IDENTITY_KEYS, NOT_IDENTITY_PREFIXES, check_recorded,
                                    identity_differences, mismatches)
from pbp_hpc.sweep.launch import checkpoint_path, child_env, command, default_mpiexec, launcher_prefix
from pbp_hpc.sweep.process import STDERR_TAIL, Outcome, Stop, execute
from pbp_hpc.sweep.runner import Options, base_record, log_path, make_record, plan, run_sweep
from pbp_hpc.sweep.slurm import log_dir_for, slurm_commands, submit
from pbp_hpc.sweep.spec import (AXES, CONTROLLED, NETWORKS, ROOT, RULES, Axes, Implementation, Rule, SweepSpec,
                                load_spec)

__all__ = [
    "AXES", "CONTROLLED", "DESCRIPTION", "MAX_SHOWN_MISMATCHES", "NETWORKS", "NOT_IDENTITY_KEYS", "NOT_IDENTITY_PREFIXES",
    "ROOT", "RULES", "STDERR_TAIL", "Axes", "Implementation", "Options", "Outcome", "Point", "Rule", "Stop", "Sweep",
    "SweepSpec", "available_cores", "base_record", "check_recorded", "checkpoint_path", "child_env", "command",
    "default_mpiexec", "describe", "dry_run_lines", "execute", "expand", "identity_differences", "launcher_prefix",
    "list_lines", "load_spec", "log_dir_for", "log_path", "main", "make_record", "mismatches", "parse_args", "plan", "planned_cores",
    "run_sweep", "skip_reason", "slurm_commands", "submit",
]
