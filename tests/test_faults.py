"""Faults during a run, each caused on purpose: the job must end, soon, saying once what happened.

Every test launches real `mpiexec` jobs (MPICH's Hydra) and bounds how long they may take: a
failure that leaves the other ranks waiting in a collective is the bug these tests exist for.
What Hydra itself does (it forwards SIGINT/SIGTERM/SIGUSR1 to the ranks; when a rank dies by
a signal it kills the others and exits with that signal's number) is spelt out in
docs/troubleshooting.md; the tests below pin the parts the package relies on.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest

from helpers import MPIEXEC, last_json
from pbp_hpc.data.idx import write_idx

PY = [sys.executable, "-m", "pbp_hpc.train"]
TINY = ["--set", "data.name=synthetic", "--set", "data.n_train=600", "--set", "model.layers=[784, 16, 10]",
        "--set", "train.batch_size=20", "--set", "train.epochs=2", "--set", "train.progress=false"]
LONG = [*TINY, "--set", "train.epochs=100000"]  # ends only when something stops it
HANG_BOUND = 30  # seconds: a job that fails must be gone well within this


def train(ranks: int, *args: str) -> list[str]:
    return [MPIEXEC, "-n", str(ranks), *PY, *TINY, *args]


def mpmd(first: list[str], second: list[str]) -> list[str]:
    """A 2-rank job whose ranks were started with different arguments (as two nodes could be)."""
    return [MPIEXEC, "-n", "1", *PY, *TINY, *first, ":", "-n", "1", *PY, *TINY, *second]


# --- one rank fails ------------------------------------------------------------------------

def test_a_fault_on_one_rank_ends_the_job_within_seconds_with_its_message_once(mpi_job):
    job = mpi_job(train(3, "--set", "debug.fail_rank=1", "--set", "debug.fail_step=3"))
    rc, out, err, seconds = job.finish(HANG_BOUND)
    assert rc is not None, f"the job hung; stderr:\n{err}"
    assert rc != 0 and seconds < HANG_BOUND
    assert err.count("pbp_hpc: rank 1 of 3 failed: injected fault on rank 1 at step 3") == 1
    assert "Traceback" not in err  # our own error: a message, not a traceback


def test_a_python_error_on_one_rank_prints_its_traceback_from_that_rank_only(mpi_job):
    job = mpi_job(train(2, "--set", "debug.fail_rank=1", "--set", "debug.fail_step=2", "--set", "debug.fail_kind=oserror"))
    rc, out, err, seconds = job.finish(HANG_BOUND)
    assert rc is not None and rc != 0, err
    assert err.count("pbp_hpc: rank 1 of 2 failed: OSError") == 1
    assert err.count("Traceback (most recent call last)") == 1 and "_inject_fault" in err
    assert "rank 0 of 2" not in err


# --- a rank dies ---------------------------------------------------------------------------

def test_a_rank_killed_by_sigkill_takes_the_job_down(mpi_job):
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *LONG])
    assert job.wait_for("epoch   1", 60), job.finish(1)[2]  # training, not still importing
    victim = job.ranks()[-1]
    os.kill(victim.pid, signal.SIGKILL)
    rc, out, err, seconds = job.finish(60)
    assert rc is not None, "Hydra left the surviving rank running"
    # Usually Hydra sees the death first: it kills the other ranks, says why on stdout and exits
    # with the signal's number. Under load the survivor may first get an MPI error from its
    # Allreduce instead: it then reports it and aborts, and the exit code is 1. Either way, fast.
    if rc == 9:
        assert "BAD TERMINATION" in out and "Killed (signal 9)" in out
    else:
        assert rc == 1 and "pbp_hpc: rank 0 of 2 failed" in err, (rc, out, err)


def test_ctrl_c_on_mpiexec_ends_every_rank_instead_of_hanging(mpi_job):
    # Hydra forwards SIGINT to the ranks; one rank leaves its collective first and the others
    # would wait for it forever: the package aborts the job instead.
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *LONG])
    assert job.wait_for("epoch   1", 60)
    os.kill(job.proc.pid, signal.SIGINT)
    rc, out, err, seconds = job.finish(HANG_BOUND)
    assert rc is not None, f"Ctrl-C left the job hanging; stderr:\n{err}"
    assert rc != 0 and "interrupted (SIGINT)" in err and "KeyboardInterrupt" not in err


# --- divergence ----------------------------------------------------------------------------

def test_divergence_stops_naming_epoch_and_step_exit_3_and_is_no_result(mpi_job):
    # debug.fail_kind=nan makes rank 1's gradient and loss NaN at global step 27: epoch 1, step 2
    # (25 steps per epoch). Every rank sees the NaN in the summed loss and stops at that step.
    job = mpi_job(train(2, "--set", "debug.fail_rank=1", "--set", "debug.fail_step=27", "--set", "debug.fail_kind=nan",
                        "--set", "checkpoint.path=final.h5", "--json"))
    rc, out, err, seconds = job.finish(HANG_BOUND)
    assert rc == 3, err
    assert err.count("training diverged at epoch 1 step 2") == 1
    res = last_json(out)
    assert res["status"] == "diverged" and (res["epoch"], res["step"]) == (1, 2)
    assert "test_accuracy" not in res and "epochs" not in res  # nothing that could pass for a result
    assert not (job.out_path.parent / "final.h5").exists()  # no final checkpoint of a diverged model


def test_a_huge_learning_rate_saturates_the_sigmoids_rather_than_producing_nan():
    """Documents why lr=1e6 is not reported as divergence: sigmoid + MSE keep every value finite.

    The weights grow until every unit saturates, the gradients underflow to zero and training
    stalls at chance accuracy with a finite loss. Divergence here means NaN or Inf only.
    """
    from mpi4py import MPI

    from pbp_hpc import config
    from pbp_hpc import train as trainmod
    cfg = config.load(None, ["data.name=synthetic", "data.n_train=240", "model.layers=[784, 16, 10]",
                             "train.batch_size=20", "train.epochs=2", "train.learning_rate=1e6", "train.progress=false"])
    res = trainmod.run(cfg, MPI.COMM_SELF, return_params=True)
    assert res["status"] == "ok" and np.isfinite(res["params"]).all()
    assert np.isfinite(res["epochs"][-1]["loss"]) and res["test_accuracy"] < 0.5


# --- ranks that disagree -------------------------------------------------------------------

def test_parallel_ranks_other_than_the_world_size_fails_before_training(mpi_job):
    rc, out, err, _ = mpi_job(train(2, "--set", "parallel.ranks=3")).finish(HANG_BOUND)
    assert rc == 2 and err.count("asked for 3 ranks (parallel.ranks) but MPI_COMM_WORLD has 2") == 1
    assert "epoch" not in out


@pytest.mark.parametrize("second, message", [
    (["--set", "train.seed=1"], "ranks [1] loaded a different configuration from rank 0"),
    # Each rank checks the world size against its own parallel.ranks: rank 0 alone would fail.
    (["--set", "parallel.ranks=1"], "ranks [1] loaded a different configuration from rank 0"),
    # Rank 1 alone cannot even load its configuration: it used to exit and leave rank 0 waiting.
    (["--set", "train.learning_rat=1"], "on rank 1 only: invalid configuration"),
], ids=["other seed", "other parallel.ranks", "misspelt key on one rank"])
def test_ranks_started_with_different_settings_fail_before_training(mpi_job, second, message):
    rc, out, err, seconds = mpi_job(mpmd([], second)).finish(HANG_BOUND)
    assert rc is not None, f"the job hung; stderr:\n{err}"
    assert rc == 2 and err.count(message) == 1 and "epoch" not in out


def _idx_set(directory, labels_of_train):
    """A 4x4-pixel IDX data set, 40 training and 10 test examples."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    write_idx(directory / "train-images-idx3-ubyte", rng.integers(0, 256, (40, 4, 4), dtype=np.uint8))
    write_idx(directory / "train-labels-idx1-ubyte", labels_of_train)
    write_idx(directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 4, 4), dtype=np.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))


