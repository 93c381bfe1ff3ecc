"""Bytes and time of one gradient sum, by what travels: float64, float32, fp16, bf16.

    mpiexec -n 4 -ppn 2 -hosts localhost,127.0.0.1 -launcher fork python benchmarks/compression.py
    mpiexec -n P python benchmarks/compression.py --values 795010 --seconds 1

Sums a buffer of --values (default: Net-1h's 795,010 parameters) over the ranks, as the
blocking reducer does: MPI_Allreduce of float64 and of float32 buffers; a compressed sum
(pbp_hpc/parallel/reducers/compression.py: 16-bit words in an alltoall and an allgather,
added in float32), fp16 and bf16; and, for comparison, MPI_Allreduce of bf16 words with a
summing operator written in Python (MPI.Op.Create), the obvious alternative. An iteration's time
is the slowest rank's, from a barrier; the table shows the median. Bytes: what a rank sends
per sum at best (an Allreduce's reduce-scatter + allgather), computed, not sniffed.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from pbp_hpc.parallel.reducers import compression


def timed(comm: MPI.Comm, once: Callable[[], None], seconds: float) -> float:
    once()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while True:
        comm.Barrier()
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
        if comm.bcast(len(times) >= 5 and time.perf_counter() - start > seconds, root=0):
            break
    out = np.array(times)
    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return float(np.median(out))


def _bf16_sum(inbuf: MPI.memory, outbuf: MPI.memory, datatype: MPI.Datatype) -> None:
    a, b = np.frombuffer(inbuf, dtype=np.uint16), np.frombuffer(outbuf, dtype=np.uint16)
    x, y = np.empty(a.shape, np.float32), np.empty(a.shape, np.float32)
    compression._bf16_decode(a, x)
    compression._bf16_decode(b, y)
    y += x
    compression._bf16_encode(y, b, np.empty(a.shape, np.uint32))


def cases(comm: MPI.Comm, n: int) -> dict[str, tuple[int, Callable[[], None]]]:
    P = comm.size
    rng = np.random.default_rng(comm.rank)
    g64 = rng.standard_normal(n)
    g32 = g64.astype(np.float32)
    out: dict[str, tuple[int, Callable[[], None]]] = {
        "float64 Allreduce": (compression.allreduce_bytes(P, n, 8),
                              lambda: comm.Allreduce(MPI.IN_PLACE, g64.copy(), op=MPI.SUM)),
        "float32 Allreduce": (compression.allreduce_bytes(P, n, 4),
                              lambda: comm.Allreduce(MPI.IN_PLACE, g32.copy(), op=MPI.SUM)),
    }
    for kind in ("fp16", "bf16"):
        s = compression.CompressedSum(comm, n, kind, feedback=False)
        x = g64.copy()

        def run(s: compression.CompressedSum = s, x: np.ndarray = x) -> None:
            s.blocking(x, lambda call: call())

        out[f"{kind} compressed sum"] = (s.wire_bytes(), run)
    op = MPI.Op.Create(_bf16_sum, commute=True)
    words = np.zeros(n, dtype=np.uint16)
    compression._bf16_encode(g32, words, np.empty(n, np.uint32))
    out["bf16 Allreduce, Python op"] = (compression.allreduce_bytes(P, n, 2),
                                        lambda: comm.Allreduce(MPI.IN_PLACE, words.copy(), op=op))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", type=int, default=795_010, help="values summed (default: Net-1h's parameters)")
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each case")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = comm.allreduce(1 if node.rank == 0 else 0)
    node.Free()
    rows = [(name, b, timed(comm, once, args.seconds)) for name, (b, once) in cases(comm, args.values).items()]
    if comm.rank == 0:
        print(f"sum of {args.values} values over {comm.size} ranks on {nodes} node(s)")
        print(f"{'what travels':<28} {'bytes/rank':>11} {'ms (median)':>12}")
        for name, b, t in rows:
            print(f"{name:<28} {b:>11d} {t * 1e3:>12.2f}")


if __name__ == "__main__":
    main()
