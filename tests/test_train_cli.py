"""`mpiexec -n P python -m pbp_hpc.train` as a user runs it: output, JSON, data lookup, errors."""

import pytest

from helpers import TINY, run_cmd, last_json

EPOCH_KEYS = {"epoch", "loss", "val_accuracy", "time_s", "compute_s", "comm_s", "wait_s", "other_s", "gflops"}


def test_two_rank_mnist_run_prints_epochs_once_and_a_json_result(mnist_dir):
    p = run_cmd(["pbp_hpc.train", "--config", "configs/quickstart.yaml", "--data-dir", str(mnist_dir), *TINY,
                 "--set", "data.n_train=3000", "--set", "train.epochs=2", "--set", "train.learning_rate=2.0", "--json"], ranks=2)
    assert p.returncode == 0, p.stderr
    res = last_json(p.stdout)
    assert {"config", "ranks", "threads_per_rank", "test_accuracy", "total_time_s", "epochs"} <= res.keys()
    assert res["ranks"] == 2 and res["threads_per_rank"] >= 1
    assert len(res["epochs"]) == 2 and all(EPOCH_KEYS <= e.keys() for e in res["epochs"])
    assert 0.5 < res["test_accuracy"] <= 1.0  # a fraction, and the tiny net does learn
    assert res["config"]["model"]["layers"] == [784, 16, 10]
    assert p.stderr.count("epoch   1 ") == 1  # rank 0 alone logs (to stderr with --json)
    assert len(p.stdout.strip().splitlines()) == 1  # stdout holds the JSON object alone


def test_human_output_goes_to_stdout_from_rank_0_only(mnist_dir):
    p = run_cmd(["pbp_hpc.train", "--config", "configs/quickstart.yaml", "--data-dir", str(mnist_dir), *TINY,
                 "--set", "data.n_train=1200", "--set", "train.epochs=1"], ranks=3)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("epoch   0 ") == 1 and p.stdout.count("test accuracy") == 1
    assert "GFLOP/s" in p.stdout and "val_acc" in p.stdout


def test_data_directory_from_the_environment(mnist_dir):
    p = run_cmd(["pbp_hpc.train", "--config", "configs/quickstart.yaml", *TINY, "--set", "data.n_train=600",
                 "--set", "train.epochs=1", "--json"], env={"PBP_HPC_DATA": str(mnist_dir)})
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["status"] == "ok"


def test_missing_data_names_the_files_and_where_they_were_looked_for(tmp_path):
    p = run_cmd(["pbp_hpc.train", "--data-dir", str(tmp_path), *TINY], ranks=2)
    assert p.returncode == 2
    assert "train-images-idx3-ubyte" in p.stderr and str(tmp_path) in p.stderr
    assert p.stderr.count("pbp_hpc: error") == 1  # printed once, not by every rank
    assert "Traceback" not in p.stderr


def test_a_misspelt_key_stops_every_rank_before_work_with_one_message():
    p = run_cmd(["pbp_hpc.train", "--set", "train.learning_rat=1"], ranks=2)
    assert p.returncode == 2
    assert p.stderr.count("did you mean 'train.learning_rate'") == 1


def test_synthetic_data_any_rank_count_and_a_batch_that_does_not_divide():
    p = run_cmd(["pbp_hpc.train", "--config", "configs/synthetic.yaml", *TINY, "--set", "data.n_train=900",
                 "--set", "train.batch_size=50", "--set", "train.epochs=2", "--json"], ranks=3)
    assert p.returncode == 0, p.stderr
    res = last_json(p.stdout)
    assert res["ranks"] == 3 and res["epochs"][-1]["loss"] < res["epochs"][0]["loss"]


def test_stochastic_gradient_descent_is_batch_size_one():
    p = run_cmd(["pbp_hpc.train", "--config", "configs/synthetic.yaml", *TINY, "--set", "data.n_train=60",
                 "--set", "train.batch_size=1", "--set", "train.epochs=1", "--json"], ranks=2)
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout)["epochs"][0]["examples"] == 50


def test_learning_rate_search_picks_the_best_validation_accuracy():
    p = run_cmd(["pbp_hpc.search_lr", "--config", "configs/synthetic.yaml", *TINY, "--set", "data.n_train=1200",
                 "--set", "train.epochs=2", "--set", "train.batch_size=32", "--grid", "0.001", "0.1", "1.0", "--json"], ranks=2)
    assert p.returncode == 0, p.stderr
    res = last_json(p.stdout)
    assert [t["learning_rate"] for t in res["trials"]] == [0.001, 0.1, 1.0]
    best = max(res["trials"], key=lambda t: t["val_accuracy"])
    assert res["best_learning_rate"] == best["learning_rate"] and res["test_accuracy"] == best["test_accuracy"]
    assert p.stdout.count("best_learning_rate") == 1