@pytest.mark.parametrize("rank1_data, message", [
    ("other labels", "ranks loaded different data"),
    ("missing", "on rank 1 only: cannot load the data set"),
])
def test_ranks_that_see_different_data_files_fail_before_training(tmp_path, mpi_job, rank1_data, message):
    # The same relative --data-dir resolved in two working directories: as two nodes whose
    # copies of the data differ. Rank 0 resolves the folder; every rank reads the files.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    labels = (np.arange(40) % 10).astype(np.uint8)
    _idx_set(tmp_path / "node0" / "data", labels)
    if rank1_data == "other labels":
        _idx_set(tmp_path / "node1" / "data", labels[::-1].copy())
    args = ["--data-dir", "data", "--set", "data.name=idx", "--set", "data.n_train=null", "--set", "model.layers=[16, 8, 10]",
            "--set", "train.batch_size=8"]
    # two emulated nodes (one rank each): on one node, its ranks share the first rank's copy of the data
    cmd = [MPIEXEC, "-ppn", "1", "-hosts", "localhost,127.0.0.1", "-launcher", "fork",
           "-n", "1", "-wdir", str(tmp_path / "node0"), *PY, *TINY, *args,
           ":", "-n", "1", "-wdir", str(tmp_path / "node1"), *PY, *TINY, *args]
    rc, out, err, _ = mpi_job(cmd).finish(HANG_BOUND)
    assert rc == 2, err
    assert err.count(message) == 1 and "Traceback" not in err and "epoch" not in out


