"""The MPI program tests/test_compose.py launches: 4 ranks, one tensor 2 x pipeline 2 grid.

Each case trains a small float64 problem on the grid with 1F1B (the last case with GPipe too)
and, on every rank, on MPI_COMM_SELF (the 1-rank reference); then, with the last case's
settings, checkpoints resume across shapes: the
grid's first epoch finished by one rank (T x S -> 1), one rank's finished by the grid
(1 -> T x S), and the grid's by the grid (bit for bit). Rank 0 prints one JSON object.

    python tests/compose_program.py DIR CASE [CASE ...]   DIR: a directory every rank sees;
                                                           CASE: a JSON object of --set overrides
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPORT_SETUP  # noqa: E402

from pbp_hpc import config, model_file, train  # noqa: E402

WORLD = MPI.COMM_WORLD
# 72 examples, 1/6 for validation: 60 in batches of 5, 12 steps an epoch, 24 in two
BASE = {**REPORT_SETUP, "model.dtype": "float64", "data.name": "synthetic", "data.n_train": 72, "data.n_test": 30,
        "train.epochs": 2, "train.batch_size": 5, "train.learning_rate": 0.2, "train.eval_every": 0,
        "train.progress": "false"}
GRID = {"parallel.tensor": 2, "parallel.pipeline": 2}


def cfg(over: dict) -> config.Config:
    return config.load(None, [f"{k}={v}" for k, v in {**BASE, **over}.items()])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def same_everywhere(params: np.ndarray) -> bool:
    return all(np.array_equal(p, params) for p in WORLD.allgather(params))


def run_case(d: str, i: int, over: dict, gpipe: bool) -> dict:
    """The grid's run (1F1B, and GPipe where asked: evaluated every epoch, its best model saved) against one rank's."""
    model = {k: v for k, v in over.items() if not k.startswith("parallel.")}
    ref = train.run(cfg({**model, "train.eval_every": 1, "train.save_model": f"{d}/ref-{i}-{WORLD.rank}.h5"}),
                    MPI.COMM_SELF, return_params=True)
    lines: list[str] = []
    runs = {s: train.run(cfg({**over, **GRID, "parallel.pipeline_schedule": s, "train.eval_every": 1,
                              "train.save_model": f"{d}/model-{i}-{s}.h5"}), WORLD, return_params=True,
                         log=lines.append) for s in (("gpipe", "1f1b") if gpipe else ("1f1b",))}
    par = runs["1f1b"]
    saved, _, _ = model_file.load(f"{d}/model-{i}-1f1b.h5")
    saved_ref, _, _ = model_file.load(f"{d}/ref-{i}-{WORLD.rank}.h5")
    return {"set": over, "rel_diff": WORLD.allreduce(rel(par["params"], ref["params"]), op=MPI.MAX),
            "identical_on_all_ranks": same_everywhere(par["params"]),
            "gpipe_is_1f1b": WORLD.allreduce(bool(np.array_equal(runs["gpipe"]["params"], par["params"])), op=MPI.LAND)
            if gpipe else None,
            "loss_rel_diff": abs(par["epochs"][-1]["loss"] - ref["epochs"][-1]["loss"]) / abs(ref["epochs"][-1]["loss"]),
            "same_test_accuracy": par["test_accuracy"] == ref["test_accuracy"],
            "same_val_accuracies": [e["val_accuracy"] for e in par["evaluations"]] == [e["val_accuracy"] for e in ref["evaluations"]],
            "saved_model_rel_diff": rel(saved, saved_ref), "steps": sum(e["steps_done"] for e in par["epochs"]),
            "grid": par["grid"], "tensor_layout": WORLD.allgather(par.get("tensor_layout")),
            "activation_bytes": WORLD.allgather(par["bytes_per_step"]["activations"]),
            "header": [line for line in lines if line.startswith("pbp_hpc: grid data")]}


def resume_across_shapes(d: str, over: dict) -> dict:
    ref = train.run(cfg(over), MPI.COMM_SELF, return_params=True)["params"]
    grid = train.run(cfg({**over, **GRID}), WORLD, return_params=True)["params"]
    out: dict = {}
    # T x S -> 1: the first epoch on the grid, the second on one rank
    train.run(cfg({**over, **GRID, "train.epochs": 1, "checkpoint.path": f"{d}/a.h5"}), WORLD)
    WORLD.Barrier()
    if WORLD.rank == 0:
        one = train.run(cfg({**over, "checkpoint.path": f"{d}/a.h5", "checkpoint.resume": "true"}), MPI.COMM_SELF,
                        return_params=True)["params"]
        out["grid_to_one_rel_diff"] = rel(one, ref)
    # T x S -> T x S, bit for bit (a.h5 was rewritten at the end of the one-rank run: write the first epoch again)
    WORLD.Barrier()
    train.run(cfg({**over, **GRID, "train.epochs": 1, "checkpoint.path": f"{d}/c.h5"}), WORLD)
    again = train.run(cfg({**over, **GRID, "checkpoint.path": f"{d}/c.h5", "checkpoint.resume": "true"}), WORLD,
                      return_params=True)["params"]
    out["grid_to_grid_bit_for_bit"] = WORLD.allreduce(bool(np.array_equal(again, grid)), op=MPI.LAND)
    # 1 -> T x S: the first epoch on one rank, the second on the grid
    if WORLD.rank == 0:
        train.run(cfg({**over, "train.epochs": 1, "checkpoint.path": f"{d}/b.h5"}), MPI.COMM_SELF)
    WORLD.Barrier()
    par = train.run(cfg({**over, **GRID, "checkpoint.path": f"{d}/b.h5", "checkpoint.resume": "true"}), WORLD,
                    return_params=True)["params"]
    out["one_to_grid_rel_diff"] = WORLD.allreduce(rel(par, ref), op=MPI.MAX)
    out["identical_on_all_ranks"] = same_everywhere(par)
    return out


def main(d: str, cases: list[dict]) -> None:
    last = len(cases) - 1  # GPipe against 1F1B on the last case only (they share every other line)
    out = {"ranks": WORLD.size, "cases": [run_case(d, i, c, i == last) for i, c in enumerate(cases)],
           "resume": resume_across_shapes(d, {k: v for k, v in cases[-1].items() if k != "parallel.pipeline_schedule"})}
    if WORLD.rank == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [json.loads(a) for a in sys.argv[2:]])
