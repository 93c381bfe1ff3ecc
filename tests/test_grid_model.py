"""The alpha-beta model of a grid (analyze/gridmodel.py, parallel/volumes.py) as a specification:
its message volumes are the bytes real runs count, its times follow the stated formulas, and its
projection chooses the split the arithmetic says (tensor where there are few examples to share
and a big gradient, data where there are many and the network is fast)."""

from __future__ import annotations

import math

import pytest
import yaml

from pbp_hpc import results, sweep
from pbp_hpc.analyze import grid_projection, gridmodel
from pbp_hpc.analyze.cli import main as analyze_main
from pbp_hpc.analyze.perfmodel import AlphaBeta
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import volumes

NET2H = [784, 1024, 1024, 10]
FLAT = gridmodel.Rate.of({1: 100e-6})  # 100 us an example at any batch


def family_of_best(B: int, P: int, ab: AlphaBeta, sizes: list[int] = NET2H) -> str:
    return gridmodel.family(gridmodel.project(sizes, P, B, 50_000, 4, FLAT, ab)[0].grid)


def test_one_rank_is_predicted_at_its_measured_time():
    rate = gridmodel.Rate.of({16: 50e-6, 128: 30e-6})
    e = gridmodel.epoch_seconds([784, 1024, 10], (1, 1, 1), 128, 1, 1024, 4, rate, AlphaBeta(1e-6, 1e-9, "given"))
    assert e["total"] == pytest.approx(1024 * 30e-6) and e["data"] == e["tensor"] == e["pipeline"] == 0
    assert rate(16) == pytest.approx(50e-6) and 30e-6 < rate(64) < 50e-6 and rate(4096) == pytest.approx(30e-6)


def test_a_pipeline_pays_its_bubble_and_two_messages_per_microbatch_and_cut():
    ab = AlphaBeta(2e-6, 1e-9, "given")
    sizes, M, B = [784, 1024, 10], 4, 64  # stages: layer 0 | layer 1; one cut 1024 wide
    step = gridmodel.step_seconds(sizes, (1, 1, 2), B, M, 4, FLAT, ab)
    m, share = B // M, 784 * 1024 / (784 * 1024 + 1024 * 10)
    assert step["compute"] == pytest.approx((M + 2 - 1) * m * share * 100e-6)
    message = 2e-6 + m * 1024 * 4 * 1e-9
    extras = 2 * 1 * 2e-6 + 2 * (1 / 2) * volumes.EXTRAS * 4 * 1e-9  # the loss and stop flags' Allreduce over 2
    assert step["pipeline"] == pytest.approx(2 * (M + 2 - 2) * message + extras)
    assert step["data"] == step["tensor"] == 0


def test_the_data_group_reduces_a_shard_and_the_tensor_group_its_activations():
    ab = AlphaBeta(2e-6, 1e-9, "given")
    step = gridmodel.step_seconds(NET2H, (4, 2, 1), 64, 1, 4, FLAT, ab)
    shard = volumes.gradient_values(NET2H, 2)
    assert step["data"] == pytest.approx(2 * 2 * 2e-6 + 2 * 3 / 4 * shard * 4 * 1e-9)
    rows = 16  # 64 / 4 data ranks; one forward Allreduce of rows x 1024 + the stop flag
    assert step["tensor"] == pytest.approx(2 * 1 * 2e-6 + 2 * (1 / 2) * (rows * 1024 + 1) * 4 * 1e-9)


def test_the_projection_splits_the_units_at_small_batch_on_a_large_model():
    slow = AlphaBeta(5e-6, 1e-9, "1 GB/s")
    for B in (1, 16, 128):
        assert family_of_best(B, 8, slow) == "tensor", B
    fast = AlphaBeta(1e-6, 1e-12, "1 TB/s")
    assert family_of_best(1, 8, fast) == "tensor"  # one example: data parallelism has nothing to share


def test_with_a_fast_network_the_projection_shares_the_examples_at_large_batch():
    fast = AlphaBeta(1e-6, 1e-12, "1 TB/s")
    assert family_of_best(1024, 8, fast) == "data"  # equal work a rank; the replicated last layer tips it
    slow = AlphaBeta(5e-6, 1e-9, "1 GB/s")  # the whole gradient a step costs more than B x 1024 activations
    assert family_of_best(1024, 8, slow) == "tensor"


def test_grids_are_named_as_data_x_tensor_x_pipeline_and_bad_ones_are_refused(capsys):
    assert grid_projection.parse_grid("4x2x1") == ((4, 2, 1), None)
    assert grid_projection.parse_grid("8x1x2:16") == ((8, 1, 2), 16)
    for bad, why in (("4x2", "expected DATAxTENSORxPIPELINE"), ("2x2x2", "tensor and pipeline together"),
                     ("0x1x1", "expected")):
        with pytest.raises(ConfigError, match=why):
            grid_projection.parse_grid(bad)
    assert analyze_main(["nonexistent.json", "--grid", "2x2x2"]) == 2
    assert "--grid '2x2x2': tensor and pipeline together are not built" in capsys.readouterr().err


