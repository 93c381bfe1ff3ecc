"""Tests on a real Slurm started by slurm/testbed.sh (Debian's Slurm 22.05, MariaDB + slurmdbd): two nodes,
two slurmd on this host, each with the bed's default CPUs (nproc, at least 8).

The bed needs root and apt-get (or Slurm already installed); elsewhere `testbed.sh start` exits 77 and
every test here is skipped. Set PBP_SLURM_TESTS=0 to skip them on purpose.

The `slurm_cluster` fixture (session scope) starts the bed once, on free ports, in a fresh directory,
and always stops it. It yields a `SlurmCluster`:

    cluster.env                        os.environ + SLURM_CONF, for any subprocess
    cluster.run("sinfo", ...)          run a command against the bed (check=True by default)
    cluster.submit(script, *args, sbatch_args=(), env=None, cwd=None) -> job id (str)
    cluster.wait_for(job_id, timeout=60) -> JobResult(state, exit_code, signal, restarts, stdout, info)
    cluster.wait_for_array(array_id, timeout=60) -> {task id: JobResult}
    cluster.signal_batch(job_id, "USR1")     what `--signal=B:USR1@...` does at the time limit
    cluster.wait_for_text(path, text, timeout=30)
    cluster.sacct(job_id) -> [{"JobID":..., "State":..., "ExitCode":...}, ...]   (cluster.has_slurmdbd)
    cluster.daemon_logs()              tails of the daemons' logs, for failure messages

The job-template tests (slurm/train.sh, slurm/sweep.sh, slurm/merge.sh) run the real templates with
PBP_PYTHON pointing at a stand-in interpreter that replaces `-m pbp_hpc.train|sweep|results|analyze`
with small fakes (FAKE_* below) that behave as the real modules must: check the world size, handle
SIGUSR1 by checkpointing and exiting 0, resume. To run the templates against the real package, submit
them with PBP_PYTHON=sys.executable instead.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TESTBED = SLURM_DIR / "testbed.sh"

TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
}


# --------------------------------------------------------------------------------------------- helpers

def _parse_oneliner(line: str) -> dict[str, str]:
    """One record of `scontrol show job -o`: KEY=VALUE pairs, where values may contain spaces."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", line.strip())}


@dataclass
class JobResult:
    job_id: str
    state: str
    exit_code: int
    signal: int
    restarts: int
    stdout: Optional[Path]
    info: dict = field(repr=False)

    def output(self) -> str:
        if self.stdout is None or not self.stdout.exists():
            return ""
        return self.stdout.read_text(errors="replace")


BED_NODES = 2  # testbed.sh's default; its ports: base .. base + nodes + 2


def _free_port_base(start: int = 16817, span: int = BED_NODES + 3) -> int:
    """First base port >= start with base..base+span-1 all free on 127.0.0.1."""
    for base in range(start, start + 2000, span):
        ok = True
        for port in range(base, base + span):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free TCP ports for the Slurm test bed")


