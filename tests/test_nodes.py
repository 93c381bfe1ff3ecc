"""Several nodes, emulated on one machine: MPICH's launcher places ranks on "hosts" that are all
this machine (`-hosts localhost,127.0.0.1 -launcher fork`), and MPI_COMM_TYPE_SHARED splits them
by host, so the hierarchical paths (node windows, then an Allreduce across nodes), the per-node
thread choice and binding, and the node checks run as they would on a cluster. Each launch runs
tests/nodes_program.py, which compares every case with a 1-rank run on each rank."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import MPIEXEC, ROOT, last_json, run_cmd

TWO_NODES = [MPIEXEC, "-n", "4", "-ppn", "2", "-hosts", "localhost,127.0.0.1", "-launcher", "fork"]
UNEQUAL = [MPIEXEC, "-n", "4", "-hosts", "localhost:3,127.0.0.1:1", "-launcher", "fork"]  # 3 ranks + 1
FLOAT64 = 1e-12  # the sums are added in another order than in one rank's GEMM: rounding only


def launch(launcher: list[str], *cases: dict) -> list[dict]:
    import subprocess

    cmd = [*launcher, sys.executable, str(ROOT / "tests" / "nodes_program.py"), *map(json.dumps, cases)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return last_json(res.stdout)["cases"]


@pytest.fixture(scope="module")
def two_nodes() -> list[dict]:
    return launch(TWO_NODES, {"parallel.reducer": "blocking"}, {"parallel.reducer": "overlap"},
                  {"parallel.reducer": "overlap", "parallel.fusion_bytes": 2000}, {"parallel.reducer": "auto"},
                  {"parallel.compression": "fp16"}, {"parallel.reducer": "overlap", "parallel.compression": "bf16"},
                  {"parallel.reducer": "overlap", "parallel.compression": "bf16", "parallel.error_feedback": "true"},
                  {"parallel.reducer": "shared_batch"}, {"parallel.reducer": "shared_batch", "parallel.compression": "bf16"},
                  {"parallel.reducer": "shm"})


def test_every_reducer_on_two_nodes_equals_one_rank(two_nodes):
    for case in two_nodes[:4]:
        assert case["rel_diff"] < FLOAT64, case["set"]
        assert case["identical_on_all_ranks"], case["set"]


def test_auto_takes_the_hierarchical_shared_memory_path_and_sends_only_across_nodes(two_nodes):
    blocking, auto = two_nodes[0], two_nodes[3]
    # batch 10 on 4 ranks: 3 rows per rank, so each node's ranks compute their rows together
    assert auto["reducer_reason"] == ("auto: 2 ranks share each node's memory and, at 3 rows of the batch per rank "
                                      "(<= 64), compute each batch together, then an Allreduce across 2 nodes")
    # 2 nodes x 2 ranks: a rank's slice is half the buffer, and an Allreduce of it between 2 nodes
    # sends it once (n/2), where the Allreduce over 4 ranks sends 2 * 3/4 n
    assert auto["wire_bytes_per_step"] * 3 == pytest.approx(blocking["wire_bytes_per_step"], rel=1e-2)


def test_threads_and_binding_are_chosen_per_node(two_nodes):
    binding = two_nodes[0]["binding"]
    assert binding["how"].startswith("bound by pbp_hpc") or "oversubscribed" in binding["how"]
    assert len(binding["cpus"]) == 2  # rank 0's node: its 2 ranks, not the world's 4


def test_compressed_sums_are_the_same_on_every_rank_and_near_the_full_precision_result(two_nodes):
    fp16, bf16, feedback = two_nodes[4:7]
    for case in (fp16, bf16, feedback):
        assert case["identical_on_all_ranks"], case["set"]
        assert 0 < case["rel_diff"] < 1e-2, case  # rounded on the wire, so not the 1-rank bits
    assert fp16["wire_bytes_per_step"] * 4 == pytest.approx(two_nodes[3]["wire_bytes_per_step"], rel=1e-2)  # 16 of 64 bits
    assert fp16["rel_diff"] < bf16["rel_diff"]  # 11 bits of precision against 8
    assert feedback["rel_diff"] < bf16["rel_diff"] / 2  # what rounding lost is sent the next step


def test_a_batch_shared_within_each_node_is_summed_across_nodes_and_equals_one_rank(two_nodes):
    shared, compressed, shm = two_nodes[7], two_nodes[8], two_nodes[9]
    assert shm["rel_diff"] < FLOAT64 and shm["identical_on_all_ranks"]
    assert shared["rel_diff"] < FLOAT64 and shared["identical_on_all_ranks"]
    # each rank sends its slice of the gradient (half of it) once between the 2 nodes, as shm does
    assert shared["wire_bytes_per_step"] == pytest.approx(shm["wire_bytes_per_step"], rel=1e-2)
    assert compressed["identical_on_all_ranks"] and 0 < compressed["rel_diff"] < 1e-2
    assert compressed["wire_bytes_per_step"] < shared["wire_bytes_per_step"] / 3


def test_unequal_ranks_per_node_auto_falls_back_to_one_allreduce_equal_to_one_rank():
    # One thread per rank on both nodes: with a node's share of the cores (1 thread on the node of
    # 3, 2 on the node of 1), OpenBLAS's threaded axpy rounds the update differently where it
    # splits the buffer between threads, and the lone rank's parameters drift from the others'
    # by an ulp or so (measured: 1e-17 after 24 steps).
    (case,) = launch(UNEQUAL, {"parallel.reducer": "auto", "parallel.threads_per_rank": 1})
    assert case["reducer_reason"] == "auto: unequal ranks per node (1..3), so no even shared-memory split"
    assert case["rel_diff"] < FLOAT64 and case["identical_on_all_ranks"]


@pytest.mark.parametrize("reducer", ["shm", "shared_batch"])
def test_unequal_ranks_per_node_are_refused_by_the_shared_memory_reducers(reducer):
    res = run_cmd(["pbp_hpc.train", "--set", "data.name=synthetic", "--set", "data.n_train=60", "--set", "train.epochs=1",
                   "--set", "model.layers=[784, 8, 10]", "--set", f"parallel.reducer={reducer}", "--set", "train.progress=false"],
                  launcher=UNEQUAL)
    assert res.returncode == 2, res.stderr
    assert f"parallel.reducer={reducer} needs the same number of ranks on every node, got [1, 3]" in res.stderr
    assert res.stderr.count("pbp_hpc: error:") == 1 and "Traceback" not in res.stderr