# --- bad input at the command line -----------------------------------------------------------

def _cli(tmp_path, args: list[str], process: bool, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command line: as its own process (what a user runs), or
    through train.main in this process, which is the same code without the interpreter start-up."""
    import subprocess

    from pbp_hpc import train as trainmod
    if process:
        p = subprocess.run([*PY, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        return p.returncode, p.stdout, p.stderr
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        capsys.readouterr()
        rc = trainmod.main(args)
    finally:  # main installs its signal handlers: give pytest its own back
        os.chdir(cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return rc, out, err


BAD_CONFIG = {  # case: (file content or None, arguments, what the message must say)
    "missing file": (None, ["--config", "nonexistent.yaml"], "config file not found: nonexistent.yaml"),
    "not YAML": ("model: [784, 16\n", ["--config", "run.yaml"], "run.yaml is not valid YAML"),
    "python tag": ("train: !!python/object/apply:os.system ['touch pwned']\n", ["--config", "run.yaml"], "run.yaml is not valid YAML"),
    "not a mapping": ("- 784\n- 10\n", ["--config", "run.yaml"], "must hold a mapping"),
    "section as a scalar": ("train: 5\n", ["--config", "run.yaml"], "train: Input should be a valid dictionary"),
    "float batch size": (None, ["--set", "train.batch_size=12.5"], "train.batch_size: Input should be a valid integer"),
    "bool for an int": (None, ["--set", "train.epochs=true"], "train.epochs: expected a number, not a bool"),
    "impossible model size": (None, ["--set", "data.name=synthetic", "--set", "model.layers=[784, 100000000000, 10]"], "needs at least"),
}


@pytest.mark.parametrize("case", BAD_CONFIG)
def test_bad_configuration_is_one_clear_message_and_exit_2(tmp_path, capsys, case):
    content, args, message = BAD_CONFIG[case]
    if content is not None:
        (tmp_path / "run.yaml").write_text(content)
    rc, out, err = _cli(tmp_path, args, process=case == "missing file", capsys=capsys)
    assert rc == 2, err
    assert err.startswith("pbp_hpc: error: ") and message in err and "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == (["run.yaml"] if content else [])  # nothing written


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is truncated"),
    ("wrong magic", "is not an IDX file"),
    ("count mismatch", "holds 40 images but"),
    ("label out of range", "holds 13 classes (the largest label in"),
])
def test_a_damaged_data_file_is_named_and_nothing_runs(tmp_path, capsys, damage, message):
    data = tmp_path / "data"
    _idx_set(data, (np.arange(40) % 10).astype(np.uint8))
    labels = data / "train-labels-idx1-ubyte"
    if damage == "truncated":
        labels.write_bytes(labels.read_bytes()[:-5])
    elif damage == "wrong magic":
        labels.write_bytes(b"\x1f\x8c" + labels.read_bytes()[2:])
    elif damage == "count mismatch":
        write_idx(labels, (np.arange(39) % 10).astype(np.uint8))
    else:
        bad = (np.arange(40) % 10).astype(np.uint8)
        bad[3] = 12
        write_idx(labels, bad)
    args = ["--data-dir", str(data), "--set", "data.name=idx", "--set", "model.layers=[16, 8, 10]", "--set", "train.progress=false", "--json"]
    rc, out, err = _cli(tmp_path, args, process=damage == "truncated", capsys=capsys)
    assert rc == 2, err
    assert err.count(message) == 1 and "Traceback" not in err
    assert str(labels) in err and out == ""


def test_usr1_to_one_rank_only_still_stops_every_rank_at_the_same_step(mpi_job):
    # The flag travels in the gradient buffer: rank 0, which got no signal, stops too.
    job = mpi_job([MPIEXEC, "-n", "2", *PY, *LONG, "--set", "checkpoint.path=ck.h5", "--json"])
    assert job.wait_for("epoch   1", 60)
    os.kill(job.ranks()[-1].pid, signal.SIGUSR1)
    rc, out, err, _ = job.finish(60)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["status"] == "checkpointed" and "on 1 of 2 rank(s)" in err
