"""Allreduce time against message size, inside a node and between nodes, and the alpha-beta fits.

    mpiexec -n P python benchmarks/allreduce.py [--json alpha_beta.json]
    # two nodes emulated on one machine (MPICH): the second host name is another "node"
    mpiexec -n 4 -ppn 2 -hosts localhost,127.0.0.1 -launcher fork python benchmarks/allreduce.py

Times MPI_Allreduce(SUM) of float32 buffers from 8 bytes to 64 MiB (the gradients of Net-1h
and Net-2h are 3.2 and 7.4 MB), the same call pbp_hpc.train's blocking reducer makes, on up to
three communicators: the ranks of each node together (COMM_TYPE_SHARED; every node at once:
intra-node), one rank per node (between nodes), and all ranks (world). Each size is run until
`--seconds` have passed (at least `--min-reps` times); an iteration's time is the slowest rank's,
starting from a barrier; the tables show the median and minimum. Rank 0 prints a table and an
alpha-beta fit (pbp_hpc.analyze.perfmodel, with ~95% ranges and flags for what the sizes cannot
separate) per communicator; the JSON file holds them all under "levels", and at the top the fit
the scaling model should use: between nodes when there were several, else inside the node.
Give it to `python -m pbp_hpc.analyze --alpha-beta FILE`.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.analyze import perfmodel

DEFAULT_SIZES = [2**k for k in range(3, 27, 2)]  # 8 B .. 64 MiB, every factor of 4
LEVEL_WORDS = {"intra_node": "inside each node (all nodes at once)", "inter_node": "between nodes (one rank per node)",
               "world": "all ranks"}


def time_allreduce(world: MPI.Comm, comm: MPI.Comm, n_bytes: int, seconds: float, min_reps: int) -> np.ndarray:
    """Per-iteration times (the slowest rank's) for one message size on `comm`, which may be
    several disjoint communicators at once (one per node) or COMM_NULL on the ranks outside it;
    every rank of `world` takes part in the timing and gets the times."""
    buf = np.ones(max(1, n_bytes // 4), dtype=np.float32)
    active = comm != MPI.COMM_NULL
    if active:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # warm-up: connection setup, page faults
    times: list[float] = []
    start = time.perf_counter()
    while True:
        world.Barrier()
        t0 = time.perf_counter()
        if active:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times.append(time.perf_counter() - t0)
        # Rank 0's clock decides when to stop, so every rank runs the same number of iterations.
        done = world.bcast(len(times) >= min_reps and time.perf_counter() - start > seconds, root=0)
        if done:
            break
    out = np.array(times)
    world.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out


def measure(world: MPI.Comm, comm: MPI.Comm, sizes: list[int], seconds: float, min_reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        t = time_allreduce(world, comm, n, seconds, min_reps)
        rows.append({"bytes": int(n // 4 * 4 or 4), "median_s": float(np.median(t)), "min_s": float(t.min()), "reps": int(t.size)})
    return rows


def levels(world: MPI.Comm) -> list[tuple[str, MPI.Comm, int]]:
    """(name, communicator, its size) to time: inside each node, between nodes (one rank per node),
    and the whole world, each only where it has at least 2 ranks and differs from the world."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = world.allreduce(1 if node.rank == 0 else 0)
    per_node = world.allreduce(node.size, op=MPI.MIN)
    leaders = world.Split(0 if node.rank == 0 else MPI.UNDEFINED, world.rank)
    out = []
    if per_node >= 2:
        out.append(("intra_node", node, per_node))
    if nodes >= 2:
        out.append(("inter_node", leaders, nodes))
        if world.size > nodes:  # else the world is the between-nodes communicator again
            out.append(("world", world, world.size))
    return out


def fit(rows: list[dict[str, Any]], ranks: int, level: str) -> perfmodel.AlphaBeta:
    ab = perfmodel.fit_alpha_beta([ranks] * len(rows), [r["bytes"] for r in rows], [r["median_s"] for r in rows])
    return replace(ab, source=f"benchmarks/allreduce.py, {level}, {ranks} ranks, on {socket.gethostname()}")


def table(rows: list[dict[str, Any]], ranks: int, ab: perfmodel.AlphaBeta, level: str) -> str:
    head = f"{'bytes':>10}  {'median us':>10}  {'min us':>10}  {'algbw GB/s':>10}  {'busbw GB/s':>10}  {'model us':>10}  {'reps':>6}"
    lines = [f"MPI_Allreduce(SUM, float32), {LEVEL_WORDS[level]}: {ranks} ranks, {socket.gethostname()}", head]
    for r in rows:
        t = r["median_s"]
        model = perfmodel.allreduce_time(ranks, r["bytes"], ab)[0] if not ab.undetermined else math.nan
        busbw = 2 * (ranks - 1) / ranks * r["bytes"] / t / 1e9  # bytes each rank must move, per second
        lines.append(f"{r['bytes']:>10d}  {t * 1e6:>10.2f}  {r['min_s'] * 1e6:>10.2f}  {r['bytes'] / t / 1e9:>10.3f}  "
                     f"{busbw:>10.3f}  {model * 1e6:>10.2f}  {r['reps']:>6d}")
    lines.append(f"fit (medians, relative least squares, ~95% ranges): {ab.describe()}")
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
    fits = {}
    for level, sub, ranks in levels(comm):
        rows = measure(comm, sub, sorted(args.sizes), args.seconds, args.min_reps)
        if comm.rank == 0:
            ab = fit(rows, ranks, level)
            fits[level] = {**ab.to_dict(), "level": level, "ranks": ranks, "samples": rows}
            print(table(rows, ranks, ab, level) + "\n", flush=True)
    if comm.rank != 0:
        return 0
    top = fits.get("inter_node") or fits["intra_node"]
    if "inter_node" not in fits:
        print("one node: no between-nodes values; a cluster's alpha between nodes is larger: measure them there "
              "(or emulate two nodes: -ppn 2 -hosts localhost,127.0.0.1 -launcher fork)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**{k: v for k, v in top.items() if k != "samples"}, "host": socket.gethostname(),
                       "mpi_library": MPI.Get_library_version().splitlines()[0].strip(), "samples": top["samples"],
                       "levels": fits}, f, indent=2)
        print(f"wrote {args.json} (top level: {top['level']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
