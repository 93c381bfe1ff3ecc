"""Elastic runs: a checkpoint resumes on another rank count, checkpoints every N steps, and the
elastic launcher (python -m pbp_hpc.elastic) finishes a job that lost a rank on the ranks left.

Real mpiexec jobs on synthetic data, each bounded; the ranks are killed for real (SIGKILL).
"""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest

from helpers import MPIEXEC, last_json
from pbp_hpc import checkpoint, elastic

PY = [sys.executable, "-m", "pbp_hpc.train"]
BOUND = 90  # seconds any one job may take
STEPS = 10  # per epoch: 720 examples, 1/6 for validation, batches of 60
# Net-1h with the built-in defaults (relu, cross-entropy, Nesterov momentum, cosine with warm-up),
# in float64 so that 1e-10 can be asked of another rank count's sums
NET1H = {"data.name": "synthetic", "data.n_train": "720", "train.batch_size": "60", "train.epochs": "2",
         "model.dtype": "float64", "train.progress": "false", "checkpoint.path": "ck.h5"}


def sets(**over: object) -> list[str]:
    merged = {**NET1H, **{k.replace("__", "."): str(v) for k, v in over.items()}}
    return [a for k, v in merged.items() for a in ("--set", f"{k}={v}")]


def theta(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["theta"][...]


def mpirun(mpi_job, ranks: int, *args: str, cwd_of=None) -> tuple[int, str, str, object]:
    job = mpi_job([MPIEXEC, "-n", str(ranks), *PY, *args])
    rc, out, err, _ = job.finish(BOUND)
    assert rc is not None, f"job ran past {BOUND}s; stderr:\n{err}"
    return rc, out, err, job.out_path.parent


def test_a_two_rank_checkpoint_resumed_on_one_and_three_ranks_ends_where_the_two_rank_run_ends(mpi_job, tmp_path):
    rc, _, err, where = mpirun(mpi_job, 2, *sets(), "-q")
    assert rc == 0, err
    uninterrupted = theta(where / "ck.h5")
    # stopped at global step 13: the checkpoint says "continue at epoch 1 step 4" (mid-epoch)
    rc, out, err, cut = mpirun(mpi_job, 2, *sets(debug__signal_step=13), "--json")
    assert rc == 0 and last_json(out)["stopped_at"] == {"epoch": 1, "step": 4}, err
    scale = np.abs(uninterrupted).max()
    for ranks in (1, 3):
        ck = tmp_path / f"ck{ranks}.h5"
        ck.write_bytes((cut / "ck.h5").read_bytes())
        rc, out, err, _ = mpirun(mpi_job, ranks, *sets(checkpoint__path=ck), "--resume", "--json")
        assert rc == 0, err
        assert f"written by 2 rank(s), continuing on {ranks}" in err
        assert np.abs(theta(ck) - uninterrupted).max() <= 1e-10 * scale, f"{ranks} ranks"
        assert last_json(out)["epochs"][-1]["partial"]  # the resumed epoch is marked, as on the same count


def test_scale_with_ranks_data_refuses_another_rank_count_and_keeps_the_checkpoint(mpi_job, tmp_path):
    over = {"data__scale_with_ranks": "true", "data__n_train": "360", "checkpoint__path": tmp_path / "ck.h5"}
    rc, _, err, _ = mpirun(mpi_job, 2, *sets(debug__signal_step=3, **over), "-q")
    assert rc == 0, err
    before = (tmp_path / "ck.h5").read_bytes()
    rc, _, err, _ = mpirun(mpi_job, 1, *sets(**over), "--resume", "-q")
    assert rc == 2 and "data.scale_with_ranks" in err and "written by a 2-rank run and this run has 1" in err
    assert (tmp_path / "ck.h5").read_bytes() == before


def test_every_steps_checkpoints_lose_at_most_the_interval_and_their_cost_is_recorded(mpi_job, tmp_path):
    # every 3 steps in a 2-epoch run of 10 steps per epoch; rank 1 dies (an exception) at step 14:
    # the last checkpoint is after step 11, "epoch 1 step 2"
    path = tmp_path / "ck.h5"
    rc, out, err, _ = mpirun(mpi_job, 2, *sets(checkpoint__every_steps=3, checkpoint__path=path, debug__fail_rank=1,
                                               debug__fail_step=14), "-q")
    assert rc not in (0, None) and "injected fault on rank 1" in err
    ck = checkpoint.load(path)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert [r["checkpoints"] for r in ck["meta"]["records"]] == [3]  # after steps 2, 5, 8 (9 is not a multiple)
    rc, out, err, _ = mpirun(mpi_job, 2, *sets(checkpoint__every_steps=3, checkpoint__path=path), "--resume", "--json")
    assert rc == 0, err
    res = last_json(out)
    assert res["epochs"][1]["checkpoints"] == 2 and res["epochs"][1]["checkpoint_s"] > 0  # after global steps 14 and 17
