"""The HDF5 results store: what goes in comes out, files merge, and a killed writer loses nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from pbp_hpc import results
from pbp_hpc.errors import ResultsError

ROOT = Path(__file__).resolve().parents[1]


def record(point: int = 0, repetition: int = 0, sweep: str = "demo", status: str = "ok", **over) -> dict:
    """A run record shaped like `train --json` output plus the sweep keys, with values that vary by point."""
    epochs = [
        {"epoch": e, "loss": 1.0 / (e + 1 + point), "val_accuracy": None if e == 0 else 0.5 + e / 10,
         "time_s": 0.25 + e + point / 1000, "compute_s": 0.2, "allreduce_s": 0.05, "gflops": 12.5 + point,
         "examples": 1000, "partial": e == 0 and point % 2 == 1}
        for e in range(3)
    ]
    rec = {
        "status": status, "config": {"model": {"layers": [784, 16, 10]}, "train": {"batch_size": 64 + point}},
        "ranks": 2, "threads_per_rank": 1, "test_accuracy": 0.875, "total_time_s": 4.5, "n_train": 1000,
        "n_params": 12730, "flops_per_example": 51136, "warmup_epochs": 1, "median_epoch_time_s": 1.75,
        "epochs": epochs,
        "provenance": {"host": "node7", "platform": "Linux", "cpu": "x86_64", "cores": 2, "python": "3.11",
                       "package_version": "0.1.0", "git_revision": "abc123", "mpi_library": "MPICH Version: 4.2",
                       "blas": [{"internal_api": "openblas", "num_threads": "1"}], "env": {}},
        "sweep": sweep, "point": point, "repetition": repetition, "implementation": "hybrid",
        "network": "[784, 16, 10]", "batch_size": 64 + point, "error": "",
    }
    rec.update(over)
    return rec


def test_a_record_reads_back_as_it_was_written(tmp_path):
    path = tmp_path / "r.h5"
    rec = record()
    results.append_run(path, rec)
    [back] = results.read_runs([path])
    for key, value in rec.items():
        assert back[key] == value, key
    assert back["key"] == "demo.p0000.r0"
    # the provenance is also flattened, for analyses that group by host or MPI library
    assert (back["host"], back["mpi_library"], back["git_revision"]) == ("node7", "MPICH Version: 4.2", "abc123")
    assert back["blas"] == rec["provenance"]["blas"]
    assert back["recorded_at"].startswith("20")


def test_the_file_follows_the_documented_schema(tmp_path):
    path = tmp_path / "r.h5"
    results.append_run(path, record(point=3, repetition=1))
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "pbp_hpc-results" and f.attrs["schema_version"] == 1
        g = f["runs/demo.p0003.r1"]
        for attr in ("config", "implementation", "network", "batch_size", "ranks", "threads_per_rank", "status", "error",
                     "host", "mpi_library", "blas", "package_version", "git_revision", "warmup_epochs",
                     "flops_per_example", "test_accuracy", "total_time_s", "recorded_at"):
            assert attr in g.attrs, attr
        assert json.loads(g.attrs["config"])["train"]["batch_size"] == 67
        for name in ("epoch", "time_s", "compute_s", "allreduce_s", "loss", "val_accuracy", "gflops", "examples", "partial"):
            assert g[name].shape == (3,), name
        assert g["val_accuracy"][0] != g["val_accuracy"][0]  # NaN: not evaluated in epoch 0
        assert list(g["partial"][...]) == [1, 0, 0]


def test_a_failed_run_without_epochs_or_accuracy_is_stored(tmp_path):
    path = tmp_path / "r.h5"
    results.append_run(path, record(status="failed", epochs=[], test_accuracy=None, error="exit code 1\nboom"))
    [back] = results.read_runs(path)
    assert back["status"] == "failed" and back["epochs"] == [] and back["test_accuracy"] is None
    assert back["error"].endswith("boom")


def test_records_of_several_files_are_read_together_in_key_order(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for p in (2, 0):
        results.append_run(a, record(point=p))
    results.append_run(b, record(point=1))
    assert [r["point"] for r in results.read_runs([a, b])] == [0, 1, 2]


def test_identities_are_what_each_run_was_read_from_attributes_only(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    assert results.identities(path) == {}
    results.append_run(path, record(point=2))
    results.append_run(path, {"sweep": "demo", "point": 5, "repetition": 0, "status": "failed",
                              "implementation": "blas-serial", "error": "boom"})
    monkeypatch.setattr(results, "_read_run", None)  # no epoch is read (that is read_runs' job)
    ids = results.identities(path)
    assert ids["demo.p0002.r0"] == {"sweep": "demo", "point": 2, "repetition": 0, "implementation": "hybrid",
                                    "network": "[784, 16, 10]", "batch_size": 66, "ranks": 2, "threads_per_rank": 1,
                                    "warmup_epochs": 1, "status": "ok",
                                    "config": {"model": {"layers": [784, 16, 10]}, "train": {"batch_size": 66}}}
    bare = ids["demo.p0005.r0"]
    assert bare["config"] == {} and bare["batch_size"] is None and bare["ranks"] is None and bare["network"] == ""
    assert {k: v["status"] for k, v in ids.items()} == results.statuses(path)


def test_appending_a_recorded_key_is_refused_unless_replacing(tmp_path):
    path = tmp_path / "r.h5"
    results.append_run(path, record(status="failed", epochs=[], error="boom"))
    with pytest.raises(ResultsError, match="already holds run demo.p0000.r0"):
        results.append_run(path, record())
    results.append_run(path, record(), replace=True)
    runs = results.read_runs(path)
    assert len(runs) == 1 and runs[0]["status"] == "ok"


def test_merge_combines_files_and_keeps_identical_duplicates_once(tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "all.h5"
    results.append_run(a, record(point=0))
    results.append_run(b, record(point=1))
    for f in (a, b):  # the same run reached both files (e.g. a copied file): not a conflict
        results.append_run(f, record(point=5, recorded_at="2025-01-01T00:00:00+00:00"))
    assert results.merge([a, b], out) == 3
    assert [r["key"] for r in results.read_runs(out)] == ["demo.p0000.r0", "demo.p0001.r0", "demo.p0005.r0"]
    assert results.read_runs(out) == results.read_runs([a, b])
    # merging into an existing output keeps what it has and adds the new runs
    c = tmp_path / "c.h5"
    results.append_run(c, record(point=9))
    assert results.merge([c], out) == 4


def test_merging_again_takes_a_rerun_point_from_the_inputs(tmp_path):
    """merged.h5 is derived: a point that failed, was retried and merged again ends up ok."""
    a, out = tmp_path / "point-0.h5", tmp_path / "merged.h5"
    results.append_run(a, record(point=0, status="failed", epochs=[], error="boom"))
    results.append_run(tmp_path / "point-1.h5", record(point=1))
    results.merge([a, tmp_path / "point-1.h5"], out)
    results.append_run(a, record(point=0), replace=True)  # sweep --retry-failed
    assert results.merge([a], out) == 2
    assert [r["status"] for r in results.read_runs(out)] == ["ok", "ok"]
    assert results.merge([a], out, overwrite=True) == 1


def test_merge_refuses_a_key_whose_runs_differ_and_writes_nothing(tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "all.h5"
    results.append_run(a, record(point=0))
    results.append_run(b, record(point=0, test_accuracy=0.5))
    with pytest.raises(ResultsError, match="demo.p0000.r0"):
        results.merge([a, b], out)
    assert not out.exists()


def test_merge_and_show_from_the_command_line(tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "all.h5"
    results.append_run(a, record(point=0))
    results.append_run(b, record(point=1, status="failed", epochs=[], error="exit code 1\nInjectedFault: boom"))
    py = [sys.executable, "-m", "pbp_hpc.results"]
    p = subprocess.run([*py, "merge", str(a), str(b), "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "2 runs" in p.stdout
    p = subprocess.run([*py, "show", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3  # a header and one line per run
    assert "demo.p0000.r0" in lines[1] and "ok" in lines[1] and "hybrid" in lines[1]
    assert "failed" in lines[2] and "InjectedFault: boom" in lines[2]


def test_a_file_that_is_not_hdf5_is_a_results_error(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("not HDF5")
    with pytest.raises(ResultsError, match="not a readable HDF5 file"):
        results.read_runs([bad])
    with pytest.raises(ResultsError):
        results.append_run(bad, record())
    assert bad.read_text() == "not HDF5"  # and it is left alone
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.results", "show", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_another_schema_or_version_is_a_results_error(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1, 2])
    with pytest.raises(ResultsError, match="not a pbp_hpc results file"):
        results.read_runs([other])
    newer = tmp_path / "newer.h5"
    results.append_run(newer, record())
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(ResultsError, match="schema version 2"):
        results.read_runs([newer])
    with pytest.raises(ResultsError, match="schema version 2"):
        results.merge([newer], tmp_path / "out.h5")


# A writer that appends copies of a template run with increasing point numbers, printing each once recorded.
WRITER = """
import json, sys
from pbp_hpc import results

