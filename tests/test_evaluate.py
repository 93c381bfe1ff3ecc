"""`python -m pbp_hpc.evaluate`: a saved model classifies the test set as training measured it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pbp_hpc import config, evaluate, model_file, train
from pbp_hpc.data.idx import write_idx
from pbp_hpc.engine import model

ROOT = Path(__file__).resolve().parents[1]


def trained(tmp_path: Path, name: str = "m.h5", **over) -> tuple[Path, dict]:
    """A small model trained on synthetic data, saved by train.save_model; the run's record.

    One validation pass, after the last epoch: the saved (best) parameters are the final ones,
    on which the run measured its test accuracy."""
    path = tmp_path / name
    cfg = {"data": {"name": "synthetic", "n_train": 1200, "n_test": 300, "noise": 0.6}, "model": {"layers": [784, 16, 10]},
           "train": {"epochs": 2, "batch_size": 50, "learning_rate": 1.0, "eval_every": 0, "progress": False,
                     "save_model": str(path)}, "parallel": {"threads_per_rank": 1}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    run = train.run(config.from_dict(cfg, "test"), MPI.COMM_SELF, quiet=True)
    assert run["model_path"] == str(path) and path.is_file()
    return path, run


def idx_set(directory: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """A 4x4-pixel IDX data set of 10 classes (16 features per example)."""
    rng = np.random.default_rng(1)
    directory.mkdir()
    write_idx(directory / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8))
    write_idx(directory / "train-labels-idx1-ubyte", (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8))
    return directory


def test_the_numbers_agree_with_the_run_that_saved_the_model(tmp_path):
    path, run = trained(tmp_path)
    out = evaluate.evaluate(path)
    assert out["examples"] == 300 and out["data_name"] == "synthetic" and out["layers"] == [784, 16, 10]
    assert out["accuracy"] == pytest.approx(run["test_accuracy"], abs=1e-12)
    m = np.array(out["confusion_matrix"])
    assert m.shape == (10, 10) and m.sum() == 300 and np.trace(m) == round(run["test_accuracy"] * 300)
    assert out["class_counts"] == m.sum(axis=1).tolist()
    for c, acc in enumerate(out["per_class_accuracy"]):
        assert acc == pytest.approx(m[c, c] / m[c].sum())
    assert out["best"]["step"] == run["evaluations"][-1]["step"]  # the pass the model was saved at


def test_the_model_is_the_best_validation_pass_not_the_last(tmp_path):
    """With early stopping at a target the saved parameters are those of the pass that reached it."""
    path, run = trained(tmp_path, train={"epochs": 4, "eval_every_steps": 5, "target_accuracy": 0.3})
    assert run["target"]["reached"] and run["ended_early"]
    theta, cfg, meta = evaluate.load_model(path)
    assert meta["best"]["step"] == run["target"]["steps"] and meta["best"]["val_accuracy"] == run["target"]["val_accuracy"]
    assert evaluate.evaluate(path)["accuracy"] == pytest.approx(run["test_accuracy"])  # it stopped right there


def test_text_json_and_plot_from_the_command_line(tmp_path, capsys):
    path, run = trained(tmp_path)
    assert evaluate.main([str(path), "--plots", str(tmp_path / "fig")]) == 0
    text = capsys.readouterr().out
    assert f"test accuracy: {100 * run['test_accuracy']:.2f}%" in text
    assert "per-class accuracy:" in text and "confusion matrix (rows: true class, columns: predicted class):" in text
    assert text.count("  class ") == 10
    png = tmp_path / "fig" / "confusion_m.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert evaluate.main([str(path), "--json", "--n-test", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 100 and len(out["per_class_accuracy"]) == 10


def test_an_idx_model_is_tested_on_its_own_files_or_on_another_copy(tmp_path):
    data = idx_set(tmp_path / "data")
    path, run = trained(tmp_path, data={"name": "idx", "dir": str(data), "n_train": None, "n_test": None},
                        model={"layers": [16, 8, 10]}, train={"batch_size": 10})
    out = evaluate.evaluate(path)
    assert out["examples"] == 20 and out["accuracy"] == pytest.approx(run["test_accuracy"]) and out["data"] == str(data)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in data.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert evaluate.evaluate(path, data_dir=str(copy))["data"] == str(copy)
    (data / "t10k-labels-idx1-ubyte").unlink()  # the config's files are gone: a clear error, exit 2
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.evaluate", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "t10k-labels" in p.stderr and "Traceback" not in p.stderr


def test_a_model_that_does_not_fit_the_data_is_refused(tmp_path, capsys):
    data = idx_set(tmp_path / "data")
    path, _ = trained(tmp_path)  # 784 inputs, synthetic
    assert evaluate.main([str(path), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"model {path} takes 784 inputs but" in err and "16 features per example" in err and "Traceback" not in err
    # 16 inputs but 3 outputs, for data of 10 classes
    cfg = config.from_dict({"data": {"name": "idx", "dir": str(data)}, "model": {"layers": [16, 4, 3]}}, "test")
    small = tmp_path / "three.h5"
    model_file.save(small, np.zeros(model.Layout([16, 4, 3]).n_params, dtype=np.float32), cfg.to_dict(), {"best": None})
    assert evaluate.main([str(small)]) == 2
    err = capsys.readouterr().err
    assert f"model {small} has 3 outputs but" in err and "10 classes" in err


@pytest.mark.parametrize("kind", ["not hdf5", "a results file", "wrong parameter count", "bad config", "missing"])
def test_a_corrupt_or_foreign_file_is_refused_with_exit_2(tmp_path, kind):
    bad = tmp_path / "bad.h5"
    if kind == "not hdf5":
        bad.write_bytes(b"\x89HDF but not really" * 10)
    elif kind == "a results file":
        with h5py.File(bad, "w") as f:
            f.attrs["schema"] = "pbp_hpc-results"
            f.create_group("runs")
    elif kind == "wrong parameter count":
        good, _ = trained(tmp_path)
        theta, cfg, meta = model_file.load(good)
        model_file.save(bad, theta[:-5], cfg, meta)
    elif kind == "bad config":
        model_file.save(bad, np.zeros(10, dtype=np.float32), {"model": {"layerz": [3, 2]}}, {})
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.evaluate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("pbp_hpc.evaluate: error:") and str(bad) in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(model_file.ModelFileError):
        evaluate.load_model(bad)


def test_a_checkpoint_is_evaluated_as_the_model_of_where_the_run_stopped(tmp_path):
    """slurm/train.sh leaves a checkpoint: its parameters are a model, its stored settings the config."""
    ckpt = tmp_path / "ck.h5"
    path, run = trained(tmp_path, checkpoint={"path": str(ckpt)})
    out = evaluate.evaluate(ckpt)
    assert out["accuracy"] == pytest.approx(run["test_accuracy"], abs=1e-12)  # one pass, at the end: the same parameters
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.evaluate", str(ckpt)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "a checkpoint: the parameters at epoch 2, step 0" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("kind, said", [("results", "is a results file (what sweeps record; python -m pbp_hpc.analyze reads it)"),
                                        ("yaml", "is a YAML config (a run's settings, not its parameters)"),
                                        ("random", "is not an HDF5 file")])
def test_a_wrong_file_gets_one_line_naming_the_file_expected(tmp_path, kind, said):
    bad = tmp_path / ("run.yaml" if kind == "yaml" else "file.h5")
    if kind == "results":
        with h5py.File(bad, "w") as f:
            f.attrs["schema"] = "pbp_hpc-results"
    elif kind == "yaml":
        bad.write_text((ROOT / "configs" / "mnist_net1h.yaml").read_text())
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    p = subprocess.run([sys.executable, "-m", "pbp_hpc.evaluate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (f"pbp_hpc.evaluate: error: {bad} {said}; expected a model file written by train.save_model "
                        "(e.g. --set train.save_model=model.h5) or a checkpoint\n")
