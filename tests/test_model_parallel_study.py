"""The model-parallel study: jobs/model_parallel.yaml's points, and a tiny study run end to end
(sweep -> HDF5 -> analyze's table naming the fastest -> the figure), its bytes as recorded."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import h5py
import pytest
import yaml

from pbp_hpc import results, sweep
from pbp_hpc.analyze import model_parallel
from pbp_hpc.analyze.cli import main as analyze_main
from pbp_hpc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_file_has_six_parallelisms_per_network_and_batch_with_its_epoch_sizes():
    sw = sweep.expand(ROOT / "jobs/model_parallel.yaml")
    by: dict[tuple[str, int], set] = defaultdict(set)
    for p in sw.points:
        par = p.config["parallel"]
        by[(p.network, p.batch_size)].add((p.ranks, p.threads, par["tensor"], par["pipeline"],
                                           par["microbatches"] if par["pipeline"] > 1 else None))
        assert p.config["data"]["n_train"] == {1: 2400, 16: 6000, 128: 12000, 1024: 24000}[p.batch_size]
    assert sorted(by) == [(n, b) for n in ("net1h", "net2h") for b in (1, 16, 128, 1024)]
    for (network, batch), shapes in by.items():
        m = {1: 1, 16: 4}.get(batch, 8)
        assert shapes == {(1, 1, 1, 1, None), (1, 2, 1, 1, None), (2, 1, 1, 1, None), (2, 1, 2, 1, None),
                          (2, 1, 1, 2, m), (4, 1, 2, 1, None)}, (network, batch)
    assert len(sw.points) == 48 and sw.spec.oversubscribe


def test_batch_set_must_name_a_batch_of_the_axes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": "configs/synthetic.yaml", "batch_set": {64: {"data.n_train": 600}},
                                    "axes": {"implementation": ["blas-serial"], "batch_size": [32]}}))
    with pytest.raises(ConfigError, match="batch_set names batch 64, which axes.batch_size does not hold"):
        sweep.expand(path)
    path.write_text(yaml.safe_dump({"name": "bad", "base": "configs/synthetic.yaml", "batch_set": {32: {"parallel.ranks": 2}},
                                    "axes": {"implementation": ["blas-serial"], "batch_size": [32]}}))
    with pytest.raises(ConfigError, match="batch_set.32 sets parallel.ranks, which the sweep controls"):
        sweep.expand(path)


TINY_STUDY = {
    "name": "mp_tiny",
    "base": {"data": {"name": "synthetic", "n_train": 240, "n_test": 40},
             "model": {"layers": [784, 12, 10], "activation": "sigmoid", "loss": "mse"},
             "train": {"epochs": 2, "learning_rate": 0.1, "eval_every": 0, "progress": False}},
    "batch_set": {32: {"data.n_train": 480}},
    "variants": {"data": {}, "tensor": {"parallel.tensor": 2}},
    "warmup_epochs": 1, "oversubscribe": True, "measure_network": False, "timeout_s": 120,
    "axes": {"implementation": ["blas-serial", "hybrid"], "batch_size": [8, 32], "ranks": [1, 2],
             "variant": ["data", "tensor"]},
    "where": [{"implementation": "blas-serial", "variant": "data"}, {"implementation": "hybrid", "variant": "tensor"}],
}


def test_a_tiny_study_runs_from_the_sweep_to_the_table_and_the_figure(tmp_path, capsys):
    job = tmp_path / "mp_tiny.yaml"
    job.write_text(yaml.safe_dump(TINY_STUDY))
    res = tmp_path / "mp.h5"
    assert sweep.main([str(job), "--results", str(res)]) == 0
    records = results.read_runs([str(res)])
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for r in records:  # the grid and the bytes, as attributes of their own
        tensor = r["ranks"] == 2
        assert r["grid"] == {"data": 1, "tensor": 2 if tensor else 1, "pipeline": 1}
        assert (r["bytes_per_step"]["activations"] > 0) == tensor and r["bytes_per_step"]["gradients"] == 0
    with h5py.File(res) as f:
        g = f["runs"][records[0]["key"]]
        assert "grid_tensor" in g.attrs and "bytes_activations" in g.attrs and "grid" not in g.attrs["extra"]

    capsys.readouterr()
    assert analyze_main([str(res), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "Parallelism inside the network: [784, 12, 10] (float32)" in out
    assert "B=8: fastest " in out and "B=32: fastest " in out
    assert (tmp_path / "plots" / "model_parallel_vs_batch.png").stat().st_size > 0

    rows = model_parallel.rows(records)  # the table's bytes are the records' counts
    assert {(r["batch_size"], r["parallelism"]) for r in rows} == {(b, p) for b in (8, 32) for p in ("1 rank", "tensor 2")}
    for row in rows:
        rec = next(r for r in records if r["batch_size"] == row["batch_size"] and r["ranks"] == row["ranks"])
        assert row["bytes_activations"] == rec["bytes_per_step"]["activations"]
        assert row["bytes_gradients"] == rec["bytes_per_step"]["gradients"]
        assert row["examples"] == {8: 200, 32: 400}[row["batch_size"]]
        if row["parallelism"] == "tensor 2":
            assert f"{row['bytes_activations']:,.0f}" in out
    assert sum(r["fastest"] for r in rows) == 2  # one per batch
