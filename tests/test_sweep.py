"""Sweeps: which points a sweep file means, and running them for real with mpiexec, through failures and kills."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pbp_hpc.parallel import hybrid
from pbp_hpc.parallel import provenance
from pbp_hpc import results
from pbp_hpc import sweep
from pbp_hpc.errors import ConfigError, ResultsError

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


def test_a_sweeps_points_run_the_grid_they_state_not_one_measured_at_start_up(tmp_path):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["hybrid"], "ranks": [2], "variant": ["data", "tensor"]},
                            variants={"data": {}, "tensor": {"parallel.tensor": 2}}))
    grids = {p.variant: (p.config["parallel"]["grid"], p.config["parallel"]["tensor"]) for p in sw.points}
    assert grids == {"data": ("manual", 1), "tensor": ("manual", 2)}
    auto = sweep.expand(write(tmp_path, name="auto", base={**TINY_BASE, "parallel": {"grid": "auto"}},
                              axes={"implementation": ["hybrid"], "ranks": [2]}))
    assert [p.config["parallel"]["grid"] for p in auto.points] == ["auto"]  # a sweep that names the grid gets it


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
    assert sweep.launcher_prefix("srun", 3, 2, bind=True) == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--cpu-bind=cores",
                                                             "--cpus-per-task=2", "-n", "3"]
    monkeypatch.setenv("PBP_MPIEXEC", "mpirun --bind-to none -np {ranks}")
    assert sweep.launcher_prefix("mpiexec", 3, 2) == ["mpirun", "--bind-to", "none", "-np", "3"]
    assert sweep.launcher_prefix("mpiexec", 3, 2, bind=True) == ["mpirun", "--bind-to", "none", "-np", "3"]  # as written
    monkeypatch.setenv("PBP_SRUN", "srun -n {ranks}")
    assert sweep.launcher_prefix("srun", 3, 2, bind=True) == ["srun", "-n", "3"]


# ---------------------------------------------------------------------------------------------
# hybrid_split: best -- one hybrid point per batch, at the split the benchmark measured

TINY_KEY = "784-16-10"  # TINY_BASE's network, as benchmarks/hybrid_splits.json keys it


def splits_file(tmp_path: Path, cores: int, batches: dict) -> Path:
    """A hybrid_splits.json for TINY_BASE's network: {B: (best ranks, best threads, {"RxT": TPE s})}."""
    doc = {"machines": {f"{cores} cores": {"cores": cores, "networks": {TINY_KEY: {"batches": {
        str(b): {"ranks": r, "threads": t, "tpe_s": tpe} for b, (r, t, tpe) in batches.items()}}}}}}
    path = tmp_path / "hybrid_splits.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def four_core_splits(tmp_path, monkeypatch):
    """Measured on 4 cores: B=64 best 1x4 (2x2 the fastest with 2 ranks), B=256 best 4x1; nothing else."""
    path = splits_file(tmp_path, 4, {64: (1, 4, {"1x4": 1.0, "2x2": 1.2, "4x1": 1.5}),
                                     256: (4, 1, {"1x4": 2.0, "2x2": 1.8, "4x1": 1.5})})
    monkeypatch.setenv("PBP_HPC_HYBRID_SPLITS", str(path))
    return path


BEST_AXES = {"implementation": ["blas-serial", "hybrid", "blas-threaded"], "batch_size": [64, 256, 4096],
             "ranks": [1, 2, 4], "threads_per_rank": [1, 2, 4]}


