"""`python -m pbp_hpc.bench`: the arguments, the header lines, the worker job's launch, and main.

The parent process imports neither MPI nor torch nor JAX: it starts `mpiexec -n C python -m
pbp_hpc.bench --worker SPEC` (pbp_hpc.bench.worker), whose rank 0 starts the PyTorch child
(`--torch-worker`, pbp_hpc.bench.peers) and a JAX child per thread count (`--jax-worker T`,
pbp_hpc.bench.jax_peer); all three are dispatched by main(). After the job, the parent runs the
`as typed` commands (pbp_hpc.bench.typed), one `mpiexec -n C python -m pbp_hpc.train` per group.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pbp_hpc.bench.stopping as stopping
import pbp_hpc.bench.typed as typed
from pbp_hpc.bench.cases import NETWORKS, Spec, make_spec
from pbp_hpc.bench.table import checks, rows_of, table, write_splits
from pbp_hpc import blas_kernels
from pbp_hpc.errors import Stopped
from pbp_hpc.parallel import hybrid

TITLE = "Training at the BLAS limit: time per epoch against the GEMMs alone, PyTorch, and more ranks."
DEFAULT_SPLITS = hybrid.DEFAULT_PATH  # the file pbp_hpc.hybrid reads by default
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OMP_WAIT_POLICY")


def cpu_model() -> str:
    return blas_kernels.cpu_fields().get("model name") or platform.processor() or platform.machine()


def blas_summary() -> list[str]:
    from threadpoolctl import threadpool_info

    return [f"{d.get('internal_api')} {d.get('version')} core type {d.get('architecture')} "
            f"({d.get('threading_layer')}, {Path(d.get('filepath', '')).name})" for d in threadpool_info()]


def header_lines(spec: Spec, load_start: tuple[float, float, float]) -> list[str]:
    env = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ) or "none set"
    return [
        f"pbp_hpc.bench ({spec.mode}): {platform.node()}, {cpu_model()}, {spec.cores} cores, {platform.platform()}",
        f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
        + ("   << busy machine: ratios are measured side by side, absolute times are not to be trusted"
           if load_start[0] > 0.5 else ""),
        "BLAS: " + "; ".join(blas_summary()),
        f"thread settings in the caller's environment: {env} (cases set theirs: threadpoolctl, torch.set_num_threads, XLA by cores);"
        f" OPENBLAS_CORETYPE {os.environ.get('OPENBLAS_CORETYPE', 'not set (OpenBLAS detects the core)')}"
        + (f" ({blas_kernels.reason})" if blas_kernels.reason else ""),
        f"data: {'synthetic' if spec.synthetic else 'MNIST'}, {spec.n_train or 'all 50,000'} training examples; "
        f"float32; {spec.reps} timed epochs per case after {spec.warmup_steps} warm-up steps, medians; "
        f"reducer {spec.reducer}; ranks {'pinned to their cores (-bind-to core:t)' if spec.pin else 'not pinned'}; clock: "
        + ("wall" if spec.clock == "wall" else "CPU time for 1-thread cases (ranks x 1, torch 1 thread), wall otherwise"),
    ]


def jax_summary(infos: Optional[dict[str, Any]]) -> str:
    """The JAX children as the header shows them: version, and each one's threads; or why none ran."""
    if not infos:
        return "not run"
    errors = {i["error"] for i in infos.values() if "error" in i}
    if errors:
        return "n/a, " + "; ".join(sorted(errors))
    first = next(iter(infos.values()))
    parts = [f"{t} thread{'s' if int(t) > 1 else ''} on cores {','.join(map(str, i.get('cpus', [])))}"
             + (f" (XLA_FLAGS={i['xla_flags']})" if int(t) == 1 and i.get("xla_flags") else "") for t, i in infos.items()]
    return f"{first.get('version')} ({first.get('backend')}; jit, data on the device; " + ", ".join(parts) + ")"