class SlurmCluster:
    def __init__(self, directory: Path, port: int, cpus: int):
        self.dir = directory
        self.port = port
        self.cpus = cpus
        self.conf = directory / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def has_slurmdbd(self) -> bool:
        """True when `sacct` works (PBP_TESTBED_ACCOUNTING=slurmdbd, the default)."""
        return "accounting_storage/slurmdbd" in self.conf.read_text()

    # -- commands ------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: Optional[dict] = None,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=dict(self.env, **(env or {})), cwd=cwd, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                                 f"stderr:\n{p.stderr}\n{self.daemon_logs()}")
        return p

    def submit(self, script: os.PathLike | str, *args: str, sbatch_args: Iterable[str] = (),
               env: Optional[dict] = None, cwd: Optional[os.PathLike] = None, timeout: float = 60) -> str:
        """sbatch SCRIPT ARGS; returns the job ID (for an array: the array's job ID).

        env entries are added to the job's environment (sbatch exports the caller's by default);
        cwd is the submit directory, where the job runs; like the repository it has a logs/ folder,
        where the templates write their output by default.
        """
        if cwd:
            (Path(cwd) / "logs").mkdir(exist_ok=True)
        p = self.run("sbatch", "--parsable", *sbatch_args, str(script), *args, env=env,
                     cwd=Path(cwd) if cwd else None, timeout=timeout)
        return p.stdout.strip().splitlines()[0].split(";")[0]

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if p.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return [_parse_oneliner(line) for line in p.stdout.splitlines() if line.strip()]

    @staticmethod
    def _result(rec: dict[str, str]) -> JobResult:
        code, _, sig = rec.get("ExitCode", "0:0").partition(":")
        out = rec.get("StdOut")
        return JobResult(job_id=rec.get("JobId", "?"), state=rec.get("JobState", "?"),
                         exit_code=int(code or 0), signal=int(sig or 0),
                         restarts=int(rec.get("Restarts", "0") or 0),
                         stdout=Path(out) if out and out != "(null)" else None, info=rec)

    def _wait(self, job_id: str, timeout: float, poll: float) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.job_records(job_id)
            if recs and all(r.get("JobState") in TERMINAL_STATES for r in recs):
                return recs
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.get('JobId')}:{r.get('JobState')}({r.get('Reason')})" for r in recs)
                self.run("scancel", str(job_id), check=False)
                raise AssertionError(f"job {job_id} not finished after {timeout} s: {states}\n"
                                     f"{self._outputs(recs)}{self.daemon_logs()}")
            time.sleep(poll)

    def wait_for(self, job_id: str, timeout: float = 60, poll: float = 0.5) -> JobResult:
        """Wait until the job is in a terminal state (a requeued job is not); cancel it on timeout."""
        recs = self._wait(job_id, timeout, poll)
        assert len(recs) == 1, f"{job_id} is an array job; use wait_for_array"
        return self._result(recs[0])

    def wait_for_array(self, job_id: str, timeout: float = 60, poll: float = 0.5) -> dict[int, JobResult]:
        recs = self._wait(job_id, timeout, poll)
        return {int(r["ArrayTaskId"]): self._result(r) for r in recs}

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """Signal the batch shell only, as `--signal=B:SIG@...` does before the time limit."""
        self.run("scancel", f"--signal={sig}", "--batch", str(job_id))

    def wait_for_text(self, path: os.PathLike, text: str, timeout: float = 30) -> str:
        path = Path(path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                content = path.read_text(errors="replace")
                if text in content:
                    return content
            time.sleep(0.2)
        content = path.read_text(errors="replace") if path.exists() else "(no file)"
        raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{content}\n{self.daemon_logs()}")

    def sacct(self, job_id: str, fields: str = "JobID,JobName,State,ExitCode") -> list[dict[str, str]]:
        p = self.run("sacct", "-j", str(job_id), "-n", "-P", "-o", fields)
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in p.stdout.splitlines() if line.strip()]

    # -- diagnostics ---------------------------------------------------------------------------------
    @staticmethod
    def _outputs(recs: list[dict[str, str]]) -> str:
        text = ""
        for r in recs:
            out = r.get("StdOut")
            if out and Path(out).exists():
                text += f"----- {out} -----\n{Path(out).read_text(errors='replace')[-3000:]}\n"
        return text

    def daemon_logs(self, lines: int = 30) -> str:
        text = ""
        for f in sorted((self.dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            text += f"----- {f} -----\n" + "\n".join(tail) + "\n"
        return text


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("PBP_SLURM_TESTS", "1") == "0":
        pytest.skip("PBP_SLURM_TESTS=0")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    directory = Path(tempfile.mkdtemp(prefix="pbp-slurmbed-"))  # short: MariaDB's socket lives here
    port = _free_port_base()
    # the bed's default size (no PBP_TESTBED_CPUS / _NODES), which the shipped sweeps must fit
    env = {k: v for k, v in os.environ.items() if k not in ("PBP_TESTBED_CPUS", "PBP_TESTBED_NODES")}
    env["PBP_TESTBED_PORT"] = str(port)
    t0 = time.monotonic()
    try:
        p = subprocess.run(["bash", str(TESTBED), "start", str(directory)], env=env, capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", str(TESTBED), "stop", str(directory)], env=env, timeout=120)
        pytest.fail(f"testbed.sh start timed out: {e}")
    if p.returncode == 77:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip("no Slurm test bed on this machine: " + (p.stderr.strip().splitlines() or ["?"])[-1])
    conf = directory / "slurm.conf"
    cpus = int(re.search(r"^NodeName=.* CPUs=(\d+)", conf.read_text(), re.M).group(1)) if conf.exists() else 0
    cluster = SlurmCluster(directory, port, cpus)
    try:
        if p.returncode != 0:
            pytest.fail(f"testbed.sh start exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        sys.stderr.write(f"\n[slurm test bed up in {time.monotonic() - t0:.1f} s: {directory}, port {port}]\n")
        yield cluster
    finally:
        s = subprocess.run(["bash", str(TESTBED), "stop", str(directory)], env=env, capture_output=True,
                           text=True, timeout=300)
        if s.returncode == 0 and os.environ.get("PBP_KEEP_SLURMBED") != "1":
            shutil.rmtree(directory, ignore_errors=True)


def _mpi_plugin_or_skip() -> str:
    """The srun --mpi plugin for this Python's mpi4py (pmi2 for MPICH-derived MPIs)."""
    pytest.importorskip("mpi4py")
    code = ("import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
            "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])")
    lib = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    if "Open MPI" in lib:
        pytest.skip(f"mpi4py uses {lib.strip()}: needs --mpi=pmix and libpmix2, which the bed lacks")
    return "pmi2"


# The MPICH wheel's bundled UCX now and then fails MPI_Init with this (seen here about once in 50-100
# launches, more often when several MPI jobs start at once; upstream: pmodels/mpich#7417). It is not a
# Slurm problem, so a test that failed on it, and on nothing else, is run once more.
UCX_FLAKE = "failed to unpack address, invalid bandwidth"


def retry_on_ucx_flake(test):
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except AssertionError as e:
            if UCX_FLAKE not in str(e):
                raise
            warnings.warn(f"{test.__name__}: MPICH/UCX start-up failure ({UCX_FLAKE!r}); running it once more")
            if "tmp_path" in kwargs:
                kwargs["tmp_path"] = kwargs["tmp_path"] / "retry"
                kwargs["tmp_path"].mkdir()
            if "fake_python" in kwargs:
                kwargs["fake_python"] = _fake_python(kwargs["tmp_path"])
            return test(*args, **kwargs)
    return wrapper


def _write(path: Path, text: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------------------ the bed itself

WORLD_SIZE = "from mpi4py import MPI; print('world size', MPI.COMM_WORLD.size, flush=True)"


@retry_on_ucx_flake
def test_srun_pmi2_gives_one_world(slurm_cluster, tmp_path):
    """srun --mpi=pmi2 wires the MPICH wheel's ranks into one MPI_COMM_WORLD (sbatch --wait)."""
    plugin = _mpi_plugin_or_skip()
    script = _write(tmp_path / "job.sh", f"""
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --output={tmp_path}/job-%j.out
        srun --mpi={plugin} -n 2 {sys.executable} -c "{WORLD_SIZE}"
    """)
    t0 = time.monotonic()
    p = slurm_cluster.run("sbatch", "--parsable", "--wait", str(script), cwd=tmp_path, check=False)
    job = p.stdout.strip().splitlines()[0]
    out = (tmp_path / f"job-{job}.out").read_text()
    assert p.returncode == 0, f"sbatch --wait exited {p.returncode}\n{p.stderr}\n{out}"
    assert out.count("world size 2") == 2, out
    assert time.monotonic() - t0 < 60


def test_wrong_mpi_plugin_gives_singletons(slurm_cluster, tmp_path):
    """The pitfall: without a PMI the job runs, but as P separate 1-rank worlds -- check world size."""
    _mpi_plugin_or_skip()
    script = _write(tmp_path / "job.sh", f"""
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --output={tmp_path}/job-%j.out
        srun --mpi=none -n 2 {sys.executable} -c "{WORLD_SIZE}"
    """)
    res = slurm_cluster.wait_for(slurm_cluster.submit(script, cwd=tmp_path))
    out = res.output()
    assert res.state == "COMPLETED", out
    assert out.count("world size 1") == 2, out


def test_sacct_records_steps(slurm_cluster, tmp_path):
    if not slurm_cluster.has_slurmdbd:
        pytest.skip("bed started with PBP_TESTBED_ACCOUNTING=none: no slurmdbd, no sacct")
    script = _write(tmp_path / "job.sh", """
        #!/bin/bash
        #SBATCH --ntasks=1
        srun --mpi=none true
        srun --mpi=none false
        exit 3
    """)
    job = slurm_cluster.submit(script, cwd=tmp_path)
    res = slurm_cluster.wait_for(job)
    assert (res.state, res.exit_code) == ("FAILED", 3)
    deadline = time.monotonic() + 20  # the job's end reaches slurmdbd asynchronously
    while True:
        rows = {r["JobID"]: r for r in slurm_cluster.sacct(job)}
        steps_ended = all(rows.get(f"{job}.{i}", {}).get("State") not in (None, "RUNNING", "PENDING") for i in (0, 1))
        if rows.get(job, {}).get("State") == "FAILED" and steps_ended:  # (each step's end arrives on its own)
            break
        assert time.monotonic() < deadline, f"sacct -j {job} after 20 s: {rows}"
        time.sleep(0.5)
    assert rows[f"{job}.0"]["State"] == "COMPLETED"
    assert rows[f"{job}.1"]["State"] == "FAILED"
    assert rows[job]["ExitCode"] == "3:0"


def test_usr1_trap_requeues_and_runs_again(slurm_cluster, tmp_path):
    """A batch script that traps USR1 (as --signal=B:USR1@T delivers it) requeues itself; run 2 ends."""
    script = _write(tmp_path / "job.sh", """
        #!/bin/bash
        #SBATCH --ntasks=1
        #SBATCH --requeue
        #SBATCH --open-mode=append
        echo "run restart=${SLURM_RESTART_COUNT:-0}"
        if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo "second run done"; exit 0; fi
        got=0
        trap 'got=1' USR1
        echo ready
        for i in $(seq 1 300); do [ $got = 1 ] && break; sleep 0.1; done
        [ $got = 1 ] || { echo "no USR1"; exit 4; }
        echo "got USR1; requeueing"
        scontrol requeue "$SLURM_JOB_ID"
        sleep 30  # slurmctld ends this run
        echo "not requeued"; exit 5
    """)
    job = slurm_cluster.submit(script, sbatch_args=[f"--output={tmp_path}/job-%j.out"], cwd=tmp_path)
    slurm_cluster.wait_for_text(tmp_path / f"job-{job}.out", "ready")
    slurm_cluster.signal_batch(job, "USR1")
    res = slurm_cluster.wait_for(job, timeout=60)
    out = res.output()
    assert res.state == "COMPLETED" and res.exit_code == 0, out
    assert res.restarts == 1, res.info
    assert "run restart=0" in out and "got USR1; requeueing" in out, out
    assert "run restart=1" in out and "second run done" in out, out
    assert "not requeued" not in out, out


# ------------------------------------------------------------------ the job templates, with fake modules

FAKE_PYTHON = """\
#!/bin/bash
# Stand-in interpreter: `-m pbp_hpc.X` runs FAKES/X.py instead; anything else goes to the real Python.
if [ "${1:-}" = -m ]; then
    case "${2:-}" in
        pbp_hpc.train | pbp_hpc.sweep | pbp_hpc.results | pbp_hpc.analyze)
            mod=${2#pbp_hpc.}; shift 2; exec @PY@ @FAKES@/$mod.py "$@" ;;
    esac
fi
exec @PY@ "$@"
"""

FAKE_TRAIN = """\
# Behaves like pbp_hpc.train where the templates depend on it.
import argparse, os, signal, sys, time
from mpi4py import MPI
ap = argparse.ArgumentParser()
ap.add_argument("--config")
ap.add_argument("--set", action="append", default=[])
args, rest = ap.parse_known_args()
sets = dict(s.split("=", 1) for s in args.set)
comm = MPI.COMM_WORLD
if comm.size != int(sets["parallel.ranks"]):
    sys.exit(f"world size {comm.size} != parallel.ranks {sets['parallel.ranks']}: wrong srun --mpi?")
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
ckpt = sets["checkpoint.path"]
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if comm.rank == 0:
    print(f"fake-train size={comm.size} restart={restart} sets={sets} rest={rest} "
          f"SRUN_CPUS_PER_TASK={os.environ.get('SRUN_CPUS_PER_TASK')} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
if sets.get("checkpoint.resume") == "true" and os.path.exists(ckpt):
    if comm.rank == 0:
        print(f"resumed from {ckpt}: {open(ckpt).read()}; training finished", flush=True)
    sys.exit(0)
comm.Barrier()  # every rank has its handler
if comm.rank == 0:
    print("ready", flush=True)
wait_s = float(os.environ.get("FAKE_WAIT_S", "50"))
deadline = time.time() + wait_s
while not got and time.time() < deadline:
    time.sleep(0.05)
if not got:
    sys.exit(f"no SIGUSR1 within {wait_s} s")
comm.Barrier()
if comm.rank == 0:
    with open(ckpt, "w") as f:
        f.write("epoch=1 step=42")
    print(f"rank 0: checkpoint written to {ckpt}", flush=True)
"""

FAKE_SWEEP = r"""\
# Behaves like pbp_hpc.sweep --point N --launcher srun: launches the point's ranks with srun,
# passes SIGUSR1 on to srun, exits 0 once the ranks have checkpointed.
import argparse, os, signal, subprocess, sys
ap = argparse.ArgumentParser()
ap.add_argument("jobfile")
ap.add_argument("--point", type=int, required=True)
ap.add_argument("--results", required=True)
ap.add_argument("--launcher", choices=["srun"], required=True)
a = ap.parse_args()
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
wait_for_signal = a.point == 1 and restart == 0
rank_code = '''
import os, signal, sys, time
from mpi4py import MPI
c = MPI.COMM_WORLD
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
c.Barrier()
if os.environ["FAKE_WAIT"] == "1":
    if c.rank == 0: print("ready", flush=True)
    t = time.time() + 50
    while not got and time.time() < t: time.sleep(0.05)
    c.Barrier()
    if c.rank == 0: print("point checkpointed", flush=True)
    sys.exit(0 if got else 4)
if c.rank == 0:
    with open(os.environ["FAKE_RESULT"], "w") as f:
        f.write(f"point={os.environ['FAKE_POINT']} size={c.size} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
'''
env = dict(os.environ, FAKE_WAIT="1" if wait_for_signal else "0", FAKE_RESULT=a.results, FAKE_POINT=str(a.point))
proc = subprocess.Popen(["srun", f"--mpi={os.environ['PBP_SRUN_MPI']}", "--kill-on-bad-exit=1",
                         sys.executable, "-c", rank_code], env=env)
signal.signal(signal.SIGUSR1, lambda s, f: proc.send_signal(signal.SIGUSR1))
print(f"fake-sweep point {a.point} of {a.jobfile} restart={restart} -> {a.results}", flush=True)
sys.exit(proc.wait())
"""

FAKE_RESULTS = """\
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("cmd", choices=["merge"])
ap.add_argument("files", nargs="+")
ap.add_argument("-o", required=True)
a = ap.parse_args()
with open(a.o, "w") as out:
    for f in a.files:
        out.write(open(f).read())
"""

FAKE_ANALYZE = """\
import argparse, os
ap = argparse.ArgumentParser()
ap.add_argument("merged")
ap.add_argument("--plots", required=True)
a = ap.parse_args()
os.makedirs(a.plots, exist_ok=True)
lines = open(a.merged).read().splitlines()
print(f"analysis of {len(lines)} points:")
print("\\n".join(sorted(lines)))
"""


def _fake_python(directory: Path) -> Path:
    fakes = directory / "fakes"
    for name, text in [("train", FAKE_TRAIN), ("sweep", FAKE_SWEEP), ("results", FAKE_RESULTS),
                       ("analyze", FAKE_ANALYZE)]:
        _write(fakes / f"{name}.py", text, 0o644)
    return _write(fakes / "python", FAKE_PYTHON.replace("@PY@", sys.executable).replace("@FAKES@", str(fakes)))


@pytest.fixture
def fake_python(tmp_path):
    """Path of an interpreter for PBP_PYTHON that runs the fake pbp_hpc modules above."""
    return _fake_python(tmp_path)


@retry_on_ucx_flake
def test_train_template_checkpoints_requeues_resumes(slurm_cluster, tmp_path, fake_python):
    """slurm/train.sh: USR1 -> srun -> every rank; checkpoint; scontrol requeue; run 2 resumes."""
    _mpi_plugin_or_skip()
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", "--set", "train.epochs=2",
                               sbatch_args=["--ntasks-per-node=2", "--cpus-per-task=2", "--time=10"],
                               env={"PBP_PYTHON": str(fake_python)}, cwd=tmp_path)
    out_file = tmp_path / "logs" / f"pbp-train-{job}.out"
    slurm_cluster.wait_for_text(out_file, "ready")
    slurm_cluster.signal_batch(job, "USR1")
    res = slurm_cluster.wait_for(job, timeout=60)
    out = res.output()
    assert res.stdout == out_file
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), out
    ckpt = tmp_path / "checkpoints" / f"{job}.h5"
    assert ckpt.exists(), out
    assert "srun --mpi=pmi2" in out, out  # auto-detected for the MPICH wheel
    assert "'parallel.ranks': '2'" in out and "'parallel.threads_per_rank': '2'" in out, out
    assert f"'train.save_model': 'checkpoints/{job}.model.h5'" in out, out
    assert f"'checkpoint.path': 'checkpoints/{job}.h5'" in out and "'checkpoint.resume': 'true'" in out, out
    assert "'train.epochs': '2'" in out, out  # arguments after the script name reach the program
    assert "SRUN_CPUS_PER_TASK=2 OMP_NUM_THREADS=2" in out, out
    assert "checkpoint written" in out and "requeueing job" in out, out
    assert f"resumed from checkpoints/{job}.h5" in out and "training finished" in out, out


def test_train_template_wrong_plugin_fails_loudly(slurm_cluster, tmp_path, fake_python):
    """PBP_SRUN_MPI=none: two 1-rank worlds; parallel.ranks=2 makes the program (here: the fake) fail."""
    _mpi_plugin_or_skip()
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", sbatch_args=["--ntasks-per-node=2"],
                               env={"PBP_PYTHON": str(fake_python), "PBP_SRUN_MPI": "none"}, cwd=tmp_path)
    res = slurm_cluster.wait_for(job, timeout=60)
    out = res.output()
    assert res.state == "FAILED" and res.exit_code != 0, out
    assert "world size 1 != parallel.ranks 2" in out, out


@retry_on_ucx_flake
def test_sweep_array_requeue_and_merge(slurm_cluster, tmp_path, fake_python):
    """slurm/sweep.sh as a 2-task array (task 1 checkpoints and is requeued alone), then slurm/merge.sh
    after it with --dependency=afterany."""
    _mpi_plugin_or_skip()
    _write(tmp_path / "jobs" / "demo.yaml", "points: [a, b]\n", 0o644)
    env = {"PBP_PYTHON": str(fake_python), "PBP_JOBFILE": "jobs/demo.yaml"}
    array = slurm_cluster.submit(SLURM_DIR / "sweep.sh", env=env, cwd=tmp_path,
                                 sbatch_args=["--array=0-1", "--ntasks=2", "--cpus-per-task=1", "--time=10"])
    merge = slurm_cluster.submit(SLURM_DIR / "merge.sh", cwd=tmp_path,
                                 sbatch_args=[f"--dependency=afterany:{array}"],
                                 env={"PBP_PYTHON": str(fake_python), "PBP_RESULTS_DIR": "results/demo",
                                      "PBP_SWEEP_POINTS": "2"})
    slurm_cluster.wait_for_text(tmp_path / "logs" / f"pbp-sweep-{array}_1.out", "ready")
    slurm_cluster.signal_batch(f"{array}_1", "USR1")
    tasks = slurm_cluster.wait_for_array(array, timeout=60)
    logs = {i: (tmp_path / "logs" / f"pbp-sweep-{array}_{i}.out").read_text() for i in (0, 1)}
    assert sorted(tasks) == [0, 1]
    assert all(t.state == "COMPLETED" and t.exit_code == 0 for t in tasks.values()), (tasks, logs)
    assert (tasks[0].restarts, tasks[1].restarts) == (0, 1), logs
    assert "point checkpointed" in logs[1] and f"requeueing array task {array}_1" in logs[1], logs[1]
    results = tmp_path / "results" / "demo"
    assert (results / "point-0.h5").read_text() == "point=0 size=2 restart=0\n", logs
    assert (results / "point-1.h5").read_text() == "point=1 size=2 restart=1\n", logs

    m = slurm_cluster.wait_for(merge, timeout=30)
    assert (m.state, m.exit_code) == ("COMPLETED", 0), m.output()
    analysis = (results / "analysis.txt").read_text()
    assert analysis.startswith("analysis of 2 points:"), analysis
    assert (results / "merged.h5").exists() and (results / "plots").is_dir()


# ------------------------------------------------------------- the job templates with the REAL package
#
# No fakes below: PBP_PYTHON is this interpreter, so the templates run `python -m pbp_hpc.sweep|train|
# results|analyze` from this checkout. MPIR_CVAR_CH4_NETMOD=ofi keeps the MPICH wheel off its bundled
# UCX, whose start-up now and then fails (UCX_FLAKE above).

SACCT_REPORT = Path("/tmp/pbp_slurm_sacct.txt")


def _real_env() -> dict[str, str]:
    env = {"PBP_PYTHON": sys.executable, "MPIR_CVAR_CH4_NETMOD": "ofi", "PYTHONUNBUFFERED": "1"}
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file():
        env["PBP_VENV"] = str(venv)
    return env


def _job_report(cluster: SlurmCluster, *job_ids: str, timeout: float = 30, save: bool = True,
                sacct_args: tuple[str, ...] = ()) -> str:
    """`sacct -j IDS --format=JobID,JobName,State,ExitCode,Elapsed` once slurmdbd has every job's end
    (else `squeue` and `scontrol show job`); printed, and with save written to SACCT_REPORT (for the issue)."""
    ids = ",".join(job_ids)
    if cluster.has_slurmdbd and shutil.which("sacct"):
        cmd = ["sacct", *sacct_args, "-j", ids, "--format=JobID%-14,JobName%-12,State,ExitCode,Elapsed"]
        deadline = time.monotonic() + timeout  # the jobs' ends reach slurmdbd asynchronously
        while True:
            p = cluster.run(*cmd, check=False)
            states = {r["JobID"]: r["State"] for jid in job_ids for r in cluster.sacct(jid)} \
                if p.returncode == 0 else {}
            done = states and all(s.split()[0] in TERMINAL_STATES for j, s in states.items() if "." not in j)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        text = f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}"
    else:
        q = cluster.run("squeue", check=False)
        text = f"(sacct unavailable: no slurmdbd)\n$ squeue\n{q.stdout}{q.stderr}"
        for jid in job_ids:
            s = cluster.run("scontrol", "show", "job", jid, check=False)
            text += f"$ scontrol show job {jid}\n{s.stdout}{s.stderr}"
    if save:
        SACCT_REPORT.write_text(text)
    sys.stdout.write(f"\n{text}\n")
    return text


@retry_on_ucx_flake
def test_real_sweep_array_merges_and_analyzes(slurm_cluster, tmp_path):
    """`python -m pbp_hpc.sweep jobs/slurm_smoke.yaml --slurm`: the real array of 4 points (two 1-rank,
    two 2-rank over srun --mpi=pmi2), then the real merge + analysis job; the jobs' logs go to a folder
    of this submission's own beside the results, none to the submit directory."""
    _mpi_plugin_or_skip()
    from pbp_hpc import results as results_mod
    from pbp_hpc import sweep as sweep_mod
    jobfile = REPO / "jobs" / "slurm_smoke.yaml"
    points = sweep_mod.expand(jobfile).points
    assert len(points) == 4 and {p.ranks for p in points} == {1, 2}
    out_dir = tmp_path / "results"
    t0 = time.monotonic()
    p = slurm_cluster.run(sys.executable, "-m", "pbp_hpc.sweep", str(jobfile), "--slurm", "--results-dir",
                          str(out_dir), "--sbatch-arg=--time=10", env=_real_env(), cwd=tmp_path)
    m = re.search(r"submitted array job (\d+) \((\d+) points\) and merge job (\d+).* job logs in (\S+)/$", p.stdout)
    assert m, p.stdout + p.stderr
    array, n, merge, log_dir = m.group(1), int(m.group(2)), m.group(3), Path(m.group(4))
    assert n == len(points)
    assert log_dir.parent == out_dir / "logs", log_dir

    def logs() -> str:
        text = ""
        for f in sorted(log_dir.glob("pbp-*.out")) + sorted(out_dir.glob("point-*.logs/*.log")):
            text += f"----- {f.name} -----\n{f.read_text(errors='replace')[-3000:]}\n"
        return text

    tasks = slurm_cluster.wait_for_array(array, timeout=240)
    merged_job = slurm_cluster.wait_for(merge, timeout=120)
    wall = time.monotonic() - t0
    report = _job_report(slurm_cluster, array, merge)
    sys.stdout.write(f"[real sweep: {n} points + merge in {wall:.1f} s]\n")
    assert sorted(tasks) == list(range(n)), report
    bad = {i: (t.state, t.exit_code) for i, t in tasks.items() if (t.state, t.exit_code) != ("COMPLETED", 0)}
    assert not bad, f"{bad}\n{report}\n{logs()}"
    assert (merged_job.state, merged_job.exit_code) == ("COMPLETED", 0), f"{report}\n{merged_job.output()}"

    merged = out_dir / "merged.h5"
    assert merged.is_file(), logs()
    runs = results_mod.read_runs(merged)
    by_point = {}
    for r in runs:
        assert r["point"] not in by_point, f"point {r['point']} recorded twice"
        by_point[r["point"]] = r
    assert sorted(by_point) == [pt.index for pt in points], [r["key"] for r in runs]
    for pt in points:
        r = by_point[pt.index]
        assert r["status"] == "ok", (r["key"], r["error"], logs())
        assert (r["implementation"], r["ranks"], r["threads_per_rank"]) == (pt.implementation, pt.ranks, 1)
        epochs = r["epochs"]
        assert [e["epoch"] for e in epochs] == [0, 1], epochs
        assert all(e["time_s"] > 0 and e["loss"] is not None for e in epochs), epochs
        assert r["median_epoch_time_s"] is not None and r["test_accuracy"] is not None
        # the world size, from the run itself: its own log line, and communication for 2 ranks only
        log = (out_dir / f"point-{pt.index}.logs" / f"{r['key']}.log").read_text()
        assert f"pbp_hpc: {pt.ranks} rank(s)" in log, log
        if pt.ranks == 2:
            assert all(e["comm_s"] > 0 for e in epochs), epochs
            # its array task measured the network first, under srun, on the point's ranks
            assert r["interconnect"]["ranks"] == 2 and r["interconnect"]["samples"], r["interconnect"]
        else:
            assert all(e["comm_s"] == 0 for e in epochs), epochs
    for i in range(n):  # each task ran its own point, once
        assert f"point {i} exited with 0" in (log_dir / f"pbp-sweep-{array}_{i}.out").read_text()
    assert merged_job.stdout == log_dir / f"pbp-merge-{merge}.out"
    assert not list(tmp_path.glob("*.out")), "a job log in the submit directory"

    analysis = (out_dir / "analysis.txt").read_text()
    assert f"{n} run(s): {n} ok in {n} point(s), 0 not ok" in analysis, analysis
    assert re.search(r"^\s*B\s+implementation\s+PxT\s+reps\s+TPE s", analysis, re.M), analysis
    pngs = sorted((out_dir / "plots").glob("*.png"))
    assert pngs, merged_job.output()


TRAIN_EPOCHS = 600  # 1-rank [784, 16, 10] on 1,000 examples: ~10-20 ms an epoch, ~10 s in all here


@retry_on_ucx_flake
def test_real_train_usr1_requeues_and_resumes(slurm_cluster, tmp_path):
    """slurm/train.sh with the real pbp_hpc.train: USR1 mid-run -> checkpoint, exit 0 -> requeue ->
    the second run resumes from the checkpoint and finishes."""
    _mpi_plugin_or_skip()
    from pbp_hpc import checkpoint
    env = dict(_real_env(), PBP_CONFIG=str(REPO / "configs" / "synthetic.yaml"))
    args = ["--set", "model.layers=[784,16,10]", "--set", "data.n_train=1200", "--set", "data.n_test=200",
            "--set", f"train.epochs={TRAIN_EPOCHS}", "--set", "train.batch_size=100",
            "--set", "train.eval_every=0", "--set", "train.progress=false"]
    t0 = time.monotonic()
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", *args, env=env, cwd=tmp_path,
                               sbatch_args=["--ntasks=1", "--cpus-per-task=1", "--time=10"])
    out_file = tmp_path / "logs" / f"pbp-train-{job}.out"
    slurm_cluster.wait_for_text(out_file, "epoch   0 ", timeout=60)
    state = slurm_cluster.job_records(job)[0].get("JobState")
    assert state == "RUNNING", state
    slurm_cluster.signal_batch(job, "USR1")
    res = slurm_cluster.wait_for(job, timeout=150)
    out = res.output()
    sys.stdout.write(f"[real train: USR1, requeue, resume in {time.monotonic() - t0:.1f} s]\n")
    report = _job_report(slurm_cluster, job, save=False, sacct_args=("--duplicates",))  # both runs
    assert res.stdout == out_file
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), f"{report}\n{out}"
    ckpt = tmp_path / "checkpoints" / f"{job}.h5"
    written = out.find("checkpoint written")
    resumed = out.find(f"resumed from checkpoints/{job}.h5")
    assert 0 <= written < resumed, out
    assert f"requeueing job {job}" in out, out
    m = re.search(r"checkpoint written to \S+ at epoch (\d+) step (\d+)", out)
    assert m and 0 < int(m.group(1)) < TRAIN_EPOCHS, out  # stopped mid-run, not at the end
    assert re.search(rf"resumed from \S+ at epoch {m.group(1)} step {m.group(2)}", out), out
    assert re.search(r"^test accuracy \d+\.\d+%", out, re.M), out
    assert f"epoch {TRAIN_EPOCHS - 1:3d} " in out, out
    assert "training step exited with 0" in out, out
    ck = checkpoint.load(ckpt)
    assert (ck["epoch"], ck["step"]) == (TRAIN_EPOCHS, 0), {k: v for k, v in ck.items() if k != "theta"}


