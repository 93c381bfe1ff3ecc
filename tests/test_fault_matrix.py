"""The fault-injection matrix: (kill, stop, signal, full disk, stalled network) x (setup, training,
evaluation, checkpoint, results write), every cell that can occur.

Each cell starts real processes (mpiexec jobs, sweeps, a slow local HTTP server on 127.0.0.1, a
small tmpfs for a full disk) and asserts that the job ends within a bound, with one message and
the documented exit code, and that nothing recorded is lost. Cells that cannot occur, or that
another test file covers, are skipped with the reason. The last section holds the signal cells
of the commands that write no checkpoint (search_lr, bench): they end in every phase. The whole
matrix runs in about 2 minutes.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import MPIEXEC, ROOT, last_json

PY = [sys.executable, "-m", "pbp_hpc.train"]
TINY = ["--set", "data.name=synthetic", "--set", "data.n_train=600", "--set", "model.layers=[784, 16, 10]",
        "--set", "train.batch_size=20", "--set", "train.epochs=3", "--set", "train.progress=false"]
LONG = [*TINY, "--set", "train.epochs=100000"]
BOUND = 30  # seconds: a job hit by a fault must be gone well within this


def _job(mpi_job, ranks: int, *args: str, env=None):
    return mpi_job([MPIEXEC, "-n", str(ranks), *PY, *args], env=env)


# --- a slow server and a tmpfs ------------------------------------------------------------------

class _Drip(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a large body, one byte every half second: never stalls long enough to time out."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "100000000")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            return

    def log_message(self, *args):
        pass


@pytest.fixture
def drip_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): no full disk to test with")


@pytest.fixture
def small_disk(tmp_path):
    mounted: list[Path] = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        _tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> None:
    """Fill a file system to the last block."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


# --- setup --------------------------------------------------------------------------------------

def test_stalled_network_x_setup_the_download_ends_at_its_deadline(tmp_path, drip_url):
    from pbp_hpc.data.fetch import fetch_mnist
    from pbp_hpc.errors import DataError

    t = time.monotonic()
    with pytest.raises(DataError, match="overall deadline"):
        fetch_mnist(tmp_path / "cache", [drip_url], timeout=5.0, deadline_s=2.0)
    assert time.monotonic() - t < 6.0
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind


