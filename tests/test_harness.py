"""The test harness itself (tests/mpi_harness.py, pytest-timeout): an MPI test run never hangs.

Each test writes a throwaway test file into its tmp_path and runs it as `make test` runs the MPI
tests, `mpiexec -n 2 python -m pytest --with-mpi`, loading the harness with `-p mpi_harness`.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import MPIEXEC

TESTS = Path(__file__).resolve().parent

# Rank 1 fails an assertion; rank 0 never learns of it and waits in a collective for rank 1. Each rank
# leaves a file behind just before, so a caller knows both got there.
ONE_RANK_FAILS = '''
from pathlib import Path

import pytest
from mpi4py import MPI


@pytest.mark.mpi
def test_rank_1_fails_while_rank_0_waits_in_a_barrier():
    comm = MPI.COMM_WORLD
    Path(f"reached.{comm.rank}").touch()
    print(f"rank {comm.rank} was here")
    if comm.rank == 1:
        assert comm.rank == 0, "rank 1 fails on purpose"
    comm.Barrier()


@pytest.mark.mpi
def test_after():
    MPI.COMM_WORLD.Barrier()
'''

# Rank 1 sleeps far past the --timeout while rank 0 is blocked inside MPI (where no signal reaches it).
ONE_RANK_SLEEPS = '''
import time
from pathlib import Path

import pytest
from mpi4py import MPI


@pytest.mark.mpi
def test_rank_1_sleeps_while_rank_0_waits_in_a_barrier():
    comm = MPI.COMM_WORLD
    Path(f"reached.{comm.rank}").touch()
    if comm.rank == 1:
        time.sleep(1000)
    comm.Barrier()
'''

PASSING = '''
import pytest
from mpi4py import MPI


@pytest.mark.mpi
@pytest.mark.parametrize("n", range(3))
def test_allreduce(n):
    assert MPI.COMM_WORLD.allreduce(n) == n * MPI.COMM_WORLD.size


@pytest.mark.mpi
def test_skipped():
    pytest.skip("the reason for this skip")
'''


def run_throwaway(mpi_job, tmp_path: Path, source: str, *args: str, harness: bool = True):
    """Start `mpiexec -n 2 python -m pytest` on `source`, in tmp_path (with a pytest.ini of its own,
    so no configuration from above applies), with the harness plugin unless harness=False."""
    (tmp_path / "test_throwaway.py").write_text(textwrap.dedent(source))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    plugin = ["-p", "mpi_harness"] if harness else []
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "--with-mpi", *plugin, *args, str(tmp_path / "test_throwaway.py")]
    return mpi_job(cmd, env={"PYTHONPATH": str(TESTS)})


def wait_for_files(directory: Path, names: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((directory / name).exists() for name in names):
            return True
        time.sleep(0.05)
    return False


def test_a_failure_on_one_rank_ends_every_rank_and_is_printed_once_with_its_rank(mpi_job, tmp_path):
    job = run_throwaway(mpi_job, tmp_path, ONE_RANK_FAILS)
    rc, out, err, seconds = job.finish(timeout=60)
    assert rc is not None, f"still running after 60 s:\n{out}\n{err}"
    assert rc != 0, (out, err)
    assert seconds < 60
    assert err.count("[rank 1 of 2] test_throwaway.py::test_rank_1_fails_while_rank_0_waits_in_a_barrier "
                     "FAILED (call)") == 1, err
    assert "AssertionError: rank 1 fails on purpose" in err
    assert "rank 1 was here" in err  # the test's captured output comes with it
    assert "MPI_Abort" in err
    assert "[rank 0 of 2]" not in err  # rank 0 did not fail: it was ended
    # every test after the failure is left out
    assert "test_after" not in out + err


@pytest.mark.parametrize("source, args", [(ONE_RANK_FAILS, ()),
                                          (ONE_RANK_SLEEPS, ("--timeout", "3", "--timeout-method", "signal"))],
                         ids=["one rank fails", "pytest-timeout's default signal method"])
def test_without_the_harness_the_same_runs_hang(mpi_job, tmp_path, source, args):
    """The controls: what the harness prevents (before it, `make test` hung here until CI gave up).
    A rank blocked inside MPI_Barrier never returns to Python, so no signal handler can end it."""
    job = run_throwaway(mpi_job, tmp_path, source, *args, harness=False)
    assert wait_for_files(tmp_path / "job0", ["reached.0", "reached.1"], timeout=60), job.finish(0)
    time.sleep(8)  # with the harness these jobs end at most about 3 s after this point
    assert job.proc.poll() is None, job.finish(0)
    job.kill()


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_a_timeout_on_any_rank_ends_every_rank(mpi_job, tmp_path, method):
    """Whatever pytest-timeout method is asked for: its default, `signal`, cannot interrupt a rank
    blocked inside MPI_Barrier (see the control above), so the harness uses a timer thread."""
    job = run_throwaway(mpi_job, tmp_path, ONE_RANK_SLEEPS, "--timeout", "3", "--timeout-method", method)
    rc, out, err, seconds = job.finish(timeout=60)
    assert rc is not None, f"still running after 60 s:\n{out}\n{err}"
    assert rc != 0, (out, err)
    # the first rank to time out names its test and shows where its thread was
    assert "test_rank_1_sleeps_while_rank_0_waits_in_a_barrier TIMEOUT: still running after 3 s" in err, err
    assert "time.sleep(1000)" in err or "comm.Barrier()" in err, err
    assert "_pytest/runner.py" not in err and "pluggy/" not in err  # only the frames that matter


def test_a_passing_run_prints_its_report_once_with_the_skip_reasons(mpi_job, tmp_path):
    job = run_throwaway(mpi_job, tmp_path, PASSING)
    rc, out, err, seconds = job.finish(timeout=60)
    assert rc == 0, (out, err)
    assert out.count("3 passed, 1 skipped") == 1, out
    assert out.count("SKIPPED [1] ") == 1 and "the reason for this skip" in out, out
    assert "FAILED" not in err and "TIMEOUT" not in err, err


def test_the_suite_has_a_time_limit_and_slurm_tests_a_longer_one(request):
    from conftest import SLURM_TIMEOUT

    timeout = float(request.config.getini("timeout"))
    assert 0 < timeout < SLURM_TIMEOUT