def launch(spec: Spec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the worker job; return its JSON records."""
    env = {k: v for k, v in os.environ.items() if k not in typed.THREAD_ENV}
    cmd = [typed.mpiexec(), "-n", str(spec.cores), sys.executable, "-m", "pbp_hpc.bench", "--worker", json.dumps(spec.__dict__)]
    proc = stopping.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise SystemExit(f"pbp_hpc.bench: the worker job failed (exit {proc.returncode}); its output is above")
    return records


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.bench", description=TITLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batches 128 and 1024 on 10,000 examples (under 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a tiny network on synthetic data, one epoch (for tests)")
    p.add_argument("--data-dir", help="MNIST IDX folder (else data.dir's usual search: $PBP_HPC_DATA, the cache)")
    p.add_argument("--nets", nargs="+", choices=[k for k in NETWORKS if k != "tiny"], help="networks (default both)")
    p.add_argument("--batches", nargs="+", type=int, help="global batch sizes")
    p.add_argument("--reps", type=int, help="timed epochs per case (default 3)")
    p.add_argument("--n-train", type=int, help="use the first N MNIST training images (5/6 of them train)")
    p.add_argument("--reducer", default="shm", choices=["blocking", "overlap", "shm", "shared_batch"], help="reducer of multi-rank cases")
    p.add_argument("--compare-reducers", action=argparse.BooleanOptionalAction, default=None,
                   help="add Net-1h rows for the other reducers (default: on in full mode)")
    p.add_argument("--compare-optimizers", action=argparse.BooleanOptionalAction, default=True,
                   help="add rows at batch 1024: /nesterov (the report's setup with Nesterov momentum: what its "
                        "buffer costs per step) and /default (the built-in defaults: relu, cross-entropy, Nesterov)")
    p.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=True,
                   help="add a 1 x 1 row at batch 1024 (/dense) with train.skip_zero_inputs off: every input column in the GEMMs")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin rank i of an r x t case to cores i*t..i*t+t-1, as mpiexec -bind-to core:t (default on)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX columns")
    p.add_argument("--typed", action=argparse.BooleanOptionalAction, default=True,
                   help="add an `as typed` row per network and batch: `mpiexec -n C python -m pbp_hpc.train` with "
                        "the group's settings and no tuning flags, run after the job (default on)")
    p.add_argument("--grids", action=argparse.BooleanOptionalAction, default=True,
                   help="add 2 x 1 rows with the model in parts beside data 2: parallel.tensor=2 and parallel.pipeline=2 "
                        "(8 microbatches, 1F1B), with the bytes a rank sends per step (default on)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time one-thread cases by CPU time (for a machine others are using; see README)")
    p.add_argument("--cores", type=int, help="cores to use (default: this process's affinity)")
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--splits", help=f"write the best splits here (default {DEFAULT_SPLITS.relative_to(hybrid.REPO)}; "
                                     "'' for nowhere; never in --smoke)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the worker job is killed")
    p.add_argument("--race", action="store_true",
                   help="issue 26's race table instead: pbp_hpc as typed (1 rank on 1 core, 2 ranks on 2 cores) against "
                        "JAX and PyTorch on the same cores, both modes (--modes), with each as-typed cell's GEMM floor; "
                        "with --quick on 10,000 examples, with --smoke a tiny synthetic setting (for the tests)")
    p.add_argument("--modes", nargs="+", choices=["report", "default"],
                   help="--race: report (--config configs/report_net1h.yaml) and/or default (the built-in defaults); both unless given")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="--race: measure each as-typed cell's GEMM floor (default on)")
    p.add_argument("--race-floor", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jax-worker", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.torch_worker:
        from pbp_hpc.bench.peers import torch_worker

        return torch_worker()
    if args.jax_worker is not None:
        from pbp_hpc.bench.jax_peer import jax_worker

        return jax_worker(args.jax_worker)
    if args.worker:
        from pbp_hpc.bench.worker import run_worker

        return run_worker(Spec(**json.loads(args.worker)))
    if args.race_floor:
        from pbp_hpc.bench.race_floor import run_floor

        return run_floor(json.loads(args.race_floor))
    stopping.install()  # SIGTERM/SIGUSR1: end now, and the job being waited on with it
    try:
        return _race(args) if args.race else _bench(args)
    except Stopped as exc:
        return stopping.report(exc)


def _race(args: argparse.Namespace) -> int:
    """`--race`: the cells, the floors, the issue's table, the goals, --json."""
    import pbp_hpc.bench.race as race_mod
    import pbp_hpc.bench.race_table as rt
    from pbp_hpc.errors import ConfigError
    from pbp_hpc.parallel.provenance import cpu_set

    try:
        race = race_mod.make_race(args, sorted(cpu_set()))
    except ConfigError as exc:
        print(f"pbp_hpc.bench: {exc}", file=sys.stderr)
        return 2
    load_start, t0 = os.getloadavg(), time.perf_counter()
    print(f"pbp_hpc.bench --race ({race.mode}): {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.node()}, {cpu_model()}, cores {race.cpus[0]} (1-core cells) and {race.cpus[0]},{race.cpus[1]}")
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
          + ("   << busy machine: compare cells of one run only" if load_start[0] > 0.5 else ""))
    print("BLAS: " + "; ".join(blas_summary()))
    print(f"data: {'synthetic' if race.synthetic else 'MNIST'}, {race.n_train or 'all 50,000'} training examples; "
          f"float32; {race.epochs} epochs a cell, the median of its epochs; median of {race.reps} interleaved repetitions")
    peer_info, records = race_mod.run_groups(race, args.timeout)
    if race.floor:
        print("[race] GEMM floors of the as-typed cells", file=sys.stderr, flush=True)
        records += race_mod.run_floors(race, race_mod.floor_requests(race, records), args.timeout)
    torch_info = peer_info.get("torch1") or {}
    jax_info = {k[-1]: v for k, v in peer_info.items() if k.startswith("jax")}
    print(f"PyTorch: {torch_info.get('version', torch_info.get('error', 'not run'))}; JAX: {jax_summary(jax_info or None)}")
    for mode in race.modes:
        example = next((r for r in records if r.get("mode") == mode and r.get("command")), None)
        if example:
            print(f"{mode}, as typed: {example['command']}  (typed2: -n 2; threads2: -n 1 --set parallel.threads_per_rank=2)")
    rows = rt.rows_of(records)
    print()
    print(rt.tables(rows))
    print()
    print("how pbp_hpc's cells ran:")
    print("\n".join(rt.splits(rows)))
    end = os.getloadavg()
    print(f"load average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}; wall time {time.perf_counter() - t0:.0f} s")
    print("goals:")
    print("\n".join(rt.checks(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"race": race.__dict__, "load_start": load_start, "load_end": end,
                                               "cpu": cpu_model(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "peers": peer_info, "records": records, "rows": rows}, indent=1))
    return 0


def _bench(args: argparse.Namespace) -> int:
    """The parent: header, the worker job, the `as typed` runs, the table."""
    from pbp_hpc.parallel.provenance import cores_available

    spec = make_spec(args, args.cores or cores_available())
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    for line in header_lines(spec, load_start):
        print(line, flush=True)
    records = launch(spec, args)
    if spec.typed:
        print(f"[bench] as typed: {spec.cores} ranks, after the job, each beside its hand-tuned twin", file=sys.stderr,
              flush=True)
        records += typed.run_all(spec, args.timeout)
    head = next(r for r in records if r["type"] == "header")
    end = next((r for r in records if r["type"] == "end"), {"load": [float("nan")] * 3})
    prov = head.get("provenance", {})
    torch_info = head.get("torch") or {}
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in head["peak_gflops"].items())
    print(f"MPI: {prov.get('mpi_library', '?')}; PyTorch: {torch_info.get('version', torch_info.get('error', 'not run'))}; "
          f"JAX: {jax_summary(head.get('jax'))}")
    for rec in (r for r in records if r["type"] in ("typed", "tuned")):
        print(f"{'as typed' if rec['type'] == 'typed' else 'tuned'}, {rec['net']} batch {rec['batch']}: {rec['command']}"
              + (f"  << no times: {rec['error']}" if rec.get("error") else
                 f"  ({rec.get('ranks')} x {rec.get('threads')}, reducer {rec.get('reducer_reason') or rec.get('reducer')}"
                 + (f"; {rec['binding']}" if rec.get("binding") else "") + ")"))
    print(f"SGEMM {spec.peak_n}^2 peak GFLOP/s by split (ranks x threads): {peaks}")
    rows = rows_of(records, spec)
    print()
    print(table(rows))
    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in end['load'])}; wall time {time.perf_counter() - t0:.0f} s")
    print("goals:")
    print("\n".join(checks(rows, spec.cores)))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec.__dict__, "load_start": load_start, "records": records,
                                               "rows": rows}, indent=1))
    splits = DEFAULT_SPLITS if args.splits is None else (Path(args.splits) if args.splits else None)
    if splits is not None and spec.mode != "smoke" and spec.cores > 1:
        write_splits(splits, rows, spec.cores, platform.node())
        print(f"best splits written to {splits}")
    return 0
