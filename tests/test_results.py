"""The HDF5 results store: what goes in comes out, files merge, and a killed writer loses nothing."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pbp_hpc import results
from pbp_hpc.results import schema, store
from pbp_hpc.errors import ResultsError

ROOT = Path(__file__).resolve().parents[1]


def record(point: int = 0, repetition: int = 0, sweep: str = "demo", status: str = "ok", **over) -> dict:
    """A run record shaped like `train --json` output plus the sweep keys, with values that vary by point."""
    epochs = [
        {"epoch": e, "loss": 1.0 / (e + 1 + point), "val_accuracy": None if e == 0 else 0.5 + e / 10,
         "time_s": 0.25 + e + point / 1000, "compute_s": 0.2, "comm_s": 0.05, "gflops": 12.5 + point,
         "examples": 1000, "partial": e == 0 and point % 2 == 1, "steps_done": 16}
        for e in range(3)
    ]
    # the evaluation curve: 5 passes (every 8 steps of 16 per epoch, none in epoch 0's first half)
    curve = [{"epoch": s // 16, "step": s, "epochs": s / 16, "time_s": 0.2 * s + point / 1000, "wall_s": 0.25 * s,
              "val_accuracy": None if s == 8 else 0.5 + s / 100, "loss": 1.0 / s} for s in (8, 16, 24, 32, 40)]
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
        "train_time_s": 4.0, "eval_time_s": 0.5, "best_val_accuracy": 0.9, "evaluations": curve,
        "target": {"accuracy": 0.85, "reached": True, "val_accuracy": 0.9, "time_s": 8.0, "eval_time_s": 0.5,
                   "wall_s": 10.25, "epochs": 2.5, "steps": 40},
        "ended_early": "target validation accuracy 0.85 reached (0.9000)", "model_path": None,
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
        assert f.attrs["schema"] == "pbp_hpc-results" and f.attrs["schema_version"] == 3
        g = f["runs/demo.p0003.r1"]
        for attr in ("config", "implementation", "network", "batch_size", "ranks", "threads_per_rank", "status", "error",
                     "host", "mpi_library", "blas", "package_version", "git_revision", "warmup_epochs",
                     "flops_per_example", "test_accuracy", "total_time_s", "recorded_at"):
            assert attr in g.attrs, attr
        assert json.loads(g.attrs["config"])["train"]["batch_size"] == 67
        for name in ("epoch", "time_s", "compute_s", "comm_s", "loss", "val_accuracy", "gflops", "examples", "partial"):
            assert g[name].shape == (3,), name
        assert g["val_accuracy"][0] != g["val_accuracy"][0]  # NaN: not evaluated in epoch 0
        assert list(g["partial"][...]) == [1, 0, 0]
        assert list(g["steps_done"][...]) == [16, 16, 16]
        # version 2: the scalars of training to a target, and the curve as its own table
        assert g.attrs["train_time_s"] == 4.0 and g.attrs["eval_time_s"] == 0.5 and g.attrs["best_val_accuracy"] == 0.9
        assert g.attrs["ended_early"].startswith("target validation accuracy") and g.attrs["model_path"] == ""
        assert (g.attrs["target_accuracy"], g.attrs["target_reached"], g.attrs["target_time_s"]) == (0.85, 1, 8.0)
        assert (g.attrs["target_epochs"], g.attrs["target_steps"], g.attrs["target_wall_s"]) == (2.5, 40, 10.25)
        curve = g["evaluations"]
        for name in ("epoch", "step", "epochs", "time_s", "wall_s", "val_accuracy", "loss"):
            assert curve[name].shape == (5,), name
        assert list(curve["step"][...]) == [8, 16, 24, 32, 40] and curve["val_accuracy"][0] != curve["val_accuracy"][0]
        for key in ("target", "evaluations", "train_time_s", "ended_early"):  # stored, so not again in `extra`
            assert key not in json.loads(g.attrs["extra"]), key


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
    monkeypatch.setattr(store, "_read_run", None)  # no epoch is read (that is read_runs' job)
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
        f.attrs["schema_version"] = results.SCHEMA_VERSION + 1
    # a newer file: refused, naming both versions
    both = f"schema version {results.SCHEMA_VERSION + 1}; this pbp_hpc reads version {results.SCHEMA_VERSION} "
    with pytest.raises(ResultsError, match=both):
        results.read_runs([newer])
    with pytest.raises(ResultsError, match=both):
        results.merge([newer], tmp_path / "out.h5")
    with pytest.raises(ResultsError, match=both):
        results.append_run(newer, record(point=1))


def test_an_optional_field_is_one_line_in_the_table_and_old_files_still_read(tmp_path, monkeypatch):
    """The extension rule of pbp_hpc/results/schema.py: an optional field needs no version bump.

    (A file of a newer schema version is refused, naming both versions: the test above.)"""
    stats = {"stalls": 2, "mean_wait_s": 0.5}
    rec = record(strategy_stats=stats, epochs=[dict(e, lr=0.1) for e in record()["epochs"]])
    old = tmp_path / "old.h5"
    results.append_run(old, rec)  # a key the table does not name is kept (in `extra`); an epoch key is not
    results.append_run(old, record(point=1))
    [back, _] = results.read_runs(old)
    assert back["strategy_stats"] == stats and "lr" not in back["epochs"][0]

    # the next work adds them as fields: one row each
    monkeypatch.setattr(schema, "RUN_FIELDS", schema.RUN_FIELDS + (schema.Field("strategy_stats", "json", old_files=None),))
    monkeypatch.setattr(schema, "EPOCH_FIELDS", schema.EPOCH_FIELDS + (schema.Column("lr", "f8", math.nan, old_files=None),))
    new = tmp_path / "new.h5"
    results.append_run(new, rec)
    results.append_run(new, record(point=1))
    with h5py.File(new, "r") as f:
        assert f.attrs["schema_version"] == results.SCHEMA_VERSION
        g = f["runs/demo.p0000.r0"]
        assert json.loads(g.attrs["strategy_stats"]) == stats and "strategy_stats" not in json.loads(g.attrs["extra"])
        assert list(g["lr"][...]) == [0.1, 0.1, 0.1]
    with_field, without = results.read_runs(new)
    assert with_field["strategy_stats"] == stats and [e["lr"] for e in with_field["epochs"]] == [0.1, 0.1, 0.1]
    assert without["strategy_stats"] is None and [e["lr"] for e in without["epochs"]] == [None, None, None]
    for key, value in rec.items():
        assert with_field[key] == value, key
    # a file written before the fields existed reads too: the value it kept in `extra`, else old_files
    kept, lacking = results.read_runs(old)
    assert kept["strategy_stats"] == stats and lacking["strategy_stats"] is None
    assert [e["lr"] for e in kept["epochs"]] == [None, None, None]


def test_a_run_without_a_target_or_curve_and_one_that_missed_its_target_read_back_as_written(tmp_path):
    path = tmp_path / "r.h5"
    plain = record(point=0, target=None, evaluations=[], ended_early=None, train_time_s=None, eval_time_s=None,
                   best_val_accuracy=None)
    missed = record(point=1, ended_early="early stopping: 3 evaluation(s) without a better validation accuracy (best 0.8)",
                    model_path="/scratch/m.h5",
                    target={"accuracy": 0.99, "reached": False, "val_accuracy": None, "time_s": None, "eval_time_s": 0.75,
                            "wall_s": None, "epochs": None, "steps": None})
    bare = {"sweep": "demo", "point": 2, "repetition": 0, "status": "failed", "implementation": "gpu", "error": "boom"}
    for rec in (plain, missed, bare):
        results.append_run(path, rec)
    got = {r["point"]: r for r in results.read_runs(path)}
    for point, rec in ((0, plain), (1, missed)):
        for key, value in rec.items():
            assert got[point][key] == value, (point, key)
    assert got[2]["target"] is None and got[2]["evaluations"] == [] and got[2]["ended_early"] is None
    assert got[2]["train_time_s"] is None and got[2]["model_path"] is None and got[2]["epochs"] == []


# A version-1 file as version-1 code wrote it (docs/results-schema.md before the bump): no curve, no
# steps_done, and every record key its table did not name (train_time_s, target, evaluations, ...) in `extra`.
V1_INT = ("point", "repetition", "batch_size", "ranks", "threads_per_rank", "warmup_epochs", "flops_per_example",
          "n_train", "n_params")
V1_FLOAT = ("test_accuracy", "total_time_s", "median_epoch_time_s")
V1_STR = ("sweep", "implementation", "network", "status", "error", "recorded_at")
V1_PROVENANCE = ("host", "mpi_library", "package_version", "git_revision")
V1_EPOCH = {"epoch": ("i8", -1), "time_s": ("f8", math.nan), "compute_s": ("f8", math.nan), "allreduce_s": ("f8", math.nan),
            "loss": ("f8", math.nan), "val_accuracy": ("f8", math.nan), "gflops": ("f8", math.nan),
            "examples": ("i8", -1), "partial": ("u1", 0)}


V1_NAMES = {"allreduce_s": "comm_s"}  # a v1/v2 dataset -> the record key it holds now


def write_v1(path: Path, records: list[dict]) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"], f.attrs["created_at"] = "pbp_hpc-results", 1, "2026-01-02T03:04:05+00:00"
        runs = f.create_group("runs")
        for rec in records:
            g, prov = runs.create_group(results.record_key(rec)), rec.get("provenance") or {}
            for n in V1_INT:
                g.attrs[n] = np.int64(-1 if rec.get(n) is None else rec[n])
            for n in V1_FLOAT:
                g.attrs[n] = np.float64(math.nan if rec.get(n) is None else rec[n])
            for n in V1_STR:
                g.attrs[n] = "" if rec.get(n) is None else str(rec[n])
            for n in V1_PROVENANCE:
                g.attrs[n] = str(rec.get(n, prov.get(n)) or "")
            g.attrs["config"] = json.dumps(rec.get("config") or {}, sort_keys=True)
            g.attrs["blas"] = json.dumps(rec.get("blas", prov.get("blas", [])))
            g.attrs["provenance"] = json.dumps(prov, sort_keys=True)
            known = set(V1_INT + V1_FLOAT + V1_STR + V1_PROVENANCE) | {"config", "blas", "provenance", "epochs", "key"}
            g.attrs["extra"] = json.dumps({k: v for k, v in rec.items() if k not in known}, sort_keys=True, default=str)
            for n, (dtype, absent) in V1_EPOCH.items():
                g.create_dataset(n, data=np.asarray([absent if e.get(V1_NAMES.get(n, n)) is None else e[V1_NAMES.get(n, n)]
                                                 for e in rec["epochs"]], dtype=dtype))


def old_record(point: int) -> dict:
    """A record of before train printed the curve and the target: what most version-1 files hold."""
    rec = record(point=point, recorded_at="2026-01-02T03:04:05+00:00")
    for key in ("train_time_s", "eval_time_s", "best_val_accuracy", "evaluations", "target", "ended_early", "model_path"):
        del rec[key]
    rec["epochs"] = [{k: v for k, v in e.items() if k != "steps_done"} for e in rec["epochs"]]
    return rec


@pytest.fixture
def v1_file(tmp_path):
    """Point 0: an old record (no curve, no target); point 1: a record of today's train, stored by version-1 code."""
    path = tmp_path / "v1.h5"
    write_v1(path, [old_record(0), record(point=1, recorded_at="2026-01-02T03:04:05+00:00")])
    return path


