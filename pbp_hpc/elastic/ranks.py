"""What a training run tells the elastic launcher: each rank's host, Slurm node and process id
(so that a lost rank can be named, and its host left out) and the position training starts from."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TAG = "pbp_hpc: elastic: "  # the line's start, which the launcher looks for (failures.reported)


def report(comm: Any, epoch: int, step: int) -> None:
    """Collective. Rank 0 prints one line on stderr (even with -q): the launcher's start-up mark."""
    from mpi4py import MPI

    where = comm.allgather({"host": MPI.Get_processor_name(), "node": os.environ.get("SLURMD_NODENAME"),
                            "pid": os.getpid()})
    if comm.rank == 0:
        print(TAG + json.dumps({"ranks": where, "epoch": epoch, "step": step}), file=sys.stderr, flush=True)