# ---------------------------------------------------------------- two nodes, and what a new user tries

NODE_REPORT = """\
#!/bin/bash
# PBP_PYTHON for train.sh: each rank says where Slurm put it, then runs the real interpreter.
if [ "${1:-}" = -m ] && [ "${SLURM_PROCID:-}" != "" ]; then
    echo "rank $SLURM_PROCID of $SLURM_NTASKS: node $SLURMD_NODENAME (SLURM_NODEID=$SLURM_NODEID)" >&2
fi
exec @PY@ "$@"
"""


@retry_on_ucx_flake
def test_train_sh_runs_on_two_nodes(slurm_cluster, tmp_path):
    """sbatch --nodes=2 --ntasks-per-node=1 slurm/train.sh, the real pbp_hpc.train: one rank on each of
    the bed's two nodes, both in one MPI world of 2."""
    _mpi_plugin_or_skip()
    python = _write(tmp_path / "python", NODE_REPORT.replace("@PY@", sys.executable))
    env = dict(_real_env(), PBP_PYTHON=str(python), PBP_CONFIG=str(REPO / "configs" / "synthetic.yaml"))
    args = ["--set", "model.layers=[784,16,10]", "--set", "data.n_train=1200", "--set", "data.n_test=200",
            "--set", "train.epochs=2", "--set", "train.eval_every=0", "--set", "train.progress=false"]
    t0 = time.monotonic()
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", *args, env=env, cwd=tmp_path,
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=5"])
    res = slurm_cluster.wait_for(job, timeout=90)
    out = res.output()
    sys.stdout.write(f"[2-node train.sh: {time.monotonic() - t0:.1f} s]\n")
    assert (res.state, res.exit_code) == ("COMPLETED", 0), out
    assert res.info["NumNodes"] == "2", res.info
    placed = dict(re.findall(r"^rank (\d) of 2: node \S+ \(SLURM_NODEID=(\d)\)$", out, re.M))
    assert placed == {"0": "0", "1": "1"}, out  # one rank on each node
    nodes = set(re.findall(r"^rank \d of 2: node (\S+) ", out, re.M))
    assert len(nodes) == 2, out
    assert "pbp_hpc: 2 rank(s)" in out, out  # one MPI world over both nodes
    assert re.search(r"^test accuracy \d+\.\d+%", out, re.M), out