def test_a_version_1_file_reads_with_an_empty_curve_and_no_target(v1_file):
    old, new = results.read_runs(v1_file)
    for key, value in old_record(0).items():
        if key != "epochs":
            assert old[key] == value, key
    assert old["evaluations"] == [] and old["target"] is None and old["train_time_s"] is None
    assert old["ended_early"] is None and old["best_val_accuracy"] is None
    assert [{k: v for k, v in e.items() if k != "steps_done"} for e in old["epochs"]] == old_record(0)["epochs"]
    assert [e["steps_done"] for e in old["epochs"]] == [None, None, None]  # per-epoch keys v1 did not name were not kept
    # what version-1 code kept in `extra` reads as the new fields: nothing it stored is lost
    for key in ("train_time_s", "eval_time_s", "best_val_accuracy", "evaluations", "target", "ended_early", "model_path"):
        assert new[key] == record(point=1)[key], key
    assert results.statuses(v1_file) == {"demo.p0000.r0": "ok", "demo.p0001.r0": "ok"}
    assert results.identities(v1_file)["demo.p0001.r0"]["batch_size"] == 65


def test_appending_to_a_version_1_file_converts_it_and_loses_nothing(v1_file):
    before = results.read_runs(v1_file)
    results.append_run(v1_file, record(point=2))
    with h5py.File(v1_file, "r") as f:
        assert f.attrs["schema_version"] == results.SCHEMA_VERSION == 3
        assert f.attrs["converted_from_version"] == 1 and f.attrs["created_at"] == "2026-01-02T03:04:05+00:00"
        for key in ("demo.p0000.r0", "demo.p0001.r0", "demo.p0002.r0"):  # every group is a version-2 group now
            assert "evaluations" in f["runs"][key] and "train_time_s" in f["runs"][key].attrs
        assert f["runs/demo.p0001.r0/evaluations/step"].shape == (5,)
        assert "target" not in json.loads(f["runs/demo.p0001.r0"].attrs["extra"])
    after = results.read_runs(v1_file)
    assert after[:2] == before  # the converted runs read exactly as they did
    assert {k: after[2][k] for k in record(point=2)} == record(point=2)
    assert [p.name for p in v1_file.parent.iterdir() if p.suffix == ".tmp"] == []


