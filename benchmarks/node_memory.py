"""Memory per node of the training data, with a copy per rank and with one per node.

    mpiexec -n 32 python benchmarks/node_memory.py --data-dir DIR [--set data.one_copy_per_node=false]

Each rank loads the data as pbp_hpc.train does (datasets.load, collective) and reads its
proportional set size (PSS: a shared page counts 1/k to each of the k processes mapping it)
and resident set size from /proc/self/smaps_rollup, before and after the load. Rank 0 prints
the sums over the node's ranks: the sum of PSS is what the node really holds; the sum of RSS
counts a shared page once per rank that touched it. One node (the first rank's) is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from mpi4py import MPI

from pbp_hpc import config
from pbp_hpc.data import datasets


def rollup() -> dict[str, int]:
    """Pss and Rss of this process, in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def node_sums(node: MPI.Comm) -> dict[str, int]:
    return {k: sum(r[k] for r in node.allgather(rollup())) for k in ("pss", "rss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    cfg = config.load(None, [f"data.dir={args.data_dir}", "data.download=false", *args.overrides])
    gc.collect()
    comm.Barrier()
    before = node_sums(node)
    data = datasets.load(cfg, comm.size, Path(args.data_dir), comm)
    data.fingerprint()  # every rank reads its data (as training does), so its pages are mapped
    gc.collect()
    comm.Barrier()
    after = node_sums(node)
    if comm.rank == 0:
        mib = 2**20
        print(json.dumps({"ranks_on_node": node.size, "one_copy_per_node": cfg.data.one_copy_per_node,
                          "pss_before_mib": round(before["pss"] / mib, 1), "pss_after_mib": round(after["pss"] / mib, 1),
                          "data_pss_mib": round((after["pss"] - before["pss"]) / mib, 1),
                          "data_rss_mib": round((after["rss"] - before["rss"]) / mib, 1)}), flush=True)
    comm.Barrier()
    data.close()
    node.Free()


if __name__ == "__main__":
    main()