def test_best_gives_hybrid_one_point_per_batch_at_the_fastest_measured_split_with_two_ranks(tmp_path, four_core_splits):
    sw = sweep.expand(write(tmp_path, axes=BEST_AXES, hybrid_split="best", cores=4))
    shapes = [(p.index, p.implementation, p.batch_size, p.ranks, p.threads) for p in sw.points]
    assert shapes == [
        (0, "blas-serial", 64, 1, 1), (1, "blas-serial", 256, 1, 1), (2, "blas-serial", 4096, 1, 1),
        (3, "hybrid", 64, 2, 2),      # the best, 1x4, has one rank: the fastest with 2 or more
        (4, "hybrid", 256, 4, 1),     # the best
        (5, "hybrid", 4096, 4, 1),    # not measured (16x from 256): one rank per core
        (6, "blas-threaded", 64, 1, 2), (7, "blas-threaded", 64, 1, 4), (8, "blas-threaded", 256, 1, 2),
        (9, "blas-threaded", 256, 1, 4), (10, "blas-threaded", 4096, 1, 2), (11, "blas-threaded", 4096, 1, 4)]
    by_batch = {p.batch_size: p for p in sw.points if p.implementation == "hybrid"}
    assert by_batch[64].split_origin == f"fastest measured split with at least 2 ranks, {four_core_splits}; 1x4 was faster"
    assert by_batch[256].split_origin == f"best measured split, {four_core_splits}"
    assert by_batch[4096].split_origin.startswith("no measurement of 784-16-10 within 2x of B=4096")
    assert by_batch[64].config["parallel"] == {**by_batch[64].config["parallel"], "ranks": 2, "threads_per_rank": 2}
    assert all(p.split_origin is None for p in sw.points if p.implementation != "hybrid")
    assert sw.split_cores == 4


def test_best_points_are_the_same_points_on_any_machine_only_their_split_differs(tmp_path, four_core_splits):
    four = sweep.expand(write(tmp_path, axes=BEST_AXES, hybrid_split="best", cores=4))
    two = sweep.expand(write(tmp_path, "demo2", axes=BEST_AXES, hybrid_split="best", cores=2))
    ident = lambda sw: [(p.index, p.implementation, p.network, p.dtype, p.batch_size) for p in sw.points]
    assert ident(two) == ident(four)
    assert {(p.ranks, p.threads) for p in two.points if p.implementation == "hybrid"} == {(2, 1)}
    assert all(p.split_origin.endswith("no measurement for 2 cores in " f"{four_core_splits}: one rank per core")
               for p in two.points if p.implementation == "hybrid")
    assert ident(sweep.expand(write(tmp_path, axes=BEST_AXES, hybrid_split="best", cores=4))) == ident(four)  # deterministic


def test_best_plans_for_cores_then_the_slurm_allocation_then_the_detected_cores(tmp_path, four_core_splits, monkeypatch):
    path = write(tmp_path, axes={"implementation": ["hybrid"], "batch_size": [256]}, hybrid_split="best")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    [p] = sweep.expand(path).points
    assert (p.ranks, p.threads) == (4, 1) and sweep.expand(path).split_cores == 4  # the allocation's 4 cores
    [p] = sweep.expand(write(tmp_path, "three", axes={"implementation": ["hybrid"], "batch_size": [256]},
                             hybrid_split="best", cores=3)).points
    assert (p.ranks, p.threads) == (3, 1)  # cores: wins; 3 cores not measured
    monkeypatch.delenv("SLURM_NTASKS")
    assert sweep.expand(path).split_cores == provenance.cores_available()


def test_axes_is_the_default_and_iterates_hybrids_ranks_and_threads(tmp_path, four_core_splits):
    default = sweep.expand(write(tmp_path, axes=BEST_AXES, cores=4))
    explicit = sweep.expand(write(tmp_path, axes=BEST_AXES, cores=4, hybrid_split="axes"))
    shapes = lambda sw: [(p.index, p.implementation, p.batch_size, p.ranks, p.threads) for p in sw.points]
    assert shapes(default) == shapes(explicit)
    assert {(p.ranks, p.threads) for p in default.points if p.implementation == "hybrid"} == {
        (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)}
    assert all(p.split_origin is None for p in default.points) and default.split_cores is None


