"""Running a sweep: each unrecorded (point, repetition) as its own process, one after another, its
outcome appended to the results file as a record; a stop signal ends the sweep after the point.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pbp_hpc import results
from pbp_hpc.engine import model
from pbp_hpc.errors import ResultsError
from pbp_hpc.parallel import provenance
from pbp_hpc.sweep import network
from pbp_hpc.sweep.expand import Point, Sweep, available_cores, describe, skip_reason
from pbp_hpc.sweep.identity import check_recorded, stale_note
from pbp_hpc.sweep.launch import checkpoint_path, child_env, command, trace_path
from pbp_hpc.sweep.process import Outcome, Stop, execute


EXIT_NOT_RECORDED = 4  # a finished run could not be written to the results file (disk full)


@dataclass
class Options:
    results: Path
    launcher: str = "mpiexec"
    retry_failed: bool = False
    data_dir: Optional[str] = None
    point: Optional[int] = None


def plan(sweep: Sweep, opts: Options) -> list[tuple[Point, int]]:
    """(point, repetition) pairs in run order: repetition-major, so drift spreads over all points."""
    points = sweep.points if opts.point is None else [sweep.points[opts.point]]
    return [(p, r) for r in range(sweep.spec.repetitions) for p in points]


def log_path(results_path: Path, key: str) -> Path:
    """Where a run's stderr goes (its per-epoch lines, or why it failed); kept after the run."""
    return results_path.with_suffix(".logs") / f"{key}.log"


def base_record(sweep: Sweep, point: Point, repetition: int) -> dict[str, Any]:
    """What the sweep knows of a run before it starts: enough for a failed run's record."""
    return {
        "sweep": sweep.spec.name, "point": point.index, "repetition": repetition,
        "implementation": point.implementation, "network": point.network, "batch_size": point.batch_size,
        "ranks": point.ranks, "threads_per_rank": point.threads, "config": point.config,
        "warmup_epochs": sweep.spec.warmup_epochs, "flops_per_example": model.flops_per_example(point.layers),
        "n_params": model.Layout(point.layers).n_params, "test_accuracy": None, "total_time_s": None, "epochs": [],
        "provenance": {"host": os.uname().nodename, "package_version": _package_version(), "git_revision": provenance.git_revision()},
    }


def _package_version() -> str:
    from pbp_hpc import __version__
    return __version__


def make_record(sweep: Sweep, point: Point, repetition: int, outcome: Outcome) -> dict[str, Any]:
    rec = base_record(sweep, point, repetition)
    identity = {k: rec[k] for k in ("sweep", "point", "repetition", "implementation", "network", "batch_size",
                                    "ranks", "threads_per_rank")}
    rec.update(outcome.result or {})
    rec.update(identity)  # the sweep's names for the run win over the child's
    rec["status"] = outcome.status
    rec["error"] = outcome.error
    rec["sweep_wall_s"] = outcome.seconds  # process start to exit, as the sweep saw it
    return rec


def run_sweep(sweep: Sweep, opts: Options, stop: Stop, say: Any = print) -> int:
    """Run every unrecorded point; return the exit code (0 ok, 1 some point failed)."""
    identities = check_recorded(sweep, opts.results)  # before anything runs
    recorded = {key: rec["status"] for key, rec in identities.items()}
    note = stale_note(sweep, identities, opts.results)
    if note:
        say(note)
    cores = available_cores(sweep.spec, opts.launcher)
    counts = dict.fromkeys(("ok", "diverged", "failed", "timeout", "skipped", "already recorded"), 0)
    todo = plan(sweep, opts)
    interconnect = _measure_network(sweep, opts, cores, todo, recorded, say)
    for i, (point, rep) in enumerate(todo, 1):
        if stop.requested:
            break
        key = results.run_key(sweep.spec.name, point.index, rep)
        prior = recorded.get(key)
        retry = prior in ("failed", "timeout") and opts.retry_failed
        if prior is not None and not retry:
            counts["already recorded"] += 1
            counts[prior] += prior in ("failed", "timeout")  # still a failure of this sweep
            continue
        reason = skip_reason(point, sweep.spec, cores)
        if reason:
            counts["skipped"] += 1
            say(f"[{i}/{len(todo)}] {key} {describe(point)}: skipped: {reason}")
            continue
        ckpt = checkpoint_path(opts.results, key)
        traced = trace_path(opts.results, key) if sweep.spec.trace else None
        outcome = execute(command(sweep, point, opts.launcher, ckpt, opts.data_dir, cores, traced), child_env(point),
                          sweep.spec.timeout_s, stop, log_path(opts.results, key))
        if outcome.status == "interrupted":
            say(f"[{i}/{len(todo)}] {key}: interrupted by signal {stop.signals[0]}; not recorded (it resumes on the next run)")
            break
        try:
            results.append_run(opts.results, {**make_record(sweep, point, rep, outcome), "interconnect": interconnect},
                               replace=retry)
        except ResultsError as exc:  # a full disk, say: the run is done but not recorded
            say(f"[{i}/{len(todo)}] {key}: {outcome.status} but not recorded: {exc}. Its checkpoint {ckpt} is kept: "
                "run the sweep again once there is room, and it records the run without training it again")
            say(f"sweep {sweep.spec.name}: stopped: the results file cannot be written")
            return EXIT_NOT_RECORDED
        ckpt.unlink(missing_ok=True)
        # and what a run killed while writing its checkpoint left (checkpoint.save's temporary file,
        # which SIGKILL gives it no chance to remove): the run is recorded, nothing will resume it
        for stray in ckpt.parent.glob(ckpt.name + ".*.tmp"):
            stray.unlink(missing_ok=True)
        counts[outcome.status] += 1
        say(f"[{i}/{len(todo)}] {key} {describe(point)}: {_summary(outcome)}")
    _cleanup_checkpoint_dir(opts.results)
    say(f"sweep {sweep.spec.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f" ({len(todo)} runs planned) -> {opts.results}")
    if stop.requested:
        return 0 if stop.signals[0] == signal.SIGUSR1 else 128 + stop.signals[0]
    if counts["failed"] or counts["timeout"]:
        say("some points failed (see `python -m pbp_hpc.results show` for their errors; --retry-failed reruns them)")
        return 1
    return 0


def _measure_network(sweep: Sweep, opts: Options, cores: Optional[int], todo: list[tuple[Point, int]],
                     recorded: dict[str, str], say: Any) -> Optional[dict[str, Any]]:
    """The network on the ranks the points to run will use (once per sweep invocation: under
    Slurm, once per job); None where measure_network is off or nothing multi-rank runs."""
    if not sweep.spec.measure_network:
        return None
    pending = [p for p, r in todo if recorded.get(results.run_key(sweep.spec.name, p.index, r)) in (None, "failed", "timeout")
               and not skip_reason(p, sweep.spec, cores)]
    if not any(p.ranks > 1 for p in pending):
        return None
    found, line = network.for_sweep(pending, cores, opts.launcher)
    say(line)
    return found


def _summary(o: Outcome) -> str:
    if o.status == "ok" and o.result:
        tpe = results.tpe({**o.result, "warmup_epochs": o.result.get("warmup_epochs")})
        acc = o.result.get("test_accuracy")
        return (f"ok, TPE {tpe:.4f} s" if tpe is not None else "ok") + (f", test acc {acc:.4f}" if acc is not None else "") + f" ({o.seconds:.1f} s)"
    return f"{o.status} ({o.seconds:.1f} s): {results.headline(o.error)}"


def _cleanup_checkpoint_dir(results_path: Path) -> None:
    d = checkpoint_path(results_path, "x").parent
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