def test_replacing_a_run_of_a_version_1_file_converts_the_rest(v1_file):
    before = results.read_runs(v1_file)
    results.append_run(v1_file, record(point=0, test_accuracy=0.5), replace=True)
    after = results.read_runs(v1_file)
    assert after[0]["test_accuracy"] == 0.5 and after[1] == before[1]
    with h5py.File(v1_file, "r") as f:
        assert f.attrs["schema_version"] == 3


def test_merge_writes_version_2_from_version_1_and_2_inputs(v1_file, tmp_path):
    v2, out = tmp_path / "v2.h5", tmp_path / "merged.h5"
    results.append_run(v2, record(point=7))
    results.append_run(v2, old_record(0))  # the same run as in v1_file: not a conflict
    assert results.merge([v1_file, v2], out) == 3
    with h5py.File(out, "r") as f:
        assert f.attrs["schema_version"] == 3 and all("evaluations" in g for g in f["runs"].values())
    assert results.read_runs(out) == results.read_runs([v1_file, v2])
    # an existing version-1 output keeps its runs, converted
    old_out = tmp_path / "old_out.h5"
    write_v1(old_out, [old_record(5)])
    assert results.merge([v2], old_out) == 3
    assert [r["point"] for r in results.read_runs(old_out)] == [0, 5, 7]


def test_show_lists_the_time_to_target(v1_file, tmp_path):
    path = tmp_path / "r.h5"
    results.append_run(path, record(point=0))
    results.append_run(path, record(point=1, target={"accuracy": 0.99, "reached": False}))
    results.append_run(path, record(point=2, target=None))
    lines = results.show_lines(results.read_runs(path))
    assert "to_target" in lines[0]
    assert "8s@0.85" in lines[1] and "not@0.99" in lines[2] and "@" not in lines[3]
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.results", "show", str(v1_file)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 3, p.stderr


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