@pytest.mark.parametrize("extra, message", [
    ({"axes": {"implementation": ["hybrid"], "batch_per_rank": [64]}}, "cannot be combined with axes.batch_per_rank"),
    ({"where": [{"threads_per_rank": 1}]}, "where: rule {'threads_per_rank': 1} names threads_per_rank"),
    ({"exclude": [{"implementation": ["hybrid", "gpu"], "ranks": 2}]}, "exclude: rule"),
    ({"hybrid_split": "fastest"}, "hybrid_split: Input should be 'axes' or 'best'"),
])
def test_what_best_cannot_mean_is_an_error(tmp_path, extra, message):
    spec = {"axes": {"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2]}, "hybrid_split": "best", **extra}
    with pytest.raises(ConfigError, match=message.replace("{", "\\{").replace("}", "\\}").replace("(", "\\(")):
        sweep.expand(write(tmp_path, **spec))


def test_best_allows_rules_on_ranks_that_leave_hybrid_alone(tmp_path, four_core_splits):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["example-parallel", "hybrid"], "ranks": [2, 4]},
                            exclude=[{"implementation": "example-parallel", "ranks": 4}], hybrid_split="best", cores=4))
    assert [(p.implementation, p.ranks) for p in sw.points] == [("example-parallel", 2), ("hybrid", 4)]


def test_best_with_slurm_needs_cores(tmp_path, four_core_splits):
    path = write(tmp_path, axes={"implementation": ["hybrid"]}, hybrid_split="best")
    with pytest.raises(ConfigError, match="needs `cores:`"):
        sweep.slurm_commands(sweep.expand(path), tmp_path / "out", [], "1")
    array, _, _ = sweep.slurm_commands(sweep.expand(write(tmp_path, axes={"implementation": ["hybrid"], "batch_size": [256]},
                                                          hybrid_split="best", cores=4)), tmp_path / "out", [], "1")
    assert "--ntasks=4" in array and "--cpus-per-task=1" in array


# ---------------------------------------------------------------------------------------------
# Binding: each rank on its own cores, unless oversubscribed or the launcher is the user's


def _commands(tmp_path, launcher="mpiexec"):
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["blas-threaded", "hybrid"], "ranks": [1, 2, 4],
                                            "threads_per_rank": [1, 2]}, cores=4, oversubscribe=True))
    return {(p.implementation, p.ranks, p.threads): sweep.command(sw, p, launcher, None, None) for p in sw.points}


def test_mpich_binds_each_rank_to_its_own_cores_unless_oversubscribed(tmp_path, monkeypatch):
    monkeypatch.delenv("PBP_MPIEXEC", raising=False)
    monkeypatch.setattr(hybrid, "mpi_flavour", lambda exe: hybrid.MPICH)
    cmds = _commands(tmp_path)
    assert cmds[("hybrid", 2, 1)][1:5] == ["-n", "2", "-bind-to", "core:1"]
    assert cmds[("hybrid", 2, 2)][1:5] == ["-n", "2", "-bind-to", "core:2"]
    assert cmds[("blas-threaded", 1, 2)][1:5] == ["-n", "1", "-bind-to", "core:2"]
    assert cmds[("hybrid", 4, 1)][1:5] == ["-n", "4", "-bind-to", "core:1"]  # 4 = the 4 cores: fits
    over = cmds[("hybrid", 4, 2)]  # 8 > 4 cores: not bound (bound, ranks 0 and 2 would share cores)
    assert over[1:3] == ["-n", "4"] and not any("bind" in w for w in over)


def test_open_mpi_binds_with_its_own_flags_and_an_unknown_mpiexec_gets_none(tmp_path, monkeypatch):
    monkeypatch.delenv("PBP_MPIEXEC", raising=False)
    monkeypatch.setattr(hybrid, "mpi_flavour", lambda exe: hybrid.OPENMPI)
    assert _commands(tmp_path)[("hybrid", 2, 2)][1:7] == ["-n", "2", "--bind-to", "core", "--map-by", "slot:PE=2"]
    monkeypatch.setattr(hybrid, "mpi_flavour", lambda exe: None)
    cmd = _commands(tmp_path)[("hybrid", 2, 2)]
    assert cmd[1:3] == ["-n", "2"] and not any("bind" in w for w in cmd)