path, start, template = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
for point in range(start, start + 100000):
    results.append_run(path, dict(template, point=point))
    print(point, flush=True)
"""


def test_a_writer_killed_at_random_moments_never_loses_a_recorded_run(tmp_path):
    path = tmp_path / "runs.h5"
    template = record()
    rng = random.Random(1234)
    confirmed: set[int] = set()
    for _ in range(10):
        start = len(results.statuses(path))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start), json.dumps(template)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        # wait for the first append (the interpreter and h5py take a while to start), then kill at a random moment
        first = proc.stdout.readline()
        assert first.strip(), "the writer did not start"
        confirmed.add(int(first))
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        confirmed.update(int(line) for line in rest.split())
        runs = results.read_runs(path)  # the file opens and reads after every kill
        points = [r["point"] for r in runs]
        assert points == list(range(len(points))), "runs are contiguous: none lost, none duplicated"
        assert confirmed <= set(points), "every run confirmed before the kill is still there"
        for r in runs:
            assert {k: r[k] for k in template} == dict(template, point=r["point"])
    assert len(confirmed) >= 10
    results.append_run(path, dict(template, point=len(results.statuses(path))))  # cleans up killed writers' temp files
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_appending_stays_cheap_for_hundreds_of_runs(tmp_path):
    """Copy-on-write copies the whole file per append; at a few hundred runs the file is ~4 MB."""
    path = tmp_path / "r.h5"
    for point in range(100):
        results.append_run(path, record(point=point))
    assert os.path.getsize(path) < 100 * 20_000  # ~12 KB per run (3 epochs): no copy-on-write bloat
    assert len(results.statuses(path)) == 100