def test_every_shipped_sweep_fits_the_default_bed(slurm_cluster):
    """Each jobs/*.yaml's --slurm array is accepted by the bed at its default size (`sbatch --test-only`:
    Slurm's own check, nothing runs), or refused by --slurm itself with a message saying what to add."""
    from pbp_hpc import sweep as sweep_mod
    from pbp_hpc.errors import ConfigError
    checked = []
    for jobfile in sorted((REPO / "jobs").glob("*.yaml")):
        try:
            array, _, env = sweep_mod.slurm_commands(sweep_mod.expand(jobfile), Path("/tmp/unused"), [], "1")
        except ConfigError as exc:
            assert "needs `cores:`" in str(exc), exc  # hybrid_split: best: cores must be stated first
            continue
        cmd = [a for a in array if a != "--parsable" and not a.startswith("--output=")]
        p = slurm_cluster.run(cmd[0], "--test-only", *cmd[1:], check=False, env=env)
        assert p.returncode == 0 and "to start at" in p.stderr, f"{jobfile.name}: {' '.join(cmd)}\n{p.stderr}"
        checked.append(jobfile.stem)
    assert {"strong_scaling", "weak_scaling", "slurm_smoke"} <= set(checked), checked


@retry_on_ucx_flake
def test_sweep_sh_by_hand_into_a_used_results_folder_says_it_will_not_rerun(slurm_cluster, tmp_path):
    """`sbatch --array=0 slurm/sweep.sh JOBFILE` where point 0 is already recorded (the folder an earlier
    submission used): the task says so, and lists the point's runs, before it ends having trained nothing."""
    _mpi_plugin_or_skip()
    jobfile = REPO / "jobs" / "slurm_smoke.yaml"
    result = tmp_path / "results" / "slurm_smoke" / "point-0.h5"
    first = subprocess.run([sys.executable, "-m", "pbp_hpc.sweep", str(jobfile), "--point", "0", "--results", str(result)],
                           env=dict(os.environ, **_real_env()), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and result.is_file(), first.stdout + first.stderr
    job = slurm_cluster.submit(SLURM_DIR / "sweep.sh", str(jobfile), env=_real_env(), cwd=tmp_path,
                               sbatch_args=["--array=0", "--ntasks=1", "--time=5"])
    res = slurm_cluster.wait_for_array(job, timeout=60)[0]
    out = res.output()
    assert (res.state, res.exit_code) == ("COMPLETED", 0), out
    said = out.find(f"{result.relative_to(tmp_path)} exists already")
    listed = re.search(r"^0\s+0\s+blas-serial .* recorded \(ok\)$", out, re.M)
    summary = out.find("1 already recorded")
    assert 0 <= said and listed and said < listed.start() < summary, out


def test_a_restarted_bed_numbers_jobs_on(tmp_path):
    """testbed.sh stop + start in the same folder: the new bed's job IDs follow the old ones, so a
    `--output=...%j.out` log of the old bed is never appended to. (A small bed of its own: 1 node,
    no accounting, other ports.)"""
    if os.environ.get("PBP_SLURM_TESTS", "1") == "0":
        pytest.skip("PBP_SLURM_TESTS=0")
    directory = Path(tempfile.mkdtemp(prefix="pbp-slurmbed2-"))
    env = dict(os.environ, PBP_TESTBED_PORT=str(_free_port_base(start=26817, span=4)), PBP_TESTBED_NODES="1",
               PBP_TESTBED_ACCOUNTING="none")
    env.pop("SLURM_CONF", None)
    bed = functools.partial(subprocess.run, env=env, capture_output=True, text=True, timeout=120)
    cluster = SlurmCluster(directory, int(env["PBP_TESTBED_PORT"]), 0)
    ids = []
    try:
        for _ in range(2):
            p = bed(["bash", str(TESTBED), "start", str(directory)])
            if p.returncode == 77:
                pytest.skip("no Slurm test bed on this machine")
            assert p.returncode == 0, p.stderr
            job = cluster.submit("--wrap=true", sbatch_args=[f"--output={tmp_path}/job-%j.out"])
            assert cluster.wait_for(job, timeout=30).state == "COMPLETED"
            ids.append(int(job))
            assert bed(["bash", str(TESTBED), "stop", str(directory)]).returncode == 0
    finally:
        bed(["bash", str(TESTBED), "stop", str(directory)])
        shutil.rmtree(directory, ignore_errors=True)
    assert ids[1] > ids[0], ids
    assert sorted(p.name for p in tmp_path.glob("job-*.out")) == [f"job-{i}.out" for i in sorted(ids)]


@retry_on_ucx_flake
@pytest.mark.parametrize("strategy", ["async_ps", "hogwild"])
def test_an_asynchronous_strategy_runs_across_two_slurm_nodes(slurm_cluster, tmp_path, strategy):
    """slurm/train.sh with parallel.strategy: one-sided windows (async_ps) and node-shared arrays
    averaged across nodes (hogwild) over srun's PMI, 2 nodes x 2 ranks."""
    _mpi_plugin_or_skip()
    python = _write(tmp_path / "python", NODE_REPORT.replace("@PY@", sys.executable))
    env = dict(_real_env(), PBP_PYTHON=str(python), PBP_CONFIG=str(REPO / "configs" / "synthetic.yaml"),
               MPIR_CVAR_CH4_NETMOD=os.environ.get("PBP_TEST_NETMOD", "ofi"))
    args = ["--set", "model.layers=[784,16,10]", "--set", "data.n_train=1200", "--set", "data.n_test=200",
            "--set", "train.epochs=2", "--set", "train.progress=false", "--set", f"parallel.strategy={strategy}",
            "--set", "parallel.stall_warning_s=10", "--set", "parallel.stall_timeout_s=30",
            # Known: on this bed (two slurmd sharing one host's 2 cores), async_ps with ranks that bound
            # themselves (parallel.bind, the default) hangs in an Accumulate's flush on 2 nodes x 2 ranks
            # (1 x 2, 2 x 1, and mpiexec's emulated 2 x 2 with -bind-to core all pass); docs/strategies.md
            "--set", "parallel.bind=false",
            "--set", "train.learning_rate=0.1"]
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", *args, env=env, cwd=tmp_path,
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--time=5"])
    res = slurm_cluster.wait_for(job, timeout=120)
    out = res.output()
    assert (res.state, res.exit_code) == ("COMPLETED", 0), out
    assert "pbp_hpc: 4 rank(s)" in out and f"strategy {strategy}" in out, out
    assert len(set(re.findall(r"^rank \d of 4: node (\S+) ", out, re.M))) == 2, out
    assert re.search(r"^test accuracy \d+\.\d+%", out, re.M), out


# ---------------------------------------------------------------- elastic: a node lost mid-run (docs/elastic.md)

ELASTIC_ARGS = ["--set", "model.layers=[784,16,10]", "--set", "data.n_train=1200", "--set", "data.n_test=200",
                "--set", "train.epochs=150", "--set", "train.batch_size=100", "--set", "train.eval_every=0",
                "--set", "train.progress=false", "--set", "checkpoint.every_steps=20"]
# rank 1 stops for a minute at global step 25, after the checkpoint of step 20: the node is failed
# while the job is surely mid-run, however fast the machine (a 1-rank restart has no rank 1)
def hold(seconds: int) -> list[str]:
    return ["--set", "debug.fail_rank=1", "--set", "debug.fail_step=25", "--set", "debug.fail_kind=stall",
            "--set", f"debug.stall_s={seconds}"]


def _fail_node_when_training(cluster: SlurmCluster, out_file: Path, node: str, wait_for: Optional[Path] = None) -> None:
    """Once training is under way (and `wait_for` exists), mark `node` DOWN as slurmctld does when a
    node stops answering, and drain it so that nothing is placed on it again."""
    cluster.wait_for_text(out_file, "epoch   1 ", timeout=90)
    deadline = time.monotonic() + 30
    while wait_for is not None and not wait_for.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=pbp-elastic-test")
    cluster.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=pbp-elastic-test")


def _return_node(cluster: SlurmCluster, node: str) -> None:
    cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "idle" not in cluster.run("sinfo", "-h", "-n", node, "-o", "%T").stdout:
        time.sleep(0.5)


@retry_on_ucx_flake
def test_an_elastic_job_that_loses_a_node_finishes_on_the_other(slurm_cluster, tmp_path):
    """PBP_ELASTIC=1 sbatch --no-kill -N2 slurm/train.sh: the second node fails mid-run; Slurm keeps the
    job (--no-kill), the elastic launcher reruns the step with -x NODE on the node left, from the last
    checkpoint, with 1 rank instead of 2."""
    _mpi_plugin_or_skip()
    from pbp_hpc import checkpoint
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N").stdout.split()
    env = dict(_real_env(), PBP_CONFIG=str(REPO / "configs" / "synthetic.yaml"), PBP_ELASTIC="1")
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", *ELASTIC_ARGS, *hold(60), env=env, cwd=tmp_path,
                               sbatch_args=["--no-kill", "--nodes=2", "--ntasks-per-node=1", "--time=5"])
    out_file = tmp_path / "logs" / f"pbp-train-{job}.out"
    try:
        # the checkpoint after step 20 ("epoch 2 step 0") is written; rank 1 now holds step 25
        _fail_node_when_training(slurm_cluster, out_file, nodes[1], wait_for=tmp_path / "checkpoints" / f"{job}.h5")
        res = slurm_cluster.wait_for(job, timeout=120)
    finally:
        _return_node(slurm_cluster, nodes[1])
    out = res.output()
    assert (res.state, res.exit_code) == ("COMPLETED", 0), out
    assert f"node failure on {nodes[1]}" in out and "continuing from epoch" in out, out
    assert re.search(rf"srun -n 1 -N 1 -x {nodes[1]} .*--set parallel.ranks=1 .*--resume", out), out
    assert "(written by 2 rank(s), continuing on 1)" in out, out
    assert "continuing from epoch 2 step 0 on 1 rank(s)" in out, out  # the checkpoint after step 20
    assert "1 restart(s)" in out and re.search(r"^test accuracy \d+\.\d+%", out, re.M), out
    assert res.info["NodeList"] == nodes[0], res.info  # the job gave the failed node back
    ck = checkpoint.load(tmp_path / "checkpoints" / f"{job}.h5")
    assert (ck["epoch"], ck["step"]) == (150, 0)


