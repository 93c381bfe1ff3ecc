"""Files that lie, round 3: model files (evaluate), results files (analyze, results show/merge)
and damaged gzip members are refused with one line naming the file and the field, before any
large read, never with a traceback. (tests/test_file_fuzz.py mutates the same formats at random.)
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from test_hostile_inputs import bounded
from test_results import old_record, record, write_v1
from pbp_hpc import config, evaluate, model_file, results
from pbp_hpc.analyze import cli as analyze_cli
from pbp_hpc.data.idx import read_idx, write_idx
from pbp_hpc.engine import model
from pbp_hpc.errors import DataError
from pbp_hpc.results import cli as results_cli

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [16, 4, 3]


def small_model(path: Path) -> Path:
    """A valid model file of a 16-4-3 net (no training needed: the reader is what is tested)."""
    cfg = config.from_dict({"data": {"name": "synthetic", "n_train": 60, "n_test": 20}, "model": {"layers": LAYERS}}, "test")
    theta = np.random.default_rng(0).standard_normal(model.Layout(LAYERS).n_params).astype(np.float32)
    model_file.save(path, theta, cfg.to_dict(), {"best": {"epoch": 1, "step": 8, "val_accuracy": 0.5}})
    return path


def _replace_theta(path: Path, **dataset) -> None:
    with h5py.File(path, "r+") as f:
        del f["theta"]
        f.create_dataset("theta", **dataset)


# --- model files (evaluate) --------------------------------------------------------------------

def test_a_small_model_file_whose_parameters_claim_gibibytes_is_refused_before_reading(tmp_path):
    path = small_model(tmp_path / "m.h5")
    _replace_theta(path, shape=(4_000_000_000,), dtype="f4")  # 16 GB declared, nothing stored
    assert path.stat().st_size < 100_000
    p, seconds = bounded(f"import sys; from pbp_hpc import evaluate; sys.exit(evaluate.main([{str(path)!r}]))")
    assert p.returncode == 2, p.stderr
    assert "field theta" in p.stderr and str(path) in p.stderr and "Traceback" not in p.stderr


BAD_MODELS = {
    "strings": lambda p: _replace_theta(p, data=np.array([b"x"] * model.Layout(LAYERS).n_params)),
    "compound": lambda p: _replace_theta(p, data=np.zeros(model.Layout(LAYERS).n_params, dtype=[("a", "f4"), ("b", "f4")])),
    "float16": lambda p: _replace_theta(p, data=np.zeros(model.Layout(LAYERS).n_params, dtype="f2")),
    "best a string": lambda p: _set_attr(p, "meta", json.dumps({"best": "yesterday"})),
    "best step a float": lambda p: _set_attr(p, "meta", json.dumps({"best": {"step": 2.5}})),
    "meta a list": lambda p: _set_attr(p, "meta", json.dumps([1])),
    "version a string": lambda p: _set_attr(p, "version", "one"),
}


def _set_attr(path: Path, name: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[name] = value


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_a_model_file_of_the_wrong_types_is_refused_naming_the_field(tmp_path, capsys, kind):
    path = small_model(tmp_path / "m.h5")
    BAD_MODELS[kind](path)
    assert evaluate.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pbp_hpc.evaluate: error:") and str(path) in err and "field " in err, err
    assert err.count("\n") == 1


def test_plots_naming_an_existing_file_is_a_clean_error(tmp_path, capsys):
    path = small_model(tmp_path / "m.h5")
    (tmp_path / "figures").write_text("keep me")
    assert evaluate.main([str(path), "--plots", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err
    assert "--plots" in err and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "figures").read_text() == "keep me"


# --- results files (analyze, results show and merge) ------------------------------------------

def _cut_column(path: Path) -> None:
    """A curve column one value shorter than the others (a damaged write, a hand-edited file)."""
    with h5py.File(path, "r+") as f:
        g = next(iter(f["runs"].values()))["evaluations"]
        short = g["val_accuracy"][:-1]
        del g["val_accuracy"]
        g.create_dataset("val_accuracy", data=short)


def _infinite_target_time(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        next(iter(f["runs"].values())).attrs["target_time_s"] = np.inf


BAD_RESULTS = {  # (how to damage a version-2 file, or a version-1 record; the field the message names)
    "curve columns of different lengths": (_cut_column, "evaluations"),
    "an infinite target time": (_infinite_target_time, "target.time_s"),
    "a version-1 string target time": ({"target": {"accuracy": 0.9, "time_s": "soon"}}, "target.time_s"),
    "a version-1 curve of strings": ({"evaluations": [{"step": "8", "val_accuracy": 0.5}]}, "evaluations[0].step"),
}


def _results_file(tmp_path: Path, damage) -> Path:
    path = tmp_path / "r.h5"
    if callable(damage):
        results.append_run(path, record())
        damage(path)
    else:
        write_v1(path, [{**old_record(0), **damage}])
    return path


@pytest.mark.parametrize("kind", BAD_RESULTS)
@pytest.mark.parametrize("command", ["analyze --plots", "results show", "results merge"])
def test_a_results_file_that_lies_is_refused_naming_file_and_field(tmp_path, capsys, kind, command):
    damage, field = BAD_RESULTS[kind]
    path = _results_file(tmp_path, damage)
    if command == "analyze --plots":
        rc = analyze_cli.main([str(path), "--plots", str(tmp_path / "figures")])
    elif command == "results show":
        rc = results_cli.main(["show", str(path)])
    else:
        rc = results_cli.main(["merge", str(path), "-o", str(tmp_path / "merged.h5")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(path) in err and f"field {field}" in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err


# --- damaged gzip members --------------------------------------------------------------------------

def test_a_gzip_member_damaged_in_the_middle_is_named_a_corrupt_gzip_stream(tmp_path):
    images = np.random.default_rng(0).integers(0, 8, (200, 8, 8), dtype=np.uint8)  # compressible, not trivially
    write_idx(tmp_path / "ok", images)
    packed = gzip.compress((tmp_path / "ok").read_bytes(), mtime=0)
    said = set()
    for at in range(20, len(packed) - 8, 17):  # single-byte damages in the deflate data (about 350)
        bad = bytearray(packed)
        bad[at] ^= 0x5A
        (tmp_path / "bad.gz").write_bytes(bytes(bad))
        try:
            read_idx(tmp_path / "bad.gz")
        except DataError as exc:
            said.add(str(exc).replace(str(tmp_path / "bad.gz"), "FILE")[:40])
            continue
        pytest.fail(f"damage at byte {at} was read as data")
    assert not any("trailing bytes" in s or "truncated" in s for s in said), said