def test_a_launcher_from_the_environment_is_used_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PBP_MPIEXEC", "mpiexec --oversubscribe")
    cmd = _commands(tmp_path)[("hybrid", 2, 1)]
    assert cmd[:4] == ["mpiexec", "--oversubscribe", "-n", "2"] and not any("bind" in w for w in cmd)


def test_srun_binds_to_cores_unless_oversubscribed(tmp_path, monkeypatch):
    monkeypatch.delenv("PBP_SRUN", raising=False)
    cmds = _commands(tmp_path, launcher="srun")
    assert "--cpu-bind=cores" in cmds[("hybrid", 2, 2)] and "--cpus-per-task=2" in cmds[("hybrid", 2, 2)]
    assert "--cpu-bind=cores" not in cmds[("hybrid", 4, 2)]


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


def test_list_and_dry_run_say_where_each_hybrid_split_came_from(tmp_path, four_core_splits):
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "batch_size": [256, 4096]},
                 hybrid_split="best", cores=4)
    env = {"PBP_HPC_HYBRID_SPLITS": str(four_core_splits)}
    p = sweep_cli(path, "--list", "--results", tmp_path / "r.h5", env=env)
    assert p.returncode == 0, p.stderr
    hyb = {l.split()[7]: l for l in p.stdout.splitlines() if " hybrid " in l}  # batch -> row ("[784, 16, 10]" is 3 words)
    assert hyb["256"].endswith(f"split 4x1 (best measured split, {four_core_splits})")
    assert "split 4x1 (no measurement of 784-16-10 within 2x of B=4096" in hyb["4096"]
    assert "hybrid_split: best -- each hybrid point at the fastest measured split of 4 cores" in p.stdout
    d = sweep_cli(path, "--dry-run", "--results", tmp_path / "r.h5", "--point", "2", env=env)
    assert d.returncode == 0, d.stderr
    assert f"# demo.p0002.r0: hybrid split 4x1 (best measured split, {four_core_splits})" in d.stdout


def test_slurm_dry_run_prints_the_array_and_the_merge_after_it(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 4], "batch_size": [16, 32]})
    p = sweep_cli(path, "--slurm", "--dry-run", "--results-dir", tmp_path / "out", "--sbatch-arg=--time=00:10:00")
    assert p.returncode == 0, p.stderr
    array, merge = p.stdout.strip().splitlines()
    assert "--array=0-3 --ntasks=4 --cpus-per-task=1 --time=00:10:00" in array and array.endswith("slurm/sweep.sh")
    assert f"PBP_JOBFILE={path}" in array and f"PBP_RESULTS_DIR={tmp_path / 'out'}" in array
    assert "--dependency=afterany:" in merge and merge.endswith("slurm/merge.sh")
    logs = re.search(r"--output=(\S+)/%x-%A_%a.out", array).group(1)  # beside the results, not the submit dir
    assert Path(logs).parent == (tmp_path / "out" / "logs").resolve() and f"--output={logs}/%x-%j.out" in merge
    assert f"PBP_LOG_DIR={logs}" in merge


def test_each_slurm_submission_gets_its_own_log_folder(tmp_path):
    """Job IDs can repeat (a restarted test bed): logs of two submissions must not share a file."""
    first = sweep.log_dir_for(tmp_path, now=0)
    first.mkdir(parents=True)
    second = sweep.log_dir_for(tmp_path, now=0)  # same second
    assert first.parent == second.parent == tmp_path / "logs" and first != second
    assert second.name == first.name + "-2"


def test_the_files_and_job_files_the_slurm_docs_name_exist():
    """The Slurm templates' headers and the README show commands to copy: every jobs/, configs/ or slurm/
    file they name is there (docs/ has made-up examples: jobs/X.yaml)."""
    root = Path(__file__).resolve().parents[1]
    texts = [*root.glob("slurm/*.sh"), root / "README.md"]
    named = {(t.name, m) for t in texts for m in re.findall(r"\b((?:jobs|configs|slurm)/[\w.-]+\.(?:yaml|sh))\b", t.read_text())}
    missing = sorted((where, f) for where, f in named if not (root / f).is_file() and "<" not in f)
    assert named and not missing, missing


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