SMALL = [784, 12, 9, 10]  # three layers, units that do not divide by 2: a pair and a replicated last layer
TINY_STUDY = {
    "name": "grid_model_tiny",
    "base": {"data": {"name": "synthetic", "n_train": 240, "n_test": 40},
             "model": {"layers": SMALL, "activation": "sigmoid", "loss": "mse"},
             "train": {"epochs": 2, "learning_rate": 0.1, "eval_every": 0, "progress": False}},
    "variants": {"data": {"parallel.reducer": "blocking"}, "tensor": {"parallel.tensor": 2},
                 "pipeline": {"parallel.pipeline": 2, "parallel.microbatches": 3}},
    "warmup_epochs": 1, "oversubscribe": True, "measure_network": False, "timeout_s": 120,
    "axes": {"implementation": ["blas-serial", "hybrid"], "batch_size": [7], "ranks": [1, 2],
             "variant": ["data", "tensor", "pipeline"]},
    "where": [{"implementation": "blas-serial", "variant": "data"}, {"implementation": "hybrid"}],
}


def test_real_runs_send_exactly_the_bytes_the_model_predicts(tmp_path, capsys):
    """1 rank, data 2 (blocking), tensor 2 and pipeline 2 (M = 3) at batch 7 over 200 examples
    (28 full batches and one of 4; data ranks of 3 and 4 rows): the counted bytes a step, mean
    over the steps, are the model's to the last byte."""
    job = tmp_path / "tiny.yaml"
    job.write_text(yaml.safe_dump(TINY_STUDY))
    res = tmp_path / "tiny.h5"
    assert sweep.main([str(job), "--results", str(res)]) == 0
    records = results.read_runs([str(res)])
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    grids = set()
    for r in records:
        g = (r["grid"]["data"], r["grid"]["tensor"], r["grid"]["pipeline"])
        grids.add(g)
        model = volumes.mean_bytes_per_step(SMALL, g, 7, 200, 4)
        assert r["bytes_per_step"] == {k: pytest.approx(v, rel=1e-12, abs=0) for k, v in model.items()}, g
    assert grids == {(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)}
    by = {g: next(r for r in records if (r["grid"]["data"], r["grid"]["tensor"], r["grid"]["pipeline"]) == g)["bytes_per_step"]
          for g in grids}
    # tensor 2: one Allreduce of n x 9 partial sums + the stop flag a step (layers col, row, full)
    assert by[(1, 2, 1)]["activations"] == pytest.approx((28 * 2 * 32 * 4 + 2 * 19 * 4) / 29)
    assert by[(1, 1, 2)]["activations"] == pytest.approx(200 * 12 * 4 / 29)  # stage 0 (layer 0) sends n x 12 up
    assert by[(2, 1, 1)]["gradients"] == 2 * math.ceil((volumes.model.Layout(SMALL).n_params + 3) / 2) * 4
    assert by[(1, 1, 1)] == {"activations": 0, "gradients": 0}

    capsys.readouterr()
    assert analyze_main([str(res), "--alpha", "2e-6", "--beta", "1e-9", "--max-ranks", "16", "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "plots" / "model_parallel_projection.png").stat().st_size > 0
    assert "bytes per step: 8 of 8 counted volumes" in out and "differs" not in out and "WARNING: the counted" not in out
    assert "Projection to a cluster: [784, 12, 9, 10] (float32)" in out and "B=7: least time " in out
    assert analyze_main([str(res), "--alpha", "2e-6", "--beta", "1e-9", "--grid", "2x2x1", "--grid", "4x1x1"]) == 0
    out = capsys.readouterr().out
    assert " *" in out.split("Projection to a cluster")[1]


def _record(grid: tuple[int, int, int], activations: float) -> dict:
    D, T, S = grid
    return {"status": "ok", "ranks": D * T * S, "batch_size": 8, "grid": {"data": D, "tensor": T, "pipeline": S},
            "config": {"model": {"layers": [784, 12, 10]}, "train": {"batch_size": 8}},
            "bytes_per_step": {"activations": activations, "gradients": 0}, "epochs": [{"time_s": 1.0, "examples": 80}]}


def test_without_a_one_rank_run_there_is_no_model_and_a_warning_says_why():
    ab = AlphaBeta(1e-6, 1e-9, "given")
    (table,) = grid_projection.tables([_record((1, 2, 1), 328)], ab, ab, 64)
    assert not table.rows and table.notes[0].startswith("WARNING: no grid model: no ok 1-rank, 1-thread run")


def test_a_count_that_differs_from_the_models_volumes_is_a_warning():
    ab = AlphaBeta(1e-6, 1e-9, "given")
    right = 2 * math.ceil((8 * 10 + 1) / 2) * 4  # tensor 2: one Allreduce of 8 x 10 + the stop flag
    for sent, warned in ((right, False), (right + 4, True)):
        (model,) = (t for t in grid_projection.tables([_record((1, 1, 1), 0), _record((1, 2, 1), sent)], ab, ab, 64)
                    if t.name == "model_parallel_model")
        assert any(n.startswith("WARNING: the counted bytes a step differ") and "B=8 tensor 2" in n
                   for n in model.notes) == warned
