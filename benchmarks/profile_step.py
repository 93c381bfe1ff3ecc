"""Where a training step's time goes: cProfile of pbp_hpc.train's step loop, grouped by kind.

    python benchmarks/profile_step.py --net Net-1h --batch 1024 --data-dir DIR
    mpiexec -n 2 -bind-to core:1 python benchmarks/profile_step.py --batch 128 --data-dir DIR
    python benchmarks/profile_step.py --clock cpu ...    # a loaded machine: the process's CPU time
    python benchmarks/profile_step.py --batch 1024 --set train.skip_zero_inputs=false   # every input column

Rank 0 profiles its own steps (the strategy's step, as pbp_hpc.train and pbp_hpc.bench run it)
and prints milliseconds per step by group (GEMM, elementwise, batch, skip bookkeeping, reducer
and update) and the functions behind them. The profiler's own cost is spread over every Python
call, so compare groups within one run; the benchmark (python -m pbp_hpc.bench) is what times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from pbp_hpc import bench
from pbp_hpc import config
from pbp_hpc.data import datasets
from pbp_hpc import train

GROUPS = {  # function name -> group (what is not listed is "other": Python glue, views, small ops)
    "gemm": "GEMM", "matmul": "GEMM", "_matmul": "GEMM",
    "tanh_sigmoid_": "elementwise", "exp_sigmoid_": "elementwise", "sigmoid_delta_": "elementwise", "tanh_": "elementwise", "tanh_delta_": "elementwise",
    "relu_": "elementwise", "relu_delta_": "elementwise", "log_softmax_": "elementwise", "value_": "elementwise", "delta_": "elementwise", "subtract": "elementwise",
    "sum_squares": "elementwise", "linear_": "elementwise", "_zero_row": "elementwise",
    "active_features_into": "batch", "fill_targets": "batch", "fill_batch": "batch", "features_into": "batch",
    "choose": "skip bookkeeping", "runs": "skip bookkeeping", "weights": "skip bookkeeping",
    "put_weights": "skip bookkeeping", "expand_gradient": "skip bookkeeping",
    "finish": "reducer", "updated": "reducer", "sync_barrier": "reducer (waiting)", "Allreduce": "reducer",
    "axpy": "update", "axpy_": "update", "axpby": "update", "axpby_": "update", "scale_": "update", "apply": "update",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="Net-1h", choices=["Net-1h", "Net-2h"])
    p.add_argument("--batch", type=int, default=1024, help="global batch size")
    p.add_argument("--steps", type=int, default=50, help="profiled steps (after 5 unprofiled ones)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    p.add_argument("--data-dir", help="MNIST IDX folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--top", type=int, default=12, help="how many functions to list")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time by the process's CPU time, which other programs on a loaded machine disturb "
                        "less than the wall clock (with --threads 1: it adds up every thread's time)")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    items = [f"model.layers={bench.NETWORKS[args.net]}", f"train.batch_size={args.batch}", "train.progress=false",
             "parallel.reducer=shm" if world.size > 1 else "parallel.reducer=blocking", *args.set]
    if args.data_dir:
        items.append(f"data.dir={args.data_dir}")
    cfg = config.load(None, items)
    data = datasets.load(cfg, world.size, Path(args.data_dir) if args.data_dir else None)
    st = train.State(cfg, world, np, data)
    run = bench.OurRun(st)
    order = train.epoch_order(0, 0, len(data.train), True)
    B = args.batch
    batches = [order[(s * B) % (len(order) - B) :][:B] for s in range(args.steps + 5)]
    prof = cProfile.Profile(time.process_time) if args.clock == "cpu" else cProfile.Profile()
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for g in batches[:5]:
            run.step(g)
        world.Barrier()
        prof.enable()
        for g in batches[5:]:
            run.step(g)
        prof.disable()
        step_ms, gemm_ms = floor(run, batches[5:], args.clock)
    if world.rank == 0:
        report(pstats.Stats(prof), args.steps, st, args.threads, args.top)
        print(f"  unprofiled: {step_ms:.3f} ms per step; its GEMMs alone (the floor): {gemm_ms:.3f} ms; "
              f"step / GEMM {step_ms / gemm_ms:.3f} ({args.clock} clock)")
    st.close()
    return 0


def floor(run: bench.OurRun, batches: list[np.ndarray], clock_name: str) -> tuple[float, float]:
    """Milliseconds per step of the same steps unprofiled, and of their GEMMs alone (bench.GemmReplay),
    slowest rank: what the profile's non-GEMM groups cost together is the difference."""
    from pbp_hpc.parallel.runtime import slowest

    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    st, steps = run.st, len(batches)
    replay = bench.GemmReplay(run, batches[0].shape[0], steps * batches[0].shape[0])
    best = float("inf")
    for _ in range(3):  # the best of three: the least disturbed
        st.comm.Barrier()
        t0 = clock()
        for g in batches:
            run.step(g)
        best = min(best, slowest(st.comm, [clock() - t0, 0.0]).tolist()[0])
    gemm = min(replay.epoch(steps, clock)[0] for _ in range(3))
    return 1e3 * best / steps, 1e3 * gemm / steps


def report(stats: pstats.Stats, steps: int, st: train.State, threads: int, top: int = 12) -> None:
    per = {}  # group -> ms per step (own time of the functions in it)
    rows = []
    for (file, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        group = GROUPS.get(name, "other") if "pbp_hpc" in file or name.startswith("<") else "other"
        if name.startswith("<method 'take'"):
            group = "gathers"  # np.take: the batch's rows, and W_1's active rows
        ms = 1e3 * tottime / steps
        per[group] = per.get(group, 0.0) + ms
        rows.append((ms, group, f"{Path(file).name}:{name}" if file != "~" else name))
    total = sum(per.values())
    print(f"{st.comm.size} rank(s) x {threads} BLAS thread(s), batch {st.cfg.train.batch_size}, layers {st.layout.sizes}, "
          f"skip_zero_inputs={st.cfg.train.skip_zero_inputs}: {total:.2f} ms per step (rank 0, profiled)")
    for group, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {group:17s} {ms:7.3f} ms  {100 * ms / total:5.1f}%")
    print("  top functions:")
    for ms, group, where in sorted(rows, reverse=True)[:top]:
        print(f"    {ms:7.3f} ms  {group:17s} {where}")
    if getattr(st.local, "skip", None) is not None:
        print(f"  active input columns: {st.local.skip.summary()}")


if __name__ == "__main__":
    sys.exit(main())