@pytest.mark.skipif(provenance.cores_available() < 2, reason="binding 2 ranks to their own cores needs 2 cores")
def test_best_runs_hybrid_at_the_measured_split_with_each_rank_bound_to_its_own_core(tmp_path):
    """The real mpiexec (the venv's MPICH): 1x2 was measured fastest, hybrid needs 2 ranks -> 2x1, -bind-to core:1."""
    splits = splits_file(tmp_path, 2, {64: (1, 2, {"1x2": 0.5, "2x1": 0.6})})
    path = write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "batch_size": [64]}, hybrid_split="best",
                 cores=2)
    res = tmp_path / "r.h5"
    p = sweep_cli(path, "--results", res, env={"PBP_HPC_HYBRID_SPLITS": str(splits), "PBP_MPIEXEC": ""})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "hybrid [784, 16, 10] float32 B=64 2x1 (fastest measured split with at least 2 ranks" in p.stdout
    runs = {r["implementation"]: r for r in results.read_runs(res)}
    hyb = runs["hybrid"]
    assert hyb["status"] == "ok" and (hyb["ranks"], hyb["threads_per_rank"]) == (2, 1), hyb["error"]
    log = (tmp_path / "r.logs" / f"{hyb['key']}.log").read_text()
    if hybrid.mpi_flavour(sweep.default_mpiexec()) == hybrid.MPICH:
        assert "-n 2 -bind-to core:1 " in log.splitlines()[0]
        assert hyb["provenance"]["cores"] == 1  # rank 0 saw one core: it was bound
        assert runs["blas-serial"]["provenance"]["cores"] == 1
    assert "pbp_hpc: 2 rank(s) x 1 thread(s)" in log


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
    while "pbp_hpc: layers" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)  # train logs that line inside its training loop, where a stop signal checkpoints
    proc.send_signal(signal.SIGUSR1)  # 750 steps per epoch: the run is still in its first epoch
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "interrupted by signal 10" in out and not results.statuses(res)
    assert (tmp_path / ".r.h5.checkpoints" / "demo.p0000.r0.h5").exists()
    # what a rank killed (SIGKILL) while writing an earlier checkpoint leaves behind: removed with the checkpoint
    (tmp_path / ".r.h5.checkpoints" / "demo.p0000.r0.h5.x1y2z3.tmp").write_bytes(b"\x89HDF partial")
    again = sweep_cli(path, "--results", res)
    assert again.returncode == 0, again.stdout + again.stderr
    [run] = results.read_runs(res)
    assert run["status"] == "ok" and len(run["epochs"]) == 2
    assert run["epochs"][0]["partial"]  # resumed mid-epoch from the checkpoint
    assert not (tmp_path / ".r.h5.checkpoints").exists()
    assert log.read_text().count("-m pbp_hpc.train") == 2  # one log, both attempts


# ---------------------------------------------------------------------------------------------
# A recorded run is only skipped (or retried) as its point's if it was that point


