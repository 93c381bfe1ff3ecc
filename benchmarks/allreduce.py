"""Allreduce time against message size on this machine, and the alpha-beta fit to it.

    mpiexec -n P python benchmarks/allreduce.py [--json alpha_beta.json]

Times MPI_Allreduce(SUM) of float32 buffers from 8 bytes to 64 MiB (the gradients of Net-1h
and Net-2h are 3.2 and 7.4 MB), the same call pbp_hpc.train's blocking reducer makes. Each
size is run until `--seconds` have passed (at least `--min-reps` times); an iteration's time
is the slowest rank's, starting from a barrier; the table shows the median and minimum.
Rank 0 prints the table and alpha, beta fitted with pbp_hpc.analyze.perfmodel; give the JSON file to
`python -m pbp_hpc.analyze --alpha-beta FILE` to use them in the scaling model.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.analyze import perfmodel

DEFAULT_SIZES = [2**k for k in range(3, 27, 2)]  # 8 B .. 64 MiB, every factor of 4


def time_allreduce(comm: MPI.Comm, n_bytes: int, seconds: float, min_reps: int) -> np.ndarray:
    """Per-iteration times (the slowest rank's) for one message size; every rank gets them."""
    buf = np.ones(max(1, n_bytes // 4), dtype=np.float32)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # warm-up: connection setup, page faults
    times: list[float] = []
    start = time.perf_counter()
    while True:
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times.append(time.perf_counter() - t0)
        # Rank 0's clock decides when to stop, so every rank runs the same number of iterations.
        done = comm.bcast(len(times) >= min_reps and time.perf_counter() - start > seconds, root=0)
        if done:
            break
    out = np.array(times)
    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out


def measure(comm: MPI.Comm, sizes: list[int], seconds: float, min_reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        t = time_allreduce(comm, n, seconds, min_reps)
        rows.append({"bytes": int(n // 4 * 4 or 4), "median_s": float(np.median(t)), "min_s": float(t.min()), "reps": int(t.size)})
    return rows


def table(rows: list[dict[str, Any]], ranks: int, ab: perfmodel.AlphaBeta) -> str:
    head = f"{'bytes':>10}  {'median us':>10}  {'min us':>10}  {'algbw GB/s':>10}  {'busbw GB/s':>10}  {'model us':>10}  {'reps':>6}"
    lines = [f"MPI_Allreduce(SUM, float32) on {ranks} ranks, {socket.gethostname()}", head]
    for r in rows:
        t = r["median_s"]
        model = perfmodel.allreduce_time(ranks, r["bytes"], ab)[0]
        busbw = 2 * (ranks - 1) / ranks * r["bytes"] / t / 1e9  # bytes each rank must move, per second
        lines.append(f"{r['bytes']:>10d}  {t * 1e6:>10.2f}  {r['min_s'] * 1e6:>10.2f}  {r['bytes'] / t / 1e9:>10.3f}  "
                     f"{busbw:>10.3f}  {model * 1e6:>10.2f}  {r['reps']:>6d}")
    lines.append(f"fit (medians, relative least squares): {ab.describe()}")
    lines.append("model: T(P, n) = 2 log2(P) alpha + 2 (P-1)/P n beta  (Rabenseifner; see pbp_hpc/analyze/perfmodel.py)")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, metavar="BYTES", help="message sizes in bytes")
    p.add_argument("--seconds", type=float, default=0.3, help="time spent on each size (default 0.3)")
    p.add_argument("--min-reps", type=int, default=5, help="fewest iterations per size (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the samples and the fitted alpha, beta here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    if comm.size < 2:
        if comm.rank == 0:
            print("benchmarks/allreduce.py: needs at least 2 ranks: mpiexec -n 2 python benchmarks/allreduce.py", file=sys.stderr)
        return 2
    rows = measure(comm, sorted(args.sizes), args.seconds, args.min_reps)
    if comm.rank != 0:
        return 0
    ab = perfmodel.fit_alpha_beta([comm.size] * len(rows), [r["bytes"] for r in rows], [r["median_s"] for r in rows])
    ab = perfmodel.AlphaBeta(ab.alpha_s, ab.beta_s_per_byte, f"benchmarks/allreduce.py, {comm.size} ranks on {socket.gethostname()}")
    print(table(rows, comm.size, ab), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**ab.to_dict(), "ranks": comm.size, "host": socket.gethostname(),
                       "mpi_library": MPI.Get_library_version().splitlines()[0].strip(), "samples": rows}, f, indent=2)
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
