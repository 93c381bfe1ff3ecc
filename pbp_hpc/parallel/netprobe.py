"""The network as the study measures it: Allreduce times at several message sizes, and the
point-to-point latency, on the ranks a sweep will use -- a few seconds before its first point.

    mpiexec -n P python -m pbp_hpc.parallel.netprobe [--seconds S]   # one JSON line on stdout

Run by the sweep (pbp_hpc.sweep.network; under Slurm, once per job), stored in every run
record it writes as `interconnect`, and fitted by `python -m pbp_hpc.analyze`
(models.choose_alpha_beta) so that the scaling projection needs no --alpha/--beta. Times are
taken as benchmarks/allreduce.py takes them: each iteration from a barrier, the slowest rank's,
the lower quartile over iterations (median and minimum beside it); on the ranks of one node together (`intra_node`), one rank per node
(`inter_node`, where the job has several nodes) and all of them (`world`).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

import numpy as np
from mpi4py import MPI

SIZES = tuple(8 * 4**k for k in range(11))  # 8 B .. 8 MiB: latency-bound up to the gradients' megabytes
PINGPONG_BYTES = 8
_TAG = 0x4E45


def _time(world: MPI.Comm, op: Any, seconds: float, min_reps: int = 5) -> tuple[float, float, float]:
    """(lower quartile, median, minimum) over iterations of the slowest rank's time of op(),
    every rank iterating alike. The lower quartile is what analyze fits: on a shared machine the
    noise only adds time, and the quartile is steadier than the minimum."""
    op()  # warm-up: connections, page faults
    times: list[float] = []
    start = time.perf_counter()
    while True:
        world.Barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
        if world.bcast(len(times) >= min_reps and time.perf_counter() - start > seconds, root=0):
            break
    out = np.array(times)
    world.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return float(np.percentile(out, 25)), float(np.median(out)), float(out.min())


def _levels(world: MPI.Comm, hosts: list[str]) -> list[tuple[str, MPI.Comm, int, int]]:
    """(name, this rank's communicator or COMM_NULL, its size, nodes it spans). On one node only
    the world: no communicator is made (each costs shared memory, which a small /dev/shm, as on
    Slurm test beds, may lack). Across nodes the caller frees the two it gets (_free)."""
    nodes = len(set(hosts))
    if nodes == 1:
        return [("world", world, world.size, 1)]
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    per_node = world.allreduce(node.size, op=MPI.MIN)
    leaders = world.Split(0 if node.rank == 0 else MPI.UNDEFINED, world.rank)
    out = [("inter_node", leaders, nodes, nodes)]
    if per_node > 1:
        out.insert(0, ("intra_node", node, per_node, 1))
    else:
        node.Free()
    return out + [("world", world, world.size, nodes)]


def _free(levels: list[tuple[str, MPI.Comm, int, int]]) -> None:
    for _, comm, _, _ in levels:
        if comm != MPI.COMM_NULL and comm != MPI.COMM_WORLD:
            comm.Free()


def _pingpong(world: MPI.Comm, peer: int, seconds: float) -> float:
    """Half the round trip of an 8-byte message between rank 0 and `peer` (others idle)."""
    buf = np.zeros(PINGPONG_BYTES // 8, dtype=np.float64)
    r = world.rank

    def op() -> None:
        if r == 0:
            world.Send(buf, dest=peer, tag=_TAG)
            world.Recv(buf, source=peer, tag=_TAG)
        elif r == peer:
            world.Recv(buf, source=0, tag=_TAG)
            world.Send(buf, dest=0, tag=_TAG)

    return _time(world, op, seconds)[0] / 2


def measure(world: MPI.Comm, seconds: float = 0.1, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Every level's Allreduce time at each size, and rank 0's latency to the nearest and the
    farthest rank (collective; the same result on every rank)."""
    samples = []
    hosts = world.allgather(socket.gethostname())
    levels = _levels(world, hosts)
    for level, comm, size, nodes in levels:
        for n in sizes:
            buf = np.ones(max(1, n // 4), dtype=np.float32)
            active = comm != MPI.COMM_NULL
            op = (lambda c=comm, b=buf: c.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)) if active else (lambda: None)
            q1, med, low = _time(world, op, seconds)
            samples.append({"level": level, "ranks": size, "nodes": nodes, "bytes": int(buf.nbytes),
                            "seconds": q1, "median_s": med, "min_s": low})
    _free(levels)
    far = next((r for r in range(world.size - 1, 0, -1) if hosts[r] != hosts[0]), None)
    latency = {"same_node_s": _pingpong(world, 1, seconds) if world.size > 1 and hosts[1] == hosts[0] else None,
               "other_node_s": _pingpong(world, far, seconds) if far is not None else None}
    return {"ranks": world.size, "nodes": len(set(hosts)), "hosts": sorted(set(hosts)), "samples": samples,
            "latency": latency, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mpi_library": MPI.Get_library_version().splitlines()[0].strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.parallel.netprobe", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.1, help="time per message size (default 0.1 s)")
    args = p.parse_args(argv)
    out = measure(MPI.COMM_WORLD, args.seconds)
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