def test_a_rerun_after_point_0_changed_refuses_to_run_and_leaves_the_results_file_alone(tmp_path):
    path = write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [16, 64]})
    res = tmp_path / "r.h5"
    # --data-dir is recorded in the runs' config (data.dir) but says where the data was, not what ran
    p = sweep_cli(path, "--results", res, "--data-dir", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    before = res.read_bytes()
    again = sweep_cli(path, "--results", res)  # unchanged sweep file: every run is its point's
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 ok" in again.stdout and "2 already recorded" in again.stdout and res.read_bytes() == before

    write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [32, 64]})  # point 0 now B=32; point 1 as was
    assert [p.batch_size for p in sweep.expand(path).points] == [32, 64]
    logs = {f.name: f.read_text() for f in (tmp_path / "r.logs").iterdir()}
    for extra in ([], ["--point", "0"], ["--point", "1"], ["--retry-failed"], ["--dry-run"]):
        bad = sweep_cli(path, "--results", res, *extra)
        assert bad.returncode == 2, (extra, bad.stdout + bad.stderr)
        err = bad.stderr
        assert f"results file {res} holds 1 run(s) under keys of sweep 'demo'" in err, err
        assert "demo.p0000.r0: recorded blas-serial [784, 16, 10] float32 B=16 1x1, status ok; point 0 is now " \
               "blas-serial [784, 16, 10] float32 B=32 1x1" in err
        assert "batch_size: recorded 16, the sweep file now gives 32" in err
        assert "Nothing was run" in err and "--results NEW.h5" in err and f"move {res} away" in err
        assert "demo.p0001" not in err and "Traceback" not in err  # point 1 is still its own run
        assert bad.stdout == ""  # nothing ran, nothing was skipped
    assert res.read_bytes() == before
    assert {f.name: f.read_text() for f in (tmp_path / "r.logs").iterdir()} == logs
    assert not (tmp_path / ".r.h5.checkpoints").exists()

    listed = sweep_cli(path, "--list", "--results", res)  # --list still lists, and says which runs are another point's
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[1].endswith("recorded (ok) BY ANOTHER POINT: batch_size: recorded 16, the sweep file now gives 32")
    assert rows[2].endswith("recorded (ok)") and "1 run(s) in" in listed.stdout

    fresh = tmp_path / "new.h5"  # what the message says to do
    ok = sweep_cli(path, "--results", fresh)
    assert ok.returncode == 0 and "2 ok" in ok.stdout, ok.stdout + ok.stderr
    assert [r["batch_size"] for r in results.read_runs(fresh)] == [32, 64] and res.read_bytes() == before


def _record_failed(sw: sweep.Sweep, res: Path) -> None:
    """Record every point of sw as a failed run, as the sweep records a run that failed to start (cheap: nothing runs)."""
    for point in sw.points:
        results.append_run(res, sweep.make_record(sw, point, 0, sweep.Outcome("failed", None, "boom", 0.1)))


def test_what_makes_a_recorded_run_another_point_and_what_does_not(tmp_path):
    res = tmp_path / "r.h5"
    _record_failed(sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2]})), res)
    recorded = results.identities(res)
    assert recorded["demo.p0001.r0"]["implementation"] == "hybrid" and recorded["demo.p0001.r0"]["ranks"] == 2
    assert recorded["demo.p0001.r0"]["config"]["train"]["epochs"] == 2

    def diffs(**spec):
        sw = sweep.expand(write(tmp_path, **{"axes": {"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2]}, **spec}))
        return sweep.mismatches(sw, recorded)

    assert diffs() == {}
    # not the run's identity: where data and checkpoints were, the progress bar, oversubscribe: true, a network's name
    assert diffs(oversubscribe=True, set={"train.progress": True, "checkpoint.every_epochs": 1, "data.download": False}) == {}
    assert diffs(networks={"tiny": [784, 16, 10]}, axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2],
                                                         "network": ["tiny"]}) == {}
    # the run's identity: anything else that changes what is computed
    assert diffs(set={"train.epochs": 3}) == {k: ["train.epochs: recorded 2, the sweep file now gives 3"]
                                              for k in ("demo.p0000.r0", "demo.p0001.r0")}
    assert diffs(axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2], "dtype": ["float64"]})[
        "demo.p0000.r0"] == ['dtype: recorded "float32", the sweep file now gives "float64"']
    assert diffs(axes={"implementation": ["blas-serial", "hybrid"], "ranks": [1, 2], "network": [[784, 8, 10]]})[
        "demo.p0000.r0"] == ["layers: recorded [784, 16, 10], the sweep file now gives [784, 8, 10]"]
    swapped = diffs(axes={"implementation": ["hybrid", "blas-serial"], "ranks": [1, 2]})  # reordered: points swap
    assert swapped["demo.p0000.r0"] == ['implementation: recorded "blas-serial", the sweep file now gives "hybrid"',
                                        "ranks: recorded 1, the sweep file now gives 2"]
    assert diffs(warmup_epochs=0)["demo.p0000.r0"] == ["train.warmup_epochs: recorded 1, the sweep file now gives 0"]
    # a run recorded with less (no config, no batch): only what it has can differ
    bare = tmp_path / "bare.h5"
    results.append_run(bare, {"sweep": "demo", "point": 0, "repetition": 0, "status": "failed",
                              "implementation": "blas-serial", "network": "net1h", "error": "boom"})
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial"]}))
    assert sweep.mismatches(sw, results.identities(bare)) == {
        "demo.p0000.r0": ['network: recorded "net1h", the sweep file now gives "[784, 16, 10]"']}


