"""The MPI program tests/test_nodes.py launches on emulated nodes (mpiexec -hosts ... -launcher fork).

Every case trains the same small float64 problem on the whole world and, on each rank, on
MPI_COMM_SELF (the 1-rank reference); rank 0 prints one JSON object: per case, the largest
difference from the reference relative to the largest parameter, whether every rank ended with
the same bits, and what the run recorded (reducer, its reason, bytes sent, threads, binding).

    python tests/nodes_program.py CASE [CASE ...]     CASE: a JSON object of --set overrides
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPORT_SETUP  # noqa: E402

from pbp_hpc import config, train  # noqa: E402

WORLD = MPI.COMM_WORLD
BASE = {**REPORT_SETUP, "model.layers": "[784, 16, 12, 10]", "model.dtype": "float64", "data.name": "synthetic",
        "data.n_train": 120, "data.n_test": 30, "train.epochs": 2, "train.batch_size": 10,
        "train.learning_rate": 0.5, "train.eval_every": 0, "train.progress": "false"}


def run_case(over: dict[str, str], ref: np.ndarray) -> dict:
    cfg = config.load(None, [f"{k}={v}" for k, v in {**BASE, **over}.items()])
    res = train.run(cfg, WORLD, return_params=True)
    params = res["params"]
    same = all(np.array_equal(p, params) for p in WORLD.allgather(params))
    diff = float(WORLD.allreduce(np.abs(params - ref).max(), op=MPI.MAX)) / float(np.abs(ref).max())
    keep = ("reducer_reason", "compression", "error_feedback", "fusion_bytes", "wire_bytes_per_step", "threads_per_rank")
    return {"set": over, "rel_diff": diff, "identical_on_all_ranks": same, **{k: res.get(k) for k in keep},
            "binding": res["provenance"]["binding"], "loss": res["epochs"][-1]["loss"]}


def reference(over: dict[str, str]) -> np.ndarray:
    """The 1-rank parameters of a case: its settings but the parallel ones (a tensor case may change the model)."""
    same = {k: v for k, v in over.items() if not k.startswith("parallel.")}
    cfg = config.load(None, [f"{k}={v}" for k, v in {**BASE, **same}.items()])
    return train.run(cfg, MPI.COMM_SELF, return_params=True)["params"]


def main(cases: list[dict[str, str]]) -> None:
    refs: dict[str, np.ndarray] = {}
    out = []
    for c in cases:
        key = json.dumps({k: v for k, v in c.items() if not k.startswith("parallel.")}, sort_keys=True)
        if key not in refs:
            refs[key] = reference(c)
        out.append(run_case(c, refs[key]))
    if WORLD.rank == 0:
        print(json.dumps({"ranks": WORLD.size, "cases": out}), flush=True)


if __name__ == "__main__":
    main([json.loads(a) for a in sys.argv[1:]])
