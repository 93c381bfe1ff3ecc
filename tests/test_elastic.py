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
from mpi4py import MPI

from pbp_hpc import checkpoint, config, train

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
    over = {"data__scale_with_ranks": "true", "data__n_train": "360", "checkpoint__path": tmp_path / "ck.h5",
            "model__layers": "[784, 16, 10]"}
    cfg = config.load(None, [a for a in sets(debug__signal_step=3, **over) if a != "--set"])
    train.run(cfg, MPI.COMM_SELF)  # a 1-rank checkpoint
    before = (tmp_path / "ck.h5").read_bytes()
    rc, _, err, _ = mpirun(mpi_job, 2, *sets(**over), "--resume", "-q")
    assert rc == 2 and "data.scale_with_ranks" in err and "written by a 1-rank run and this run has 2" in err
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


def test_every_seconds_is_rank_0s_clock_and_every_rank_writes_at_the_same_step(mpi_job, tmp_path):
    # an interval that has always passed by a block's end: a checkpoint after every step of the
    # epoch but its last (the run's end writes that one); ranks that disagreed would hang in save's barrier
    rc, out, err, _ = mpirun(mpi_job, 3, *sets(checkpoint__every_seconds=1e-6, train__epochs=1,
                                               model__layers="[784, 16, 10]", checkpoint__path=tmp_path / "ck.h5"),
                             "--json")
    assert rc == 0, err
    assert last_json(out)["epochs"][0]["checkpoints"] == STEPS - 1
    assert (checkpoint.load(tmp_path / "ck.h5")["epoch"]) == 1


# --- the elastic launcher -----------------------------------------------------------------------

SMALL = {**NET1H, "model.layers": "[784, 64, 10]", "model.dtype": "float32", "train.epochs": "2",
         "checkpoint.every_steps": "4"}
KILL_STEP = 15  # epoch 1 step 5; the last checkpoint before it is after global step 11: "epoch 1 step 2"


def elastic(mpi_job, ranks: int, *opts: str, **over: object) -> tuple[int, dict, str, object]:
    merged = {**SMALL, **{k.replace("__", "."): str(v) for k, v in over.items()}}
    args = [a for k, v in merged.items() for a in ("--set", f"{k}={v}")]
    job = mpi_job([sys.executable, "-m", "pbp_hpc.elastic", *opts, "--", MPIEXEC, "-n", str(ranks), *PY, *args,
                   "--json", "-q"])
    rc, out, err, _ = job.finish(BOUND)
    assert rc is not None, f"the elastic run ran past {BOUND}s; stderr:\n{err}"
    return rc, last_json(out), err, job.out_path.parent


def test_a_rank_killed_mid_run_is_left_out_and_the_run_finishes_on_the_others(mpi_job):
    # rank 1 is slow all along (3 times the others' compute): not a failure
    rc, res, err, where = elastic(mpi_job, 3, "--min-ranks", "2", debug__fail_rank=2, debug__fail_step=KILL_STEP,
                                  debug__fail_kind="kill", study__straggler_factor=3, study__straggler_rank=1)
    assert rc == 0 and res["status"] == "ok", err
    assert res["ranks"] == 2 and res["restarts"] == 1 and res["lost_s"] > 0
    [event] = res["elastic"]["events"]
    assert event["lost_ranks"] == [2] and "SIGKILL" in event["cause"] and event["ranks_after"] == 2
    ck = event["checkpoint"]
    assert ck["valid"] and (ck["epoch"], ck["step"]) == (1, 2)
    assert KILL_STEP - (ck["epoch"] * STEPS + ck["step"]) <= 4  # work redone: at most checkpoint.every_steps
    assert event["redone_s"] >= 0 and event["restart_s"] > 0
    assert "restart 1 of at most 3: rank 2" in err
    assert checkpoint.load(where / "ck.h5")["epoch"] == 2  # the final checkpoint: valid, at the end


def test_a_second_loss_below_min_ranks_ends_cleanly_and_keeps_the_checkpoint(mpi_job):
    # rank 1 dies again in the 2-rank restart: 1 rank would be left, fewer than --min-ranks 2
    rc, res, err, where = elastic(mpi_job, 3, "--min-ranks", "2", debug__fail_rank=1, debug__fail_step=KILL_STEP,
                                  debug__fail_kind="kill")
    assert rc == 9 and res["status"] == "failed" and "fewer than --min-ranks 2" in res["error"], err
    assert res["restarts"] == 1 and [e["ranks"] for e in res["elastic"]["events"]] == [3, 2]
    ck = checkpoint.load(where / "ck.h5")  # every field checked
    assert (ck["epoch"], ck["step"]) == (1, 2) and ck["meta"]["ranks"] == 3
    assert sorted(p.name for p in where.iterdir()) == ["ck.h5", "job.err", "job.out"]  # no temporary file left


def test_a_bad_setup_is_not_restarted(mpi_job):
    rc, res, err, _ = elastic(mpi_job, 2, parallel__ranks=3)  # the world is not what the config asks for: exit 2
    assert rc == 2 and res["status"] == "failed" and res["restarts"] == 0, err
    assert "not restarted" in res["error"] and "attempt 2" not in err