@retry_on_ucx_flake
def test_a_requeued_job_resumes_after_losing_a_node(slurm_cluster, tmp_path):
    """sbatch (--requeue, train.sh's default) on two nodes; one fails: Slurm requeues the job (the
    ranks checkpoint on the SIGTERM of the cancelled step), it waits for nodes, and the run resumes.
    (Slurm 22.05 keeps a requeued job's node count -- even -N1-2 that got 2 nodes waits for 2 again --
    so the test gives the node back; any rank count would resume, tests/test_elastic.py.)"""
    _mpi_plugin_or_skip()
    from pbp_hpc import checkpoint
    nodes = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N").stdout.split()
    env = dict(_real_env(), PBP_CONFIG=str(REPO / "configs" / "synthetic.yaml"))
    # a 5 s hold at step 25: the node fails during it; the ranks checkpoint at the step's end (the
    # SIGTERM of the cancelled step), so the requeued run starts past the hold
    job = slurm_cluster.submit(SLURM_DIR / "train.sh", *ELASTIC_ARGS, *hold(5), env=env, cwd=tmp_path,
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=5"])
    out_file = tmp_path / "logs" / f"pbp-train-{job}.out"
    try:
        _fail_node_when_training(slurm_cluster, out_file, nodes[1], wait_for=tmp_path / "checkpoints" / f"{job}.h5")
        deadline = time.monotonic() + 60
        while slurm_cluster.job_records(job)[0].get("Restarts", "0") == "0" and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        _return_node(slurm_cluster, nodes[1])  # the requeued job asks for what it had
    res = slurm_cluster.wait_for(job, timeout=150)
    out = res.output()
    assert (res.state, res.exit_code, res.restarts) == ("COMPLETED", 0, 1), out
    assert re.search(rf"resumed from checkpoints/{job}.h5 at epoch 2 step \d", out), out  # the hold's epoch
    ck = checkpoint.load(tmp_path / "checkpoints" / f"{job}.h5")
    assert (ck["epoch"], ck["step"]) == (150, 0)


@retry_on_ucx_flake
def test_train_sh_as_its_header_says_finds_the_data_as_make_run_and_saves_a_model_to_evaluate(slurm_cluster, tmp_path,
                                                                                               mnist_dir):
    """`sbatch slurm/train.sh` from a fresh clone with ../shared/data/mnist beside it and no PBP_HPC_DATA:
    the job finds the data as `make run` does, logs to logs/, saves the model beside its checkpoint, and
    `python -m pbp_hpc.evaluate` reads both; nothing else lands in the clone's root."""
    _mpi_plugin_or_skip()
    clone = tmp_path / "clone"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist").symlink_to(mnist_dir)
    for name in ("slurm", "configs", "logs"):  # what the job reads from a clone
        shutil.copytree(REPO / name, clone / name)
    env = dict(_real_env(), PBP_HPC_DATA="", PBP_HPC_CACHE=str(tmp_path / "no-cache"))
    args = ["--set", "model.layers=[784,16,10]", "--set", "data.n_train=1200", "--set", "data.n_test=200",
            "--set", "train.epochs=2", "--set", "train.batch_size=100", "--set", "train.progress=false",
            "--set", "data.download=false"]
    job = slurm_cluster.submit(clone / "slurm" / "train.sh", *args, env=env, cwd=clone,
                               sbatch_args=["--ntasks=2", "--time=5"])
    res = slurm_cluster.wait_for(job, timeout=120)
    out = res.output()
    assert res.stdout == clone / "logs" / f"pbp-train-{job}.out"
    assert (res.state, res.exit_code) == ("COMPLETED", 0), out
    assert f"from {mnist_dir.resolve()}" in out or "shared/data/mnist" in out, out
    assert sorted(p.name for p in clone.iterdir()) == ["checkpoints", "configs", "logs", "slurm"]
    model, ckpt = clone / "checkpoints" / f"{job}.model.h5", clone / "checkpoints" / f"{job}.h5"
    assert model.is_file() and ckpt.is_file(), out
    for saved in (model, ckpt):
        p = subprocess.run([sys.executable, "-m", "pbp_hpc.evaluate", str(saved), "--data-dir", str(mnist_dir)],
                           env=dict(os.environ, **_real_env()), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and re.search(r"^test accuracy: \d+\.\d+%", p.stdout, re.M), p.stdout + p.stderr


@retry_on_ucx_flake
def test_sweep_sh_by_hand_with_too_few_tasks_names_the_sbatch_options_before_training(slurm_cluster, tmp_path):
    """`sbatch --array=K --ntasks=1 slurm/sweep.sh JOBFILE` where point K needs 2 ranks: the task says so
    before training, names the sbatch options that fit every point, records nothing and exits 2."""
    _mpi_plugin_or_skip()
    from pbp_hpc import sweep as sweep_mod
    jobfile = REPO / "jobs" / "slurm_smoke.yaml"
    points = sweep_mod.expand(jobfile).points
    k = next(p.index for p in points if p.ranks == 2)
    job = slurm_cluster.submit(SLURM_DIR / "sweep.sh", str(jobfile), env=_real_env(), cwd=tmp_path,
                               sbatch_args=[f"--array={k}", "--ntasks=1", "--time=5"])
    res = slurm_cluster.wait_for_array(job, timeout=60)[k]
    out = res.output()
    assert res.stdout == tmp_path / "logs" / f"pbp-sweep-{job}_{k}.out"
    assert res.exit_code == 2, out
    assert (f"point {k} needs 2 ranks x 1 threads, but this array task has --ntasks=1: submit with  "
            f"sbatch --array=0-{len(points) - 1} --ntasks=2 --cpus-per-task=1 slurm/sweep.sh {jobfile}") in out, out
    assert "More processors requested" not in out and "pbp_hpc: 2 rank(s)" not in out, out
    assert not (tmp_path / "results" / "slurm_smoke" / f"point-{k}.h5").exists()
    assert not list(tmp_path.glob("*.out")), "a job log in the submit directory"
