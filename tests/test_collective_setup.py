"""search_lr and framework under `mpiexec`: a bad setup on any rank ends every rank, exit 2, one message.

pbp_hpc.train makes its setup collective (train.together); its two sibling commands must too.
Ranks can be started with different arguments (MPMD: `mpiexec -n 1 A : -n 1 B`) or see
different files (the same relative --config in two working directories, as on two nodes):
a rank that alone fails used to exit and leave the others waiting forever in a collective.
Every job here is bounded; a hang fails the test instead of the suite. None needs torch:
the framework runner refuses before it imports it.
"""

from __future__ import annotations

import sys

import pytest

from helpers import MPIEXEC

HANG_BOUND = 30  # seconds; a passing job takes about one (interpreter start-up and MPI_Init)
COMMON = ["--set", "data.name=synthetic", "--set", "data.n_train=120", "--set", "data.n_test=12",
          "--set", "model.layers=[784, 8, 10]", "--set", "train.epochs=1", "--set", "train.progress=false",
          "--set", "parallel.threads_per_rank=1"]
EXTRA = {"pbp_hpc.search_lr": ["--grid", "0.1"], "pbp_hpc.framework": ["--quiet"]}
MODULES = list(EXTRA)
MISSPELT = ["--set", "train.learning_rat=1"]
MISSPELT_MESSAGE = "train.learning_rat: unknown key (did you mean 'train.learning_rate'?)"


def cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *COMMON, *EXTRA[module], *args]


def mpmd(module: str, first: list[str], second: list[str]) -> list[str]:
    """A 2-rank job whose ranks were started with different arguments."""
    return [MPIEXEC, "-n", "1", *cmd(module, *first), ":", "-n", "1", *cmd(module, *second)]


def finish(job) -> tuple[int, str, str]:
    rc, out, err, seconds = job.finish(HANG_BOUND)
    assert rc is not None, f"the job hung (killed after {HANG_BOUND} s); stderr:\n{err}"
    assert seconds < HANG_BOUND
    return rc, out, err


def assert_one_clean_error(rc: int, out: str, err: str, message: str) -> None:
    assert rc == 2, (rc, err)
    assert err.count(message) == 1, err  # printed once, by rank 0, not by every rank
    assert err.count("pbp_hpc: error: ") == 1 and err.startswith("pbp_hpc: error: "), err
    assert "Traceback" not in err and "failed:" not in err, err  # collective: no abort, no traceback
    assert "lr " not in out and "epoch" not in out, out  # nothing ran


@pytest.mark.parametrize("module", MODULES)
def test_a_misspelt_key_on_one_rank_only_ends_every_rank(mpi_job, module):
    rc, out, err = finish(mpi_job(mpmd(module, [], MISSPELT)))
    assert_one_clean_error(rc, out, err, MISSPELT_MESSAGE)
    assert "on rank 1 only: invalid configuration" in err


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("without", [0, 1], ids=["rank 0 lacks it", "rank 1 lacks it"])
def test_a_config_file_that_one_rank_cannot_see_ends_every_rank(tmp_path, mpi_job, module, without):
    # The same arguments on both ranks, resolved in two working directories (as on two nodes
    # whose file systems differ): only one of them holds run.yaml.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / f"node{1 - without}" / "run.yaml").write_text("train:\n  batch_size: 20\n")
    job = [MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "node0"), *cmd(module, "--config", "run.yaml"),
           ":", "-n", "1", "-wdir", str(tmp_path / "node1"), *cmd(module, "--config", "run.yaml")]
    rc, out, err = finish(mpi_job(job))
    assert_one_clean_error(rc, out, err, f"on rank {without} only: config file not found: run.yaml")


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_bad_set_on_every_rank_is_one_message_and_exit_2(mpi_job, module, ranks):
    rc, out, err = finish(mpi_job([MPIEXEC, "-n", str(ranks), *cmd(module, *MISSPELT)]))
    assert_one_clean_error(rc, out, err, MISSPELT_MESSAGE)
    assert "only:" not in err  # every rank failed: no rank is singled out


# --- search_lr: the grid is part of the setup ----------------------------------------------------

def test_a_bad_grid_on_one_rank_only_ends_every_rank(mpi_job):
    rc, out, err = finish(mpi_job(mpmd("pbp_hpc.search_lr", [], ["--grid", "-1"])))
    assert_one_clean_error(rc, out, err, "on rank 1 only: --grid rates must be positive, got [-1.0]")


def test_ranks_given_different_grids_fail_before_training(mpi_job):
    # Both grids are valid: alone, the rank with fewer rates would finish and leave the other waiting.
    rc, out, err = finish(mpi_job(mpmd("pbp_hpc.search_lr", [], ["--grid", "0.1", "0.5"])))
    assert_one_clean_error(rc, out, err, "ranks [1] were given a different --grid from rank 0 ([0.1])")


# --- framework: one process only ---------------------------------------------------------------

def test_framework_under_several_ranks_is_refused_on_every_rank_with_one_message(mpi_job):
    rc, out, err = finish(mpi_job([MPIEXEC, "-n", "2", *cmd("pbp_hpc.framework", "--json")]))
    assert_one_clean_error(rc, out, err, "started as one of 2 MPI processes, but pbp_hpc.framework is single-process")
    assert out == ""  # --json: no result object for a refused run


def test_framework_refuses_parallel_ranks_above_one_with_exit_2(mpi_job):
    rc, out, err = finish(mpi_job([MPIEXEC, "-n", "1", *cmd("pbp_hpc.framework", "--set", "parallel.ranks=2")]))
    assert_one_clean_error(rc, out, err, "parallel.ranks=2, but pbp_hpc.framework runs PyTorch in a single process")


def test_a_subclass_of_a_setup_error_fails_every_rank_as_its_base_class():
    from mpi4py import MPI

    from pbp_hpc.errors import ConfigError
    from pbp_hpc.parallel import runtime

    class TorchMissing(ConfigError):
        pass

    def step():
        raise TorchMissing("torch is not installed")

    with pytest.raises(ConfigError, match="torch is not installed") as info:
        runtime.together(MPI.COMM_SELF, step)
    assert info.value.on_all_ranks