# --- the launch rewritten for what is left, and what an ending says (no processes) --------------

def _shrunk(cmd: str, lost_ranks=(), lost_hosts=(), where=()) -> tuple[str, int]:
    from pbp_hpc.elastic import command

    new, n = command.shrunk(command.parse(cmd.split()), list(lost_ranks), list(lost_hosts), list(where))
    return " ".join(new.argv()), n


def test_a_plain_launch_loses_one_rank_and_parallel_ranks_follows():
    cmd, n = _shrunk("mpiexec -n 3 python -m pbp_hpc.train --set parallel.ranks=3 -q", lost_ranks=[2])
    assert n == 2 and cmd == "mpiexec -n 2 python -m pbp_hpc.train --set parallel.ranks=2 -q --resume"


def test_a_hosts_launch_drops_the_host_of_the_lost_rank():
    where = [{"host": "a"}, {"host": "a"}, {"host": "b"}, {"host": "b"}]
    cmd, n = _shrunk("mpiexec -n 4 -hosts a,b -ppn 2 python -m pbp_hpc.train", lost_ranks=[3], where=where)
    assert n == 2 and cmd == "mpiexec -n 2 -hosts a -ppn 2 python -m pbp_hpc.train --resume"


def test_srun_excludes_a_failed_node_and_asks_for_one_node_fewer():
    where = [{"host": "h", "node": "n1"}, {"host": "h", "node": "n2"}]
    cmd, n = _shrunk("srun --mpi=pmi2 -N 2 --ntasks-per-node=1 python -m pbp_hpc.train --set parallel.ranks=2",
                     lost_hosts=["n2"], where=where)
    assert n == 1 and cmd.startswith("srun -N 1 -x n2 --mpi=pmi2 --ntasks-per-node=1 python")
    assert cmd.endswith("--set parallel.ranks=1 --resume")


def test_endings_are_read_from_exit_codes_and_the_launchers_notices():
    from pbp_hpc.elastic import failures

    where = [{"host": "h", "pid": 10}, {"host": "h", "pid": 11}, {"host": "h", "pid": 12}]
    hydra = "=   PID 11 RUNNING AT h\n=   EXIT CODE: 9\n"
    assert failures.classify(9, hydra, where).ranks == [1]  # Hydra's notice alone
    assert failures.classify(9, hydra, where, first_dead=[2]).ranks == [2]  # the launcher saw rank 2 end first
    on_nodes = [{"host": "h", "node": "n1"}, {"host": "h", "node": "n2"}, {"host": "h", "node": "n2"}]
    srun = "srun: error: Node failure on n2\nsrun: error: n1: task 0: Killed\n"  # task 0 went with the step
    end = failures.classify(137, srun, on_nodes)
    assert (end.kind, end.ranks, end.hosts) == ("lost", [1, 2], ["n2"])
    stall = "more than parallel.stall_timeout_s 5, for rank 2; aborting the job (exit 4)"
    assert failures.classify(4, stall, where).ranks == [2]
    for code in (1, 2, 3, 130, 143, -9):  # -9: mpiexec itself was SIGKILLed  # an error a restart would repeat, divergence, a stop signal: final
        assert failures.classify(code, "", where).kind == "final"
    assert failures.classify(0, "", where).kind == "finished"


def test_a_sweep_point_run_elastically_is_recorded_with_its_restarts(tmp_path):
    # the sweep's launcher template puts the elastic launcher in front of mpiexec (docs/elastic.md)
    import os
    import subprocess

    from pbp_hpc.results import store

    spec = tmp_path / "el.yaml"
    spec.write_text(f"""name: el
base: {{data.name: synthetic, data.n_train: 720, data.n_test: 60, train.epochs: 2, train.eval_every: 0,
        train.progress: false, checkpoint.every_steps: 4, debug.fail_rank: 2, debug.fail_step: {KILL_STEP},
        debug.fail_kind: kill}}
oversubscribe: true
warmup_epochs: 0
axes: {{implementation: [hybrid], network: [[784, 16, 10]], batch_size: [60], ranks: [3]}}
""")
    env = {**os.environ, "PBP_MPIEXEC": f"{sys.executable} -m pbp_hpc.elastic --min-ranks 2 -- {MPIEXEC} -n {{ranks}}"}
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.sweep", str(spec), "--results", str(tmp_path / "el.h5")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=BOUND)
    assert p.returncode == 0 and "1 ok" in p.stdout + p.stderr, p.stdout + p.stderr
    [run] = store.read_runs(tmp_path / "el.h5")  # the results file reads, every field checked
    assert run["status"] == "ok" and run["restarts"] == 1 and run["lost_s"] > 0
    assert run["elastic"]["final_ranks"] == 2 and "SIGKILL" in run["elastic"]["events"][0]["cause"]
    assert all(e["checkpoint_s"] >= 0 for e in run["epochs"])