_DOWNLOADING_RUN = """
import sys
from pbp_hpc import train
from pbp_hpc.data import mnist
mnist.resolve_data_dir.__defaults__ = (True, ({url!r},))
sys.exit(train.main(["--set", "train.progress=false"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_x_setup_a_download_stops_at_once_with_the_documented_code(tmp_path, drip_url, sig):
    env = {**os.environ, "PBP_HPC_CACHE": str(tmp_path / "cache"), "PBP_HPC_DATA": ""}
    proc = subprocess.Popen([sys.executable, "-c", _DOWNLOADING_RUN.format(url=drip_url)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    cache = tmp_path / "cache"
    while time.monotonic() < deadline and not (cache.is_dir() and any(cache.iterdir())):
        time.sleep(0.05)  # the download has begun once its temporary file exists
    assert cache.is_dir() and any(cache.iterdir()), "the download never started"
    t = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 128 + sig, err
    assert time.monotonic() - t < 5.0
    assert f"stopped by {signal.Signals(sig).name} outside the training loop" in err and "Traceback" not in err
    assert not list(cache.iterdir())  # the partial file is removed


def test_kill_x_setup_a_rank_killed_while_starting_ends_the_job(mpi_job):
    job = _job(mpi_job, 2, *LONG)
    deadline = time.monotonic() + 20
    while len(job.ranks()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    job.ranks()[1].kill()
    rc, out, err, seconds = job.finish(BOUND)
    assert rc not in (None, 0) and seconds < BOUND


def test_full_disk_x_setup_a_download_into_a_full_cache_is_a_data_error(small_disk, mnist_dir):
    from pbp_hpc.data.fetch import fetch_mnist
    from pbp_hpc.errors import DataError

    disk = small_disk("64k")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(
        *a, directory=str(mnist_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError, match="No space left on device"):
            fetch_mnist(disk / "cache", [f"http://127.0.0.1:{server.server_address[1]}/"], deadline_s=60)
    finally:
        server.shutdown()
        server.server_close()
    assert [p.name for p in (disk / "cache").iterdir()] == []


# --- training -----------------------------------------------------------------------------------

def test_stop_x_training_a_stopped_rank_is_named_once_and_the_epoch_marked(mpi_job):
    # eval_every=0: the stall lands in a training step (a stall in a pass is the evaluation column's)
    job = _job(mpi_job, 2, *TINY, "--set", "train.epochs=30", "--set", "train.eval_every=0",
               "--set", "parallel.stall_warning_s=1", "--json")
    assert job.wait_for("epoch   0", 60)
    rank1 = job.ranks()[1]
    rank1.suspend()  # SIGSTOP
    assert job.wait_for("pbp_hpc: warning: step", 15)
    time.sleep(1.0)
    rank1.resume()  # SIGCONT
    rc, out, err, _ = job.finish(60)
    assert rc == 0, err
    assert err.count("pbp_hpc: warning: step") == 1 and "for rank 1:" in err
    result = last_json(out)
    assert max(e["stalled_s"] for e in result["epochs"]) > 1.0
    assert sum(e["stalled_s"] > 0 for e in result["epochs"]) == 1


@pytest.mark.parametrize("reducer", ["blocking", "overlap", "shm", "shared_batch"])
def test_stop_x_training_past_the_stall_timeout_the_job_ends_with_its_own_code(mpi_job, reducer):
    job = _job(mpi_job, 2, *LONG, "--set", "train.eval_every=0", "--set", f"parallel.reducer={reducer}",
               "--set", "parallel.stall_warning_s=1",
               "--set", "parallel.stall_timeout_s=3")
    assert job.wait_for("epoch   0", 60)
    job.ranks()[1].suspend()
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == 4, err  # runtime.EXIT_STALLED
    assert "more than parallel.stall_timeout_s 3, for rank 1" in err


def test_signal_x_training_checkpoints_and_stops(mpi_job, tmp_path):
    job = _job(mpi_job, 2, *LONG, "--set", f"checkpoint.path={tmp_path / 'ck.h5'}", "--json")
    assert job.wait_for("epoch   0", 60)
    job.proc.send_signal(signal.SIGTERM)  # to mpiexec, which forwards it
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 0 and last_json(out)["status"] == "checkpointed", err


def test_kill_x_training_is_covered_elsewhere():
    pytest.skip("covered by tests/test_faults.py (a rank SIGKILLed mid-training ends the job within seconds)")


def test_full_disk_x_training_cannot_occur():
    pytest.skip("the training loop writes nothing (checkpoints are the checkpoint column)")


def test_stop_x_training_a_stall_timeout_below_the_warning_ends_the_job_at_the_timeout(mpi_job):
    # the default warning (60 s) is longer than the timeout: the watch must look at the finer one
    job = _job(mpi_job, 2, *LONG, "--set", "train.eval_every=0", "--set", "parallel.stall_timeout_s=2")
    assert job.wait_for("epoch   0", 60)
    job.ranks()[1].suspend()
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == 4, err  # runtime.EXIT_STALLED, well before the 60 s warning
    assert "more than parallel.stall_timeout_s 2" in err


# --- evaluation ---------------------------------------------------------------------------------

def test_signal_x_evaluation_the_final_evaluation_stops_at_once(mpi_job):
    # a test set large enough that the final evaluation takes seconds
    job = _job(mpi_job, 1, *TINY, "--set", "train.epochs=1", "--set", "data.n_test=3000000", "--set", "train.eval_every=0")
    assert job.wait_for("epoch   0", 60)
    time.sleep(0.3)
    t = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 128 + signal.SIGTERM, err
    assert time.monotonic() - t < 10 and "outside the training loop" in err and "test accuracy" not in out


def _stalled_in_first_pass(mpi_job, *extra: str):
    """Rank 1 stops answering in the first validation pass (after epoch 0's 25 steps: global step 24;
    a sixth of the 600 examples is the validation set)."""
    return _job(mpi_job, 2, *TINY, "--set", "train.epochs=2", "--set", "train.eval_every=1",
                "--set", "debug.fail_rank=1", "--set", "debug.stall_evaluation=0",
                "--set", "parallel.stall_warning_s=1", *extra)


def test_stop_x_evaluation_a_stalled_rank_is_named_once_and_the_pass_marked(mpi_job):
    job = _stalled_in_first_pass(mpi_job, "--set", "debug.stall_s=3", "--json")
    rc, out, err, _ = job.finish(60)
    assert rc == 0, err
    assert err.count("pbp_hpc: warning:") == 1, err
    assert "warning: the evaluation after step 24 has waited" in err and "for rank 1:" in err
    passes = last_json(out)["evaluations"]
    assert passes[0]["stalled_s"] > 1.0 and passes[1]["stalled_s"] == 0.0


def test_stop_x_evaluation_past_the_stall_timeout_the_job_ends_with_its_own_code(mpi_job):
    job = _stalled_in_first_pass(mpi_job, "--set", "debug.stall_s=120", "--set", "parallel.stall_timeout_s=3")
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == 4, err  # runtime.EXIT_STALLED
    assert "the evaluation after step 24 waited" in err and "more than parallel.stall_timeout_s 3, for rank 1" in err


# --- checkpoint ---------------------------------------------------------------------------------

def test_full_disk_x_checkpoint_a_clear_message_and_no_partial_file(mpi_job, small_disk):
    disk = small_disk("256k")
    ck = disk / "ck.h5"
    # 40 epochs (~0.1 s each): the disk is full long before the checkpoint at the end (with 3, the
    # run could finish before _fill did, and pass without a full disk)
    job = _job(mpi_job, 2, *TINY, "--set", "train.epochs=40", "--set", f"checkpoint.path={ck}")
    assert job.wait_for("epoch   0", 60)
    _fill(disk)  # the disk fills up during training; the checkpoint comes at the end
    rc, out, err, _ = job.finish(BOUND)
    assert rc not in (None, 0) and f"cannot write checkpoint {ck}: No space left on device" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no temporary file left behind


def test_kill_x_checkpoint_is_covered_elsewhere():
    pytest.skip("tests/test_checkpoint.py: a write that fails midway leaves the previous checkpoint "
                "(temporary file + rename); tests/test_sweep.py kills sweeps at random moments")


# --- results write ------------------------------------------------------------------------------

TINY_BASE = {"data": {"name": "synthetic", "n_train": 240, "n_test": 40}, "model": {"layers": [784, 16, 10]},
             "train": {"epochs": 2, "eval_every": 0, "progress": False}}


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"name": "demo", "base": TINY_BASE,
                                    "axes": {"implementation": ["blas-serial"], "batch_size": [16, 32]}}))
    return path


def test_full_disk_x_results_write_is_a_message_and_the_next_start_records_the_run(tmp_path, monkeypatch, capsys):
    from pbp_hpc import results, sweep
    from pbp_hpc.results import store
    from pbp_hpc.sweep import runner

    res = tmp_path / "r.h5"
    real = store._write_run

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_run", full)
    sw = sweep.expand(_sweep_file(tmp_path))
    stop = sweep.Stop()
    said: list[str] = []
    rc = runner.run_sweep(sw, runner.Options(results=res), stop, say=said.append)
    assert rc == runner.EXIT_NOT_RECORDED
    assert any("but not recorded: cannot record run demo.p0000.r0" in s and "No space left on device" in s for s in said)
    ckpt = sweep.launch.checkpoint_path(res, "demo.p0000.r0")
    assert ckpt.exists()  # kept: the finished run is recorded on the next start
    monkeypatch.setattr(store, "_write_run", real)
    said.clear()
    assert runner.run_sweep(sw, runner.Options(results=res), stop, say=said.append) == 0
    runs = results.read_runs(res)
    assert [r["point"] for r in runs] == [0, 1] and all(r["status"] == "ok" for r in runs)
    log = runner.log_path(res, "demo.p0000.r0").read_text()
    assert "resumed from" in log and "at epoch 2 step 0" in log  # recorded without training again


def test_full_disk_x_results_write_on_a_real_tmpfs(tmp_path, small_disk):
    from pbp_hpc import results
    from pbp_hpc.errors import ResultsError

    disk = small_disk("64k")
    _fill(disk)
    rec = {"sweep": "s", "point": 0, "repetition": 0, "status": "ok", "error": "", "epochs": []}
    with pytest.raises(ResultsError, match="No space left on device"):
        try:
            results.append_run(disk / "r.h5", rec)
        except ResultsError as exc:
            if "No space" not in str(exc):
                pytest.skip(f"the record was refused before writing: {exc}")
            raise
    assert sorted(p.name for p in disk.iterdir() if not p.name.startswith(".")) == ["filler"]


def test_kill_x_results_write_is_covered_elsewhere():
    pytest.skip("tests/test_sweep.py::test_a_sweep_killed_midway_completes_on_rerun_with_every_point_once, "
                "and `make soak` (100+ points, random kills)")


def test_signal_x_results_write_is_the_sweeps_own():
    pytest.skip("the sweep defers SIGUSR1/SIGTERM to after the point's record (tests/test_sweep.py)")


def test_stalled_network_x_other_phases_cannot_occur():
    pytest.skip("only the download uses the network")


# --- the other commands: search_lr and bench, which write no checkpoint -------------------------

_SEARCHING_RUN = """
import sys
from pbp_hpc import search_lr
from pbp_hpc.data import mnist
mnist.resolve_data_dir.__defaults__ = (True, ({url!r},))
sys.exit(search_lr.main(["--grid", "0.1", "--set", "train.progress=false"]))
"""


def _stop_within(proc: subprocess.Popen, sig: int, seconds: float) -> tuple[int, str]:
    """Send sig; (exit code, stderr) once proc has ended, failing if that takes more than `seconds`."""
    t = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=seconds + 10)
    finally:
        proc.kill()
    assert time.monotonic() - t < seconds, f"{time.monotonic() - t:.1f} s to stop"
    return proc.returncode, err


def test_signal_x_setup_search_lr_stops_at_once_during_its_download(tmp_path, drip_url):
    env = {**os.environ, "PBP_HPC_CACHE": str(tmp_path / "cache"), "PBP_HPC_DATA": ""}
    proc = subprocess.Popen([sys.executable, "-c", _SEARCHING_RUN.format(url=drip_url)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (cache.is_dir() and any(cache.iterdir())):
        time.sleep(0.05)
    assert cache.is_dir() and any(cache.iterdir()), "the download never started"
    rc, err = _stop_within(proc, signal.SIGTERM, 5)
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM (a search writes no checkpoint)" in err and "Traceback" not in err


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # ended meanwhile
        return []


def _ranks(job, module: str) -> list:
    return [p for p in job.descendants() if _cmdline(p)[:1] == [sys.executable] and module in _cmdline(p)]


def _busy(ranks: list, cpu_s: float) -> bool:
    """Two ranks, each past cpu_s seconds of CPU time."""
    import psutil

    try:
        return len(ranks) == 2 and all(sum(p.cpu_times()[:2]) > cpu_s for p in ranks)
    except psutil.Error:
        return False


def test_signal_x_training_search_lr_stops_at_once_and_writes_no_checkpoint(mpi_job):
    # a search cannot resume: a stop in one of its trainings ends it, rather than checkpoint and go on
    job = mpi_job([MPIEXEC, "-n", "2", sys.executable, "-m", "pbp_hpc.search_lr", "--grid", "0.1", "0.5", *LONG])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _busy(_ranks(job, "pbp_hpc.search_lr"), cpu_s=1.5):
        time.sleep(0.1)  # imports and setup take under a second of CPU: past 1.5 s the ranks are training
    assert _busy(_ranks(job, "pbp_hpc.search_lr"), cpu_s=1.5), "the search never started training"
    job.proc.send_signal(signal.SIGTERM)  # to mpiexec, which forwards it
    t = time.monotonic()
    rc, out, err, _ = job.finish(BOUND)
    assert rc == 128 + signal.SIGTERM, err
    assert time.monotonic() - t < 15 and "stopped by SIGTERM (a search writes no checkpoint)" in err
    assert not list(job.out_path.parent.glob("*.h5"))


def test_signal_x_setup_bench_stops_at_once_with_its_worker_job(tmp_path):
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "pbp_hpc.bench", "--smoke", "--no-torch", "--no-jax", "--no-typed",
                             "--cores", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    seen: list = []

    def ranks() -> list:
        return [p for p in seen if _cmdline(p)[:1] == [sys.executable] and "--worker" in _cmdline(p)]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(ranks()) < 2:
        try:
            seen = parent.children(recursive=True)  # mpiexec, its proxy, the worker's ranks
        except psutil.Error:
            break
        time.sleep(0.05)
    try:
        assert len(ranks()) == 2, "the worker job never started"
        time.sleep(1.0)  # the ranks are in their setup (MPI, the SGEMM peak)
        rc, err = _stop_within(proc, signal.SIGTERM, 10)
        assert rc == 128 + signal.SIGTERM, err
        assert "pbp_hpc.bench: stopped by SIGTERM" in err and "Traceback" not in err
        time.sleep(0.5)
        left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"outlived the bench: {[' '.join(p.cmdline()) for p in left]}"
    finally:
        for p in [*seen, parent]:
            try:
                p.kill()
            except psutil.Error:
                pass


# --- an error on some ranks, per phase (debug.fail_phase: pbp_hpc/faults.py) ------------------
# Every error that can arise on one rank alone is either checked collectively up front (exit 2
# on every rank) or aborts the world (exit 1): no rank is left waiting in a collective.

PHASES = [  # (phase, failing rank, fail_kind, the exit code on every rank)
    ("setup", 1, "exception", 1),
    ("evaluation", 1, "oserror", 1),
    ("writes", 0, "exception", 2),  # the writer's own error (the model's or the checkpoint's): raised on every rank
    ("writes", 1, "oserror", 1),
]


@pytest.mark.parametrize("phase,rank,kind,code", PHASES, ids=[f"{p}-rank{r}-{k}" for p, r, k, _ in PHASES])
def test_error_x_phase_a_failure_on_one_rank_ends_the_job(mpi_job, tmp_path, phase, rank, kind, code):
    job = _job(mpi_job, 2, *TINY, "--set", "train.epochs=1", "--set", f"train.save_model={tmp_path / 'm.h5'}",
               "--set", f"debug.fail_phase={phase}", "--set", f"debug.fail_rank={rank}", "--set", f"debug.fail_kind={kind}")
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == code, err
    assert f"in {phase} (debug.fail_phase)" in err


def test_config_x_writes_a_model_path_under_a_regular_file_is_refused_before_training(mpi_job, tmp_path):
    (tmp_path / "FILE").write_text("not a directory")
    job = _job(mpi_job, 2, *TINY, "--set", f"train.save_model={tmp_path / 'FILE' / 'model.h5'}")
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == 2, err
    assert f"{tmp_path / 'FILE'} is a file, not a directory" in err and "epoch" not in out
    assert "Traceback" not in err


def test_signal_x_writes_a_rank_waiting_for_rank_0s_write_stops_at_once(mpi_job, tmp_path):
    # rank 0 takes 120 s to write the model; rank 1 waits for it and gets SIGTERM: it must answer
    # it at once (a blocking MPI wait never returned to Python, so it was ignored until the write ended)
    job = _job(mpi_job, 2, *TINY, "--set", "train.epochs=1", "--set", f"train.save_model={tmp_path / 'm.h5'}",
               "--set", "debug.fail_phase=writes", "--set", "debug.fail_rank=0", "--set", "debug.fail_kind=stall",
               "--set", "debug.stall_s=120")
    assert job.wait_for("test accuracy", 60), job.finish(1)[2]
    time.sleep(0.5)
    job.ranks()[1].send_signal(signal.SIGTERM)
    rc, out, err, seconds = job.finish(BOUND)
    assert rc == 128 + signal.SIGTERM, err
    assert "rank 1 of 2 stopped by SIGTERM outside the training loop" in err
