"""Tensor and pipeline parallelism on one grid: each pipeline stage's layers split over its tensor group.

Serially: what the grid accepts, refuses and considers. A 4-rank job (tensor 2 x pipeline 2, on
two emulated nodes) runs tests/compose_program.py: small float64 problems, 24 steps, GPipe and
1F1B, against the 1-rank run on every rank, the bytes counted against the formula, and
checkpoints resumed across grid shapes; an 8-rank job (data 2 x tensor 2 x pipeline 2) runs
tests/nodes_program.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import MPIEXEC, ROOT, last_json
from pbp_hpc.engine.layout import put, take
from pbp_hpc.engine.model import Layout
from pbp_hpc.engine.tensor_layout import ShardLayout
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import grid_auto, pipeline
from pbp_hpc.parallel.reducers import EXTRAS
from pbp_hpc.parallel.reducers.compression import allreduce_bytes
from test_tensor import DEEP, ODD, RELU_CE_NESTEROV, SIGMOID_MSE_SGD, cfg_of


def test_a_tensor_by_pipeline_grid_is_accepted_and_a_stage_too_narrow_for_its_tensor_group_is_refused():
    cfg_of(SIGMOID_MSE_SGD, parallel__tensor=2, parallel__pipeline=2)
    narrow = cfg_of(SIGMOID_MSE_SGD, model__layers="[20, 17, 13, 2, 5]", parallel__tensor=3, parallel__pipeline=2,
                    parallel__pipeline_split="[2, 2]")
    with pytest.raises(ConfigError, match="parallel.tensor is 3 but model.layers splits layer 2 over 2 unit"):
        pipeline.check(narrow, 6)  # stage 1 (layers 2, 3): layer 2's 2 output units over 3 ranks
    with pytest.raises(ConfigError, match="splits layer 3 over 5 unit"):  # a forced split of the last stage's output
        pipeline.check(cfg_of(SIGMOID_MSE_SGD, model__layers="[20, 17, 13, 9, 5]", parallel__tensor=6,
                              parallel__pipeline=2, parallel__pipeline_split="[3, 1]", parallel__tensor_output="split"), 12)


def test_the_parts_of_a_grid_split_both_ways_assemble_the_whole_model():
    sizes, T = json.loads(DEEP), 2
    stages = pipeline.split_layers(sizes, 2, [2, 2])
    whole = np.random.default_rng(0).standard_normal(Layout(sizes).n_params)
    out, held = np.full_like(whole, np.nan), np.zeros(whole.shape[0], dtype=bool)
    for s, (lo, hi) in enumerate(stages):
        for t in range(T):
            lay = pipeline.stage_layout(sizes, stages, s, ShardLayout(sizes[lo:hi + 1], T, t).held.parts)
            assert lay.n_params == ShardLayout(sizes[lo:hi + 1], T, t).n_params  # the stage shard's own buffer
            part = np.empty(lay.n_params)
            take(lay, whole, part)
            put(lay, part, out)
            put(lay, np.ones(lay.n_params, dtype=bool), held)
    assert held.all()
    np.testing.assert_array_equal(out, whole)


def test_grid_auto_considers_tensor_by_pipeline_grids(monkeypatch):
    assert grid_auto.candidates(4, [784, 1024, 1024, 10], True) == [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]
    # Net-2h on a network of 1 ms latency, the GEMMs' measured time fixed (a loaded machine's is noisy):
    # tensor x pipeline sends fewer, smaller messages than data 4
    monkeypatch.setattr(grid_auto, "first_layer_seconds", lambda sizes, rows, T, dtype: 1e-4 * rows / 16 / T)
    data, both = (grid_auto.predict([784, 1024, 1024, 10], 16, g, 4, 4, 1e-3, 1e-8, "float32") for g in [(4, 1, 1), (1, 2, 2)])
    assert both < data


def test_tensor_2_by_pipeline_2_computes_the_one_rank_parameters_and_resumes_across_shapes(tmp_path):
    launcher = [MPIEXEC, "-n", "4", "-ppn", "2", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
    cases = [  # stage 0 one replicated layer | stage 1 col, row, replicated
             {"model.layers": DEEP, "parallel.microbatches": 3, "parallel.tensor_output": "replicated"},
             # stage 0 one split layer (its output gathered and sent whole) | stage 1 col, row, split
             {"model.layers": DEEP, "parallel.microbatches": 2, "parallel.tensor_output": "split"},
             # stage 0 col, row | stage 1 a split output layer alone (its input gradient completed over the group)
             {"model.layers": ODD, "parallel.pipeline_split": "[2, 1]", "parallel.microbatches": 2,
              "parallel.tensor_output": "split", **RELU_CE_NESTEROV},
             # col, row | col, row (stage 1's input gradient completed over the group); resumed across shapes
             {"model.layers": DEEP, "parallel.pipeline_split": "[2, 2]", "parallel.microbatches": 3, **RELU_CE_NESTEROV}]
    cmd = [*launcher, sys.executable, str(ROOT / "tests" / "compose_program.py"), str(tmp_path), *map(json.dumps, cases)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = last_json(res.stdout)
    layouts = [[["full"], ["full"], ["col", "row", "full"], ["col", "row", "full"]],
               [["out"], ["out"], ["col", "row", "out"], ["col", "row", "out"]],
               [["col", "row"], ["col", "row"], ["out"], ["out"]],
               [["col", "row"]] * 4]
    for case, kinds in zip(out["cases"], layouts):
        assert case["rel_diff"] < 1e-10, case
        assert case["identical_on_all_ranks"] and case["gpipe_is_1f1b"] in (True, None), case
        assert case["loss_rel_diff"] < 1e-10 and case["same_test_accuracy"] and case["steps"] == 24, case
        assert case["same_val_accuracies"] and case["saved_model_rel_diff"] < 1e-10, case  # one whole model
        assert case["grid"] == {"data": 1, "tensor": 2, "pipeline": 2}
        assert case["tensor_layout"] == kinds, case  # world rank (s * T + t)
        # every step has 5 rows: the bytes counted in the steps are the formula's
        sizes = json.loads(case["set"]["model.layers"])
        split = pipeline.split_layers(sizes, 2, json.loads(case["set"].get("parallel.pipeline_split", "null")))
        expected = [pipeline.expected_activation_bytes(sizes, split, s, 2, t, case["set"].get("parallel.tensor_output") == "split",
                                                       5, case["set"]["parallel.microbatches"], 8)
                    for s in range(2) for t in range(2)]
        assert case["activation_bytes"] == expected, case
        assert case["header"][0].startswith("pbp_hpc: grid data 1 x tensor 2 x pipeline 2 (stage 0: layers 0..")
    assert out["cases"][-1]["gpipe_is_1f1b"] is True
    assert "stage 0: the odd last layer is split by columns (an Allgather of B x 17 a step" in out["cases"][1]["header"][0]
    assert "stage 1: the odd last layer is split by columns (an Allgather of B x 5 and an Allreduce of B x 13" in out["cases"][2]["header"][0]
    r = out["resume"]
    assert r["grid_to_one_rel_diff"] < 1e-12 and r["one_to_grid_rel_diff"] < 1e-12, r
    assert r["grid_to_grid_bit_for_bit"] and r["identical_on_all_ranks"], r


def test_data_2_by_tensor_2_by_pipeline_2_sums_each_shard_over_its_data_group_only():
    """8 ranks on two emulated nodes: each (stage, tensor rank)'s shard summed over its data group of 2."""
    launcher = [MPIEXEC, "-n", "8", "-ppn", "4", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
    case = {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.microbatches": 2, "model.layers": DEEP,
            "parallel.pipeline_split": "[2, 2]", **RELU_CE_NESTEROV}
    cmd = [*launcher, sys.executable, str(ROOT / "tests" / "nodes_program.py"), json.dumps(case)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    (out,) = last_json(res.stdout)["cases"]
    assert out["rel_diff"] < 1e-10 and out["identical_on_all_ranks"], out
    sizes = json.loads(DEEP)
    shard = ShardLayout(sizes[0:3], 2, 0)  # world rank 0: stage 0, tensor rank 0
    assert out["wire_bytes_per_step"] == allreduce_bytes(2, shard.n_params + EXTRAS, 8)