def test_fewer_points_than_recorded_is_a_note_not_an_error(tmp_path):
    res = tmp_path / "r.h5"
    _record_failed(sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [16, 32, 64]})), res)
    sw = sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [16, 32]}))
    assert set(sweep.check_recorded(sw, res)) == {f"demo.p{i:04d}.r0" for i in range(3)}
    lines = sweep.list_lines(sw, sweep.Options(results=res))
    assert lines[-1].startswith(f"note: {res} also holds 1 run(s) of sweep demo that are no point of")
    assert "(demo.p0002.r0: the sweep file has 2 points x 1 repetition(s)); they stay in the file" in lines[-1]


def test_retry_failed_never_retries_another_points_run(tmp_path):
    res = tmp_path / "r.h5"
    path = write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [16]})
    _record_failed(sweep.expand(path), res)
    before = res.read_bytes()
    write(tmp_path, axes={"implementation": ["blas-serial"], "batch_size": [32]})
    p = sweep_cli(path, "--results", res, "--retry-failed", "--point", "0")
    assert p.returncode == 2 and "batch_size: recorded 16, the sweep file now gives 32" in p.stderr, p.stdout + p.stderr
    assert "status failed" in p.stderr and p.stdout == "" and res.read_bytes() == before


def test_best_says_when_the_recorded_split_was_chosen_for_other_cores(tmp_path, four_core_splits):
    res = tmp_path / "r.h5"
    spec = {"axes": {"implementation": ["hybrid"], "batch_size": [64]}, "hybrid_split": "best"}
    _record_failed(sweep.expand(write(tmp_path, cores=4, **spec)), res)  # 2x2 on 4 cores
    assert sweep.check_recorded(sweep.expand(write(tmp_path, cores=4, **spec)), res)
    two = sweep.expand(write(tmp_path, cores=2, **spec))  # 2x1 on 2 cores
    with pytest.raises(ResultsError) as err:
        sweep.check_recorded(two, res)
    msg = str(err.value)
    assert "threads_per_rank: recorded 2, the sweep file now gives 1" in msg
    assert "(hybrid_split: best chose 2x1 here: " in msg and "the recorded run got its split for other cores" in msg


def test_switching_hybrid_split_to_best_renumbers_points_and_is_caught(tmp_path, four_core_splits):
    res = tmp_path / "r.h5"
    axes = {"implementation": ["hybrid"], "batch_size": [64, 256], "ranks": [2, 4], "threads_per_rank": [1]}
    _record_failed(sweep.expand(write(tmp_path, axes=axes, cores=4)), res)  # 64 2x1, 64 4x1, 256 2x1, 256 4x1
    best = sweep.expand(write(tmp_path, axes=axes, cores=4, hybrid_split="best"))  # 64 at 2x2, 256 at 4x1
    bad = sweep.mismatches(best, results.identities(res))
    assert bad["demo.p0000.r0"][0] == "threads_per_rank: recorded 1, the sweep file now gives 2"
    assert bad["demo.p0000.r0"][1].startswith("(hybrid_split: best chose 2x2 here: fastest measured split")
    assert bad["demo.p0001.r0"] == ["batch_size: recorded 64, the sweep file now gives 256"]
