"""Shared fixtures. Other test modules' authors add theirs here too: add, don't remove."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under `mpiexec -n P pytest --with-mpi`: a failure or a timeout on any rank ends every rank, and
# only rank 0 prints the report (see tests/mpi_harness.py; serial runs are left as they are).
pytest_plugins = ["mpi_harness"]

# The jobs the tests launch use OFI: the MPICH wheel's default UCX netmod now and then fails
# MPI_Init when several jobs start at once (pmodels/mpich#7417). See the Makefile.
os.environ.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")

# Every test runs under pytest-timeout's `timeout` (pyproject.toml: 300 s, more than 10x the slowest
# test measured). A `slurm` test may also pay for the session's test bed: `testbed.sh start` (its own
# limit: 900 s, apt-get included on a fresh machine) in the first, `stop` (300 s) in the last, plus
# its own waits (up to ~400 s), so these get SLURM_TIMEOUT unless they carry their own timeout mark.
SLURM_TIMEOUT = 1800


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slurm") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLURM_TIMEOUT))

_MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _has_mnist(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _MNIST_NAMES)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: shared/data/mnist beside the repository, else $PBP_HPC_TEST_DATA."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"]
    if os.environ.get("PBP_HPC_TEST_DATA"):
        candidates.append(Path(os.environ["PBP_HPC_TEST_DATA"]))
    for directory in candidates:
        if _has_mnist(directory):
            return directory
    pytest.skip(f"real MNIST not found in {' or '.join(map(str, candidates))}; set PBP_HPC_TEST_DATA")


class MpiJob:
    """A `mpiexec ...` started in the background, its output in files (no pipe can fill and block it)."""

    def __init__(self, cmd: list[str], workdir: Path, env: dict[str, str] | None = None):
        import subprocess
        import time

        self.out_path, self.err_path = workdir / "job.out", workdir / "job.err"
        self.started = time.monotonic()
        full_env = {**os.environ, **(env or {})}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=workdir, env=full_env, text=True)
        self.seen: dict[int, object] = {}  # every descendant ever listed, killed at teardown

    def descendants(self) -> list:
        import psutil

        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        self.seen.update({p.pid: p for p in found})
        return found

    def ranks(self) -> list:
        """The training processes (Hydra starts them under its proxy), by rank order of their pids."""
        return sorted((p for p in self.descendants() if "pbp_hpc.train" in " ".join(p.cmdline())), key=lambda p: p.pid)

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether `text` appeared in stdout or stderr within timeout seconds (False if the job ended first)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.out_path.read_text() + self.err_path.read_text():
                return True
            if self.proc.poll() is not None:
                return text in self.out_path.read_text() + self.err_path.read_text()
            time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> tuple[int | None, str, str, float]:
        """(exit code, stdout, stderr, seconds since start); exit code None if it ran past timeout (then killed)."""
        import subprocess
        import time

        try:
            rc: int | None = self.proc.wait(timeout=max(0.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        return rc, self.out_path.read_text(), self.err_path.read_text(), time.monotonic() - self.started

    def kill(self) -> None:
        """Kill mpiexec and every process it started, each by its pid."""
        import psutil

        self.descendants()
        for p in [*self.seen.values(), psutil.Process(self.proc.pid) if self.proc.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        self.proc.wait()


@pytest.fixture
def mpi_job(tmp_path):
    """start(cmd, env=None) -> MpiJob, run in its own folder under tmp_path; all are killed at teardown."""
    jobs: list[MpiJob] = []

    def start(cmd: list[str], env: dict[str, str] | None = None) -> MpiJob:
        workdir = tmp_path / f"job{len(jobs)}"
        workdir.mkdir()
        jobs.append(MpiJob(cmd, workdir, env))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()
