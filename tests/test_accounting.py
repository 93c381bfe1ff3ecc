"""Where the time goes (pbp_hpc.parallel.accounting): every epoch's parts add up to its time.

For every reducer and strategy, on tiny synthetic problems: compute + comm + wait + other =
time_s within 2%, no part negative (a part counted twice would make `other` negative), and the
spread over ranks holds the slowest rank's values. Run serially and under
`mpiexec -n 2|3 python -m pytest --with-mpi -m mpi tests/test_accounting.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPORT_SETUP
from pbp_hpc import config, train
from pbp_hpc.parallel import accounting

WORLD = MPI.COMM_WORLD
PARTS = ("compute_s", "comm_s", "wait_s", "other_s")


def small(**over):
    base = {**REPORT_SETUP, "model.layers": "[784, 24, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 240, "data.n_test": 60, "train.epochs": 2, "train.batch_size": 24,
            "train.learning_rate": 0.5, "train.eval_every": 0, "train.progress": "false"}
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def check_parts(epochs):
    for e in epochs:
        total = sum(e[k] for k in PARTS)
        assert abs(total - e["time_s"]) <= 0.02 * e["time_s"], e
        assert all(e[k] >= -1e-3 * e["time_s"] for k in PARTS), e
        assert e["compute_s_min"] <= e["compute_s"] <= e["compute_s_max"], e
        assert e["wait_s_min"] <= e["wait_s"] <= e["wait_s_max"], e


def test_split_takes_the_slowest_ranks_parts_and_the_transfer_of_the_fastest():
    rows = np.array([[1.0, 0.5, 0.45, 0.0],   # waited for rank 1
                     [1.1, 0.9, 0.15, 0.0]])  # arrived last: its time in communication is the transfer
    out = accounting.split(rows, transfer=0.15)
    assert out["slowest_rank"] == 1 and out["time_s"] == 1.1
    assert out["comm_s"] == pytest.approx(0.15) and out["wait_s"] == pytest.approx(0.0)
    assert out["other_s"] == pytest.approx(0.05)
    assert (out["wait_s_min"], out["wait_s_max"]) == pytest.approx((0.0, 0.30))
    assert "mostly" not in accounting.parts_line(out)
    waiting = accounting.split(np.array([[4.0, 0.4, 3.5, 0.0], [4.0, 0.5, 3.4, 0.0]]), transfer=0.1)
    assert "mostly waiting for other ranks" in accounting.parts_line(waiting)


def test_results_of_schema_2_read_allreduce_s_as_comm_s(tmp_path):
    import h5py

    from pbp_hpc import results

    rec = {"sweep": "s", "point": 0, "repetition": 0, "implementation": "hybrid", "status": "ok", "epochs": [
        {"epoch": 0, "time_s": 1.0, "compute_s": 0.5, "comm_s": 0.25, "wait_s": 0.2, "other_s": 0.05, "loss": 0.1,
         "gflops": 1.0, "examples": 10, "partial": False}]}
    path = tmp_path / "r.h5"
    results.append_run(path, rec)
    with h5py.File(path, "r+") as f:  # as version 2 wrote it
        f.attrs["schema_version"] = 2
        g = f["runs"]["s.p0000.r0"]
        g.move("comm_s", "allreduce_s")
        for name in ("wait_s", "other_s", "compute_s_min", "compute_s_max", "wait_s_min", "wait_s_max"):
            if name in g:  # written only where an epoch gives them
                del g[name]
    (old,) = results.read_runs(path)
    assert old["epochs"][0]["comm_s"] == 0.25 and "wait_s" not in old["epochs"][0]
    results.append_run(path, {**rec, "point": 1})  # converts the file to the current version
    with h5py.File(path, "r") as f:
        assert int(f.attrs["schema_version"]) == results.SCHEMA_VERSION
        assert "comm_s" in f["runs"]["s.p0000.r0"]
    assert [r["epochs"][0]["comm_s"] for r in results.read_runs(path)] == [0.25, 0.25]


@pytest.mark.mpi
@pytest.mark.parametrize("over", [
    {"parallel.reducer": "blocking"}, {"parallel.reducer": "overlap"}, {"parallel.reducer": "shm"},
    {"parallel.reducer": "shared_batch", "train.batch_size": 12}, {"parallel.compression": "fp16"},
    {"parallel.strategy": "local_sgd", "parallel.local_steps": 3}, {"parallel.strategy": "async_ps"},
    {"parallel.strategy": "ssp"}, {"parallel.strategy": "hogwild"},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_reducer_and_strategy_accounts_for_the_whole_epoch(over):
    res = train.run(small(**over), WORLD, quiet=True)
    check_parts(res["epochs"])
    assert res["communication"]


@pytest.mark.mpi
def test_a_straggler_shows_as_the_others_waiting():
    if WORLD.size < 2:
        pytest.skip("needs 2 ranks")
    res = train.run(small(**{"study.straggler_factor": 4, "study.straggler_rank": 0}), WORLD, quiet=True)
    check_parts(res["epochs"])
    e = res["epochs"][-1]
    # the slow rank computes 4x as long; the others spend that difference waiting, not transferring
    assert e["wait_s_max"] > 0.5 * (e["compute_s_max"] - e["compute_s_min"]), e
    assert e["wait_s_max"] > e["comm_s"], e
