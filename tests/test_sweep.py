"""Sweeps: which points a sweep file means, and running them for real with mpiexec, through failures and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pbp_hpc import results, sweep
from pbp_hpc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {
    "data": {"name": "synthetic", "n_train": 240, "n_test": 40},
    "model": {"layers": [784, 16, 10]},
    "train": {"epochs": 2, "learning_rate": 0.5, "eval_every": 0, "progress": False},
}


def write(tmp_path: Path, name: str = "demo", **spec) -> Path:
    spec = {"name": name, "base": TINY_BASE, **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_cli(*args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pbp_hpc.sweep", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


ALL_IMPLEMENTATIONS = ["naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework"]


# ---------------------------------------------------------------------------------------------
# What a sweep file expands to


def test_each_implementation_keeps_only_the_rank_and_thread_counts_it_can_be(tmp_path):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ALL_IMPLEMENTATIONS, "batch_size": [32, 64],
                                            "ranks": [1, 2], "threads_per_rank": [1, 2]}))
    shapes = Counter((p.implementation, p.ranks, p.threads) for p in sw.points)
    assert shapes == {
        ("naive-serial", 1, 1): 2, ("blas-serial", 1, 1): 2, ("blas-threaded", 1, 2): 2, ("example-parallel", 2, 1): 2,
        ("hybrid", 2, 1): 2, ("hybrid", 2, 2): 2, ("gpu", 1, 1): 2, ("gpu", 2, 1): 2,
        ("framework", 1, 1): 2, ("framework", 1, 2): 2,
    }
    assert [p.index for p in sw.points] == list(range(20))
    by_impl = {p.implementation: p.config for p in sw.points}
    assert by_impl["naive-serial"]["algorithm"] == by_impl["example-parallel"]["algorithm"] == "per_example"
    assert by_impl["hybrid"]["algorithm"] == "batched" and by_impl["gpu"]["backend"] == "cupy"
    p = sw.points[0]
    assert p.config["parallel"]["ranks"] == p.ranks and p.config["parallel"]["threads_per_rank"] == p.threads
    assert p.config["train"]["warmup_epochs"] == 1  # the default warm-up, passed to the run
    assert p.network == "[784, 16, 10]"  # no short name for this layer list


def test_networks_where_exclude_and_per_implementation_settings(tmp_path):
    sw = sweep.expand(write(
        tmp_path, base="configs/mnist_net1h.yaml",
        axes={"implementation": ["blas-serial", "naive-serial", "hybrid"], "network": ["net1h", "net2h", [784, 32, 10]],
              "batch_size": [128, 1024], "ranks": [1, 2]},
        where=[{"network": ["net1h", [784, 32, 10]]}],
        exclude=[{"implementation": "naive-serial", "batch_size": 1024}],
        implementation_set={"naive-serial": {"data.n_train": 3000}}))
    assert {p.network for p in sw.points} == {"net1h", "[784, 32, 10]"}
    assert not [p for p in sw.points if p.implementation == "naive-serial" and p.batch_size == 1024]
    assert len(sw.points) == 2 * (2 + 1 + 2)  # networks x (blas-serial, naive-serial, hybrid batches)
    assert all(p.config["data"]["n_train"] == (3000 if p.implementation == "naive-serial" else None) for p in sw.points)
    assert sw.points[0].config["model"]["layers"] == [784, 1024, 10] and sw.base_path == ROOT / "configs/mnist_net1h.yaml"


def test_weak_scaling_multiplies_the_batch_by_the_ranks(tmp_path):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "batch_per_rank": [64],
                                            "ranks": [1, 2, 4]}, set={"data.scale_with_ranks": True}))
    assert [(p.ranks, p.batch_size) for p in sw.points] == [(1, 64), (2, 128), (4, 256)]
    assert all(p.config["data"]["scale_with_ranks"] for p in sw.points)


@pytest.mark.parametrize("spec, message", [
    ({"axis": {}}, "axis: unknown key"),
    ({"axes": {"implementation": ["hybrid"], "rank": [2]}}, "axes.rank: unknown key (did you mean 'ranks'?)"),
    ({"set": {"train.epoch": 3}}, "train.epoch: unknown key (did you mean 'train.epochs'?)"),
    ({"axes": {"implementation": ["hybrid"]}, "where": [{"rank": 2}]}, "unknown axis 'rank'"),
    ({"axes": {"implementation": ["quantum"]}}, "axes.implementation.0"),
    ({"set": {"parallel.ranks": 4}}, "set sets parallel.ranks, which the sweep controls"),
])
def test_a_bad_sweep_file_is_an_error_naming_the_key_and_the_file(tmp_path, spec, message):
    spec = {"axes": {"implementation": ["blas-serial"]}, **spec}
    path = write(tmp_path, **spec)
    with pytest.raises(ConfigError) as err:
        sweep.expand(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_axes_that_produce_no_points_are_an_error(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-threaded", "hybrid"], "threads_per_rank": [1], "ranks": [1]})
    with pytest.raises(ConfigError, match="produce no points"):
        sweep.expand(path)
    p = sweep_cli(path)
    assert p.returncode == 2 and "produce no points" in p.stderr and "Traceback" not in p.stderr


def test_what_cannot_run_here_is_skipped_with_a_reason_but_keeps_its_index(tmp_path):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["hybrid"], "ranks": [2, 4], "threads_per_rank": [1, 2]}))
    reasons = {(p.ranks, p.threads): sweep.skip_reason(p, sw.spec, cores=4) for p in sw.points}
    assert reasons[(2, 1)] is None and reasons[(2, 2)] is None and reasons[(4, 1)] is None
    assert "needs 8 cores" in reasons[(4, 2)] and "oversubscribe: true" in reasons[(4, 2)]
    all_cores = sw.spec.model_copy(update={"use_all_cores": True})
    assert [p.ranks * p.threads for p in sw.points if sweep.skip_reason(p, all_cores, cores=4) is None] == [4, 4]


def test_launchers_and_their_overrides(monkeypatch):
    monkeypatch.delenv("PBP_MPIEXEC", raising=False)
    monkeypatch.delenv("PBP_SRUN", raising=False)
    monkeypatch.setenv("PBP_SRUN_MPI", "pmix")
    assert sweep.launcher_prefix("mpiexec", 3, 2)[-2:] == ["-n", "3"]
    assert sweep.launcher_prefix("srun", 3, 2) == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--cpus-per-task=2", "-n", "3"]
    monkeypatch.setenv("PBP_MPIEXEC", "mpirun --bind-to none -np {ranks}")
    assert sweep.launcher_prefix("mpiexec", 3, 2) == ["mpirun", "--bind-to", "none", "-np", "3"]


# ---------------------------------------------------------------------------------------------
# The command line without running points


def test_list_shows_every_point_and_what_is_recorded(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2, 8], "batch_size": [16, 32]},
                 repetitions=2, cores=4)
    res = tmp_path / "r.h5"
    results.append_run(res, {"sweep": "demo", "point": 1, "repetition": 1, "status": "failed", "implementation": "blas-serial",
                             "error": "boom"})
    p = sweep_cli(path, "--list", "--results", res)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].split()[:8] == ["point", "rep", "implementation", "network", "dtype", "batch", "ranks", "threads"]
    rows = [l.split() for l in lines[1:-1]]
    assert len(rows) == 6 * 2  # 6 points (blas-serial x 2 batches, hybrid x 2 ranks x 2 batches), 2 repetitions each
    assert [r[:3] for r in rows[:2]] == [["0", "0", "blas-serial"], ["0", "1", "blas-serial"]]
    assert "recorded (failed)" in lines[4]  # point 1, repetition 1
    assert sum("skip: needs 8 cores (8 ranks x 1 threads), 4 available" in l for l in lines) == 4
    assert "6 points x 2 repetition(s); Slurm array 0-5" in lines[-1]


def test_dry_run_prints_the_commands_with_one_thread_count_everywhere(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-threaded"], "threads_per_rank": [2]})
    p = sweep_cli(path, "--dry-run", "--results", tmp_path / "r.h5", "--point", "0")
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.strip().splitlines()[-1]
    assert "OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2" in cmd
    assert "-n 1" in cmd and "-m pbp_hpc.train" in cmd and "--json" in cmd
    assert "parallel.threads_per_rank=2" in cmd and "parallel.ranks=1" in cmd
    assert not (tmp_path / "r.h5").exists()


def test_slurm_dry_run_prints_the_array_and_the_merge_after_it(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 4], "batch_size": [16, 32]})
    p = sweep_cli(path, "--slurm", "--dry-run", "--results-dir", tmp_path / "out", "--sbatch-arg=--time=00:10:00")
    assert p.returncode == 0, p.stderr
    array, merge = p.stdout.strip().splitlines()
    assert "--array=0-3 --ntasks=4 --cpus-per-task=1 --time=00:10:00" in array and array.endswith("slurm/sweep.sh")
    assert f"PBP_JOBFILE={path}" in array and f"PBP_RESULTS_DIR={tmp_path / 'out'}" in array
    assert "--dependency=afterany:" in merge and merge.endswith("slurm/merge.sh")


# ---------------------------------------------------------------------------------------------
# Running points for real (mpiexec, synthetic data, tiny network)


def test_a_sweep_records_every_point_once_and_a_rerun_skips_them(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "batch_size": [16, 64], "ranks": [1, 2]})
    res = tmp_path / "r.h5"
    p = sweep_cli(path, "--results", res)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = results.read_runs(res)
    assert [r["key"] for r in runs] == [f"demo.p{i:04d}.r0" for i in range(4)]
    assert all(r["status"] == "ok" and r["error"] == "" for r in runs)
    assert [(r["implementation"], r["batch_size"], r["ranks"]) for r in runs] == [
        ("blas-serial", 16, 1), ("blas-serial", 64, 1), ("hybrid", 16, 2), ("hybrid", 64, 2)]
    for r in runs:
        assert len(r["epochs"]) == 2 and r["warmup_epochs"] == 1 and r["threads_per_rank"] == 1
        assert r["config"]["train"]["batch_size"] == r["batch_size"] and r["test_accuracy"] is not None
        assert r["provenance"]["mpi_library"] and r["mpi_library"]
    assert "4 ok" in p.stdout
    before = res.read_bytes()
    again = sweep_cli(path, "--results", res)
    assert again.returncode == 0 and "0 ok" in again.stdout and "4 already recorded" in again.stdout
    assert res.read_bytes() == before
    assert not list(tmp_path.glob(".r.h5.checkpoints/*"))  # per-point checkpoints are removed once recorded


def test_a_failing_point_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path):
    path = write(tmp_path, axes={"implementation": ["hybrid", "blas-threaded", "blas-serial"], "ranks": [1, 2],
                                 "threads_per_rank": [1, 2]},
                 implementation_set={"hybrid": {"debug.fail_step": 0},
                                     "blas-threaded": {"debug.fail_step": 0, "debug.fail_kind": "nan"}},
                 where=[{"threads_per_rank": 1}, {"implementation": "blas-threaded"}])
    res = tmp_path / "r.h5"
    p = sweep_cli(path, "--results", res)
    assert p.returncode == 1, p.stdout + p.stderr
    runs = {r["implementation"]: r for r in results.read_runs(res)}
    assert runs["hybrid"]["status"] == "failed" and "injected fault" in runs["hybrid"]["error"]
    assert runs["hybrid"]["epochs"] == [] and runs["hybrid"]["config"]["debug"]["fail_step"] == 0
    assert runs["blas-threaded"]["status"] == "diverged" and "diverged" in runs["blas-threaded"]["error"]
    assert runs["blas-serial"]["status"] == "ok"  # the point after the failures still ran
    assert "1 ok, 1 diverged, 1 failed" in p.stdout
    again = sweep_cli(path, "--results", res, "--retry-failed", "--point", "0")
    assert again.returncode == 1 and "1 failed" in again.stdout  # failed again, and replaced, not added
    assert sorted(results.statuses(res).values()) == ["diverged", "failed", "ok"]


def test_a_point_past_its_timeout_is_killed_and_recorded(tmp_path):
    # thousands of epochs: the point cannot finish inside its timeout however fast the machine is
    path = write(tmp_path, axes={"implementation": ["hybrid"], "ranks": [2]}, timeout_s=0.5,
                 set={"train.epochs": 100000})
    res = tmp_path / "r.h5"
    p = sweep_cli(path, "--results", res)
    assert p.returncode == 1
    [run] = results.read_runs(res)
    assert run["status"] == "timeout" and "timed out after 0.5 s" in run["error"]


def test_a_sweep_killed_midway_completes_on_rerun_with_every_point_once(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [8, 16, 32, 64]})
    res = tmp_path / "r.h5"
    cmd = [sys.executable, "-m", "pbp_hpc.sweep", str(path), "--results", str(res)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(results.statuses(res) if res.exists() else {}) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-point or mid-append, whichever comes
    proc.wait()
    done_before = set(results.statuses(res))
    assert 1 <= len(done_before) < 4
    p = sweep_cli(path, "--results", res)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{len(done_before)} already recorded" in p.stdout
    runs = results.read_runs(res)
    assert [r["point"] for r in runs] == [0, 1, 2, 3] and all(r["status"] == "ok" for r in runs)


def test_sigusr1_checkpoints_the_running_point_and_the_next_run_resumes_it(tmp_path):
    """What slurm/sweep.sh relies on: SIGUSR1 -> the point checkpoints, nothing is recorded, exit 0 (requeue)."""
    base = {**TINY_BASE, "data": {"name": "synthetic", "n_train": 1800, "n_test": 40}}
    path = write(tmp_path, base=base, axes={"implementation": ["hybrid"], "ranks": [2], "batch_size": [2]})
    res = tmp_path / "r.h5"
    proc = subprocess.Popen([sys.executable, "-m", "pbp_hpc.sweep", str(path), "--results", str(res)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "r.logs" / "demo.p0000.r0.log"  # the run's stderr
    deadline = time.monotonic() + 60
    while "2 rank(s) x 1 thread(s)" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)  # train logs that line once its signal handlers are in place and training starts
    proc.send_signal(signal.SIGUSR1)  # 750 steps per epoch: the run is still in its first epoch
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "interrupted by signal 10" in out and not results.statuses(res)
    assert (tmp_path / ".r.h5.checkpoints" / "demo.p0000.r0.h5").exists()
    again = sweep_cli(path, "--results", res)
    assert again.returncode == 0, again.stdout + again.stderr
    [run] = results.read_runs(res)
    assert run["status"] == "ok" and len(run["epochs"]) == 2
    assert run["epochs"][0]["partial"]  # resumed mid-epoch from the checkpoint
    assert not (tmp_path / ".r.h5.checkpoints").exists()
    assert log.read_text().count("-m pbp_hpc.train") == 2  # one log, both attempts
