"""Checkpoints: stop on a signal, resume, and end exactly where an uninterrupted run ends.

"Exactly" is bit for bit: the data order is a function of (seed, epoch) and the checkpoint holds
the parameters and the position, so a resumed run repeats the same floating-point operations
in the same order as long as the rank count is the same (another count: tests/test_elastic.py).
Parameters are compared through the final checkpoint, which train writes when checkpoint.path
is set. 2-rank runs are real `mpiexec` jobs; 1-rank runs call train.run in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import MPIEXEC, last_json
from pbp_hpc import checkpoint
from pbp_hpc import config
from pbp_hpc import train
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.errors import ConfigError
from helpers import REPORT_SETUP

PY = [sys.executable, "-m", "pbp_hpc.train"]
STEPS = 10  # per epoch: 240 examples, 1/6 for validation, batches of 20
SETTINGS = {**REPORT_SETUP, "data.name": "synthetic", "data.n_train": "240", "model.layers": "[784, 16, 10]", "train.batch_size": "20",
            "train.epochs": "3", "train.learning_rate": "0.5", "train.progress": "false", "checkpoint.path": "ck.h5"}
BOUND = 60  # seconds any one job may take


def sets(**over: object) -> list[str]:
    """--set arguments: SETTINGS with `over` (keys with __ for dots) applied."""
    merged = {**SETTINGS, **{k.replace("__", "."): str(v) for k, v in over.items()}}
    return [a for k, v in merged.items() for a in ("--set", f"{k}={v}")]


def cfg_of(directory, **over: object) -> config.Config:
    merged = {**SETTINGS, "checkpoint.path": str(directory / "ck.h5"), **{k.replace("__", "."): str(v) for k, v in over.items()}}
    return config.load(None, [f"{k}={v}" for k, v in merged.items()])


def theta(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["theta"][...]


def position(path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        return int(f.attrs["epoch"]), int(f.attrs["step"])


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), f"{np.count_nonzero(a != b)} of {a.size} parameters differ"


def mpirun(mpi_job, ranks: int, *args: str) -> tuple[int, str, str, object]:
    job = mpi_job([MPIEXEC, "-n", str(ranks), *PY, *args])
    rc, out, err, _ = job.finish(BOUND)
    assert rc is not None, f"job ran past {BOUND}s; stderr:\n{err}"
    return rc, out, err, job.out_path.parent


_REFERENCE: dict[tuple[int, int], np.ndarray] = {}


def reference(mpi_job, ranks: int, epochs: int = 3) -> np.ndarray:
    """Final parameters of an uninterrupted run (computed once per rank count and length)."""
    if (ranks, epochs) not in _REFERENCE:
        rc, out, err, where = mpirun(mpi_job, ranks, *sets(train__epochs=epochs), "-q")
        assert rc == 0, err
        _REFERENCE[(ranks, epochs)] = theta(where / "ck.h5")
    return _REFERENCE[(ranks, epochs)]


# --- stop at a chosen step, resume, compare ----------------------------------------------------

# Global step 13 is epoch 1 step 3: the checkpoint says "continue at epoch 1 step 4".
# Global step 9 is the last of epoch 0: the epoch is finished and recorded, then "epoch 1 step 0".
WHERE = {"mid-epoch": (13, (1, 4)), "epoch boundary": (STEPS - 1, (1, 0))}


@pytest.mark.parametrize("where", WHERE)
def test_one_rank_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, where):
    signal_step, expected = WHERE[where]
    full = train.run(cfg_of(tmp_path / "full"), MPI.COMM_SELF, return_params=True)
    stopped = train.run(cfg_of(tmp_path / "cut", debug__signal_step=signal_step), MPI.COMM_SELF)
    assert stopped["status"] == "checkpointed" and stopped["test_accuracy"] is None
    assert position(tmp_path / "cut" / "ck.h5") == expected
    resumed = train.run(cfg_of(tmp_path / "cut", checkpoint__resume="true"), MPI.COMM_SELF, return_params=True)
    assert resumed["status"] == "ok"
    assert_bitwise_equal(resumed["params"], full["params"])
    assert_bitwise_equal(theta(tmp_path / "cut" / "ck.h5"), theta(tmp_path / "full" / "ck.h5"))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]  # every epoch recorded once
    assert resumed["epochs"][1]["partial"] == (where == "mid-epoch")


def test_a_stop_request_survives_the_per_example_path(tmp_path):
    # That path zeroes the gradient buffer after the stop flag is set; it once zeroed the flag too.
    res = train.run(cfg_of(tmp_path, algorithm="per_example", data__n_train=60, debug__signal_step=1), MPI.COMM_SELF)
    assert res["status"] == "checkpointed" and position(tmp_path / "ck.h5") == (0, 2)


@pytest.mark.parametrize("where", WHERE)
def test_two_ranks_stopped_and_resumed_equal_an_uninterrupted_run(mpi_job, where):
    signal_step, expected = WHERE[where]
    # Only rank 1 is "signalled": the stop still happens on both ranks at the same step.
    rc, out, err, cut = mpirun(mpi_job, 2, *sets(debug__signal_step=signal_step, debug__signal_rank=1), "--json")
    assert rc == 0, err
    res = last_json(out)
    assert res["status"] == "checkpointed" and tuple(res["stopped_at"].values()) == expected
    assert position(cut / "ck.h5") == expected
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *sets(checkpoint__path=cut / "ck.h5"), "--resume", "--json"])
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 0, err
    assert f"resumed from {cut / 'ck.h5'} at epoch {expected[0]} step {expected[1]}" in err
    assert last_json(out)["status"] == "ok"
    assert_bitwise_equal(theta(cut / "ck.h5"), reference(mpi_job, 2))


def test_a_real_signal_to_every_rank_checkpoints_and_resume_equals_uninterrupted(mpi_job):
    # Timing-agnostic: wherever SIGTERM lands, the resumed run must match an uninterrupted run
    # of the same length. train.epochs is not part of what a checkpoint must match, so both are
    # given "two epochs past where it stopped".
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *sets(train__epochs=100000), "--json"])
    assert job.wait_for("epoch   1 ", BOUND), job.finish(1)[2]
    for rank in job.ranks():
        os.kill(rank.pid, signal.SIGTERM)
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 0, err
    res = last_json(out)
    assert res["status"] == "checkpointed" and "stop requested by a signal" in err  # on 1 or 2 ranks by then: a race
    ck = job.out_path.parent / "ck.h5"
    epoch, step = position(ck)
    assert (epoch, step) == tuple(res["stopped_at"].values())
    assert [p.name for p in ck.parent.iterdir() if p.suffix not in (".out", ".err")] == ["ck.h5"]  # no temporary left
    length = epoch + 2
    rc, out, err, _ = mpirun(mpi_job, 2, *sets(train__epochs=length, checkpoint__path=ck), "--resume", "-q")
    assert rc == 0, err
    assert_bitwise_equal(theta(ck), reference(mpi_job, 2, length))


def test_usr1_to_mpiexec_is_forwarded_to_the_ranks(mpi_job):
    # Hydra passes SIGUSR1 (and SIGTERM, SIGINT) on to every rank: signalling mpiexec is enough.
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *sets(train__epochs=100000), "--json"])
    assert job.wait_for("epoch   1 ", BOUND)
    os.kill(job.proc.pid, signal.SIGUSR1)
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 0, err
    assert last_json(out)["status"] == "checkpointed" and "stop requested by a signal" in err  # on 1 or 2 ranks by then: a race


# --- periodic checkpoints, crashes, and where they are written ---------------------------------

def test_periodic_checkpoints_survive_a_crash_and_are_written_by_rank_0_only(tmp_path, mpi_job):
    # Rank 1 runs in another directory with the same relative checkpoint.path: if it wrote
    # anything it would appear there. It also cannot see rank 0's file, so the resume works
    # only because rank 0 reads the checkpoint and sends it.
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()

    def job(*args: str) -> tuple[int | None, str, str, float]:
        return mpi_job([MPIEXEC, "-n", "1", "-wdir", str(node0), *PY, *args,
                        ":", "-n", "1", "-wdir", str(node1), *PY, *args]).finish(BOUND)

    # every_epochs=1, then rank 1 fails at epoch 2 step 5: the last checkpoint is "epoch 2 step 0".
    rc, out, err, _ = job(*sets(checkpoint__every_epochs=1, debug__fail_rank=1, debug__fail_step=2 * STEPS + 5))
    assert rc not in (None, 0) and "injected fault on rank 1" in err
    assert position(node0 / "ck.h5") == (2, 0)
    assert list(node1.iterdir()) == []
    rc, out, err, _ = job(*sets(checkpoint__every_epochs=1), "--resume", "-q")
    assert rc == 0, err
    assert list(node1.iterdir()) == []
    assert_bitwise_equal(theta(node0 / "ck.h5"), reference(mpi_job, 2))


# --- refusals ------------------------------------------------------------------------------------

def test_resuming_with_other_training_settings_is_refused(tmp_path):
    train.run(cfg_of(tmp_path, debug__signal_step=4), MPI.COMM_SELF)
    with pytest.raises(CheckpointError, match="other model/data/training settings"):
        train.run(cfg_of(tmp_path, train__learning_rate=0.25, checkpoint__resume="true"), MPI.COMM_SELF)


def _not_ours(path, kind: str) -> None:
    """Files a checkpoint.path might point at by mistake."""
    if kind == "text":
        path.write_text("epoch,loss\n0,0.5\n")
    elif kind == "other HDF5":
        with h5py.File(path, "w") as f:
            f["results"] = np.arange(3)
    elif kind == "future version":
        checkpoint.save(path, np.zeros(3, np.float32), 0, 0, {})
        with h5py.File(path, "a") as f:
            f.attrs["version"] = 99
    elif kind == "theta missing":
        checkpoint.save(path, np.zeros(3, np.float32), 0, 0, {})
        with h5py.File(path, "a") as f:
            del f["theta"]
    elif kind == "no resume information":
        checkpoint.save(path, np.zeros(3, np.float32), 0, 0, {"note": "written by another tool"})


# kind: (what checkpoint.load says, what a run with --resume and checkpoint.path says)
KINDS = {
    "text": ("cannot read checkpoint", "exists and is not a pbp_hpc checkpoint"),
    "other HDF5": ("is an HDF5 file but not a pbp_hpc checkpoint", "exists and is not a pbp_hpc checkpoint"),
    "future version": ("is checkpoint version 99, this pbp_hpc reads version 1",) * 2,
    "theta missing": ("cannot read checkpoint",) * 2,
    "no resume information": (None, "without the resume information (resume_key, ranks, records)"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_usable_checkpoint_is_a_clear_error_and_left_alone(tmp_path, kind):
    path = tmp_path / "ck.h5"
    _not_ours(path, kind)
    before = path.read_bytes()
    from_load, from_resume = KINDS[kind]
    if from_load is not None:
        with pytest.raises(CheckpointError, match=re.escape(from_load)):
            checkpoint.load(path)
    with pytest.raises(CheckpointError, match=re.escape(from_resume)):
        train.run(cfg_of(tmp_path, checkpoint__resume="true"), MPI.COMM_SELF)
    assert path.read_bytes() == before


def test_a_file_at_checkpoint_path_that_is_not_a_checkpoint_is_never_overwritten(tmp_path, mpi_job):
    (tmp_path / "results.csv").write_text("lr,acc\n0.1,0.9\n")
    rc, out, err, _ = mpirun(mpi_job, 2, *sets(checkpoint__path=tmp_path / "results.csv"))
    assert rc == 2 and err.count("is not a pbp_hpc checkpoint; refusing to overwrite it") == 1
    assert "epoch" not in out  # refused before training, not at its end
    assert (tmp_path / "results.csv").read_text() == "lr,acc\n0.1,0.9\n"


def test_an_unwritable_checkpoint_path_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        train.run(cfg_of(tmp_path, checkpoint__path=tmp_path / "file" / "ck.h5"), MPI.COMM_SELF)


# --- the write itself ------------------------------------------------------------------------------

def test_a_write_that_fails_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "ck.h5"
    checkpoint.save(path, np.arange(4, dtype=np.float32), 1, 2, {"records": []})
    before = path.read_bytes()
    with pytest.raises(TypeError):  # meta that cannot be written: the failure comes mid-write
        checkpoint.save(path, np.zeros(4, dtype=np.float32), 3, 0, {"bad": object()})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ck.h5"]
    ck = checkpoint.load(path)
    assert (ck["epoch"], ck["step"]) == (1, 2) and ck["theta"].tolist() == [0, 1, 2, 3]


def test_a_write_to_an_impossible_place_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        checkpoint.save(tmp_path / "file" / "ck.h5", np.zeros(2), 0, 0, {})


def test_checkpoint_json_meta_round_trips(tmp_path):
    meta = {"records": [{"epoch": 0, "loss": 0.25}], "ranks": 2, "resume_key": {"a": [1, 2]}}
    checkpoint.save(tmp_path / "ck.h5", np.ones(5, np.float64), 4, 7, meta)
    ck = checkpoint.load(tmp_path / "ck.h5")
    assert ck["meta"] == json.loads(json.dumps(meta)) and ck["theta"].dtype == np.float64
