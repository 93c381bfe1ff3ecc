"""The command line of `python -m pbp_hpc.sweep`: its arguments, the `--list` and `--dry-run`
lines, and main, which maps errors to exit codes (2 for a bad sweep or results file, 1 otherwise).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from pbp_hpc import results
from pbp_hpc.errors import ConfigError, PbpError, ResultsError
from pbp_hpc.parallel import hybrid
from pbp_hpc.sweep.expand import Sweep, available_cores, expand, skip_reason
from pbp_hpc.sweep.identity import check_recorded, mismatches, stale_note
from pbp_hpc.sweep.launch import checkpoint_path, command
from pbp_hpc.sweep.process import Stop
from pbp_hpc.sweep.runner import Options, plan, run_sweep
from pbp_hpc.sweep.slurm import check_allocation, submit

# --help's description: the first line of the package's docstring (pbp_hpc/sweep/__init__.py), which
# this module cannot import (the package imports it).
DESCRIPTION = "Parameter sweeps: `python -m pbp_hpc.sweep jobs/X.yaml --results results/X.h5`."


def list_lines(sweep: Sweep, opts: Options) -> list[str]:
    identities = results.identities(opts.results)
    recorded = {key: rec["status"] for key, rec in identities.items()}
    other = mismatches(sweep, identities)
    cores = available_cores(sweep.spec, opts.launcher)
    study = bool(sweep.spec.axes.strategy or sweep.spec.axes.straggler_factor)  # columns only where the axes are
    variants, seeds = bool(sweep.spec.axes.variant), sweep.spec.seeds > 1
    rows = [["point", "rep", "implementation", "network", "dtype", "batch", "ranks", "threads",
             *(["strategy", "straggler"] if study else []), *(["variant"] if variants else []),
             *(["seed"] if seeds else []), "state"]]
    for point, rep in sorted(plan(sweep, opts), key=lambda pr: (pr[0].index, pr[1])):
        key = results.run_key(sweep.spec.name, point.index, rep)
        reason = skip_reason(point, sweep.spec, cores)
        state = f"recorded ({recorded[key]})" if key in recorded else (f"skip: {reason}" if reason else "to run")
        if key in other:
            state = f"recorded ({recorded[key]}) BY ANOTHER POINT: " + "; ".join(other[key])
        if point.split_origin:
            state += f"; split {point.ranks}x{point.threads} ({point.split_origin})"
        rows.append([str(point.index), str(rep), point.implementation, point.network, point.dtype, str(point.batch_size),
                     str(point.ranks), str(point.threads),
                     *([point.strategy, f"x{point.straggler_factor:g}"] if study else []),
                     *([str(point.variant)] if variants else []), *([str(point.seed)] if seeds else []), state])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows]
    n = len(sweep.points)
    per_seed = f" ({n // sweep.spec.seeds} x {sweep.spec.seeds} seeds)" if seeds else ""
    lines.append(f"{n} points{per_seed} x {sweep.spec.repetitions} repetition(s); Slurm array 0-{n - 1}; {cores} cores here; results {opts.results}")
    if other:
        lines.append(f"{len(other)} run(s) in {opts.results} are recorded by another point under this sweep's keys (the sweep "
                     "file changed since): running it into this file is refused; use a new --results file")
    note = stale_note(sweep, identities, opts.results)
    if note:
        lines.append(note)
    if sweep.split_cores is not None:
        lines.append(f"hybrid_split: best -- each hybrid point at the fastest measured split of {sweep.split_cores} cores "
                     f"with at least 2 ranks ({hybrid.shown_path(hybrid.splits_path())}; remeasure with python -m pbp_hpc.bench)")
    return lines


def dry_run_lines(sweep: Sweep, opts: Options) -> list[str]:
    recorded = {key: rec["status"] for key, rec in check_recorded(sweep, opts.results).items()}  # as a run would
    cores = available_cores(sweep.spec, opts.launcher)
    lines = []
    for point, rep in plan(sweep, opts):
        key = results.run_key(sweep.spec.name, point.index, rep)
        if key in recorded and not (opts.retry_failed and recorded[key] in ("failed", "timeout")):
            continue
        reason = skip_reason(point, sweep.spec, cores)
        if reason:
            lines.append(f"# {key}: skipped: {reason}")
            continue
        env = f"OMP_NUM_THREADS={point.threads} OPENBLAS_NUM_THREADS={point.threads} MKL_NUM_THREADS={point.threads}"
        cmd = command(sweep, point, opts.launcher, checkpoint_path(opts.results, key), opts.data_dir, cores)
        origin = f": {point.implementation} split {point.ranks}x{point.threads} ({point.split_origin})" if point.split_origin else ""
        lines.append(f"# {key}{origin}\n{env} {shlex.join(cmd)}")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.sweep", description=DESCRIPTION)
    p.add_argument("jobfile", type=Path, help="sweep file, e.g. jobs/paper_net1h.yaml")
    p.add_argument("--results", type=Path, help="HDF5 results file (default results/<sweep name>.h5)")
    p.add_argument("--list", action="store_true", help="print the points and whether each is recorded, then exit")
    p.add_argument("--point", type=int, metavar="K", help="run only point K (a Slurm array task's share)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed or timed out")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default="mpiexec",
                   help="how ranks start: mpiexec (env PBP_MPIEXEC overrides it) or srun inside a Slurm allocation "
                        "(srun --mpi=$PBP_SRUN_MPI, default pmi2; env PBP_SRUN overrides it)")
    p.add_argument("--data-dir", help="MNIST folder passed to every point (same as data.dir)")
    p.add_argument("--slurm", action="store_true", help="submit the sweep as a Slurm job array plus a merge job")
    p.add_argument("--results-dir", type=Path, help="with --slurm: folder for point-*.h5 (default results/<job file stem>)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="with --slurm: extra sbatch option, e.g. --sbatch-arg=--time=00:20:00 (repeatable)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sweep = expand(args.jobfile)
        if args.point is not None and not 0 <= args.point < len(sweep.points):
            raise ConfigError(f"--point {args.point}: {args.jobfile} has points 0 to {len(sweep.points) - 1}")
        if args.slurm:
            return submit(sweep, args.results_dir or Path("results") / args.jobfile.stem, args.sbatch_arg, args.dry_run)
        opts = Options(results=args.results or Path("results") / f"{sweep.spec.name}.h5", launcher=args.launcher,
                       retry_failed=args.retry_failed, data_dir=args.data_dir, point=args.point)
        if args.list:
            print("\n".join(list_lines(sweep, opts)))
            return 0
        if args.dry_run:
            print("\n".join(dry_run_lines(sweep, opts)))
            return 0
        if args.point is not None and args.launcher == "srun":
            check_allocation(sweep, args.point, args.jobfile)
        stop = Stop()
        stop.install()
        return run_sweep(sweep, opts, stop, say=lambda s: print(s, flush=True))
    except (ConfigError, ResultsError) as exc:
        print(f"pbp_hpc.sweep: error: {exc}", file=sys.stderr)
        return 2
    except PbpError as exc:
        print(f"pbp_hpc.sweep: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
