"""The PyTorch runner computes what pbp_hpc computes: same data, order, start, loss and update.

In float64 the two differ only in the order of floating-point operations inside the GEMMs
and reductions, ~1e-15 relative after a few steps; we allow 1e-9.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install torch): the framework runner needs it")

from mpi4py import MPI  # noqa: E402

from pbp_hpc import config
from pbp_hpc import framework
from pbp_hpc import train  # noqa: E402
from helpers import REPORT_SETUP

JSON_KEYS = {"status", "config", "ranks", "threads_per_rank", "test_accuracy", "total_time_s", "n_train", "n_params",
             "flops_per_example", "warmup_epochs", "median_epoch_time_s", "epochs", "provenance"}
EPOCH_KEYS = {"epoch", "loss", "val_accuracy", "time_s", "compute_s", "comm_s", "wait_s", "other_s", "gflops", "examples", "partial"}


def tiny(**over):
    base = {**REPORT_SETUP, "model.layers": "[784, 12, 7, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 60, "data.n_test": 20, "train.epochs": 2, "train.batch_size": 8,
            "train.learning_rate": 0.5, "train.eval_every": 0, "train.progress": "false",
            "parallel.threads_per_rank": 1}
    base.update({k: str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("batch", [1, 8, 13])  # 13 leaves a short last batch (50 training examples)
def test_parameters_after_training_equal_pbp_hpc_in_float64(batch):
    cfg = tiny(**{"train.batch_size": batch})
    ours = train.run(cfg, MPI.COMM_SELF, return_params=True)
    theirs = framework.run(cfg, return_params=True)
    assert not np.array_equal(ours["params"], framework.model.glorot_uniform(
        framework.model.Layout(cfg.model.layers), cfg.train.seed, "float64")), "training must have moved the parameters"
    np.testing.assert_allclose(theirs["params"], ours["params"], rtol=0, atol=1e-9)
    assert len(theirs["epochs"]) == len(ours["epochs"]) == cfg.train.epochs  # no pair left out by zip
    for a, b in zip(theirs["epochs"], ours["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    assert theirs["test_accuracy"] == ours["test_accuracy"]


OPTIMIZED = {  # each beside plain SGD: momentum and nesterov with weight decay, a schedule with warm-up
    "momentum-cosine": {"optimizer.name": "momentum", "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-3,
                        "schedule.name": "cosine", "schedule.warmup_epochs": 0.5, "schedule.min_lr": 0.01},
    "nesterov-cosine": {"optimizer.name": "nesterov", "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-3,
                        "schedule.name": "cosine", "schedule.warmup_epochs": 0.5},
    "nesterov-relu-ce": {"optimizer.name": "nesterov", "optimizer.momentum": 0.8, "optimizer.weight_decay": 5e-4,
                         "schedule.name": "cosine", "schedule.warmup_epochs": 1, "model.activation": "relu",
                         "model.loss": "cross_entropy"},
    "sgd-decay-step": {"optimizer.weight_decay": 1e-2, "schedule.name": "step", "schedule.step_epochs": 1,
                       "schedule.gamma": 0.5, "schedule.scale_with_batch": "true", "schedule.base_batch": 26,
                       "schedule.warmup_epochs": 0.5},
    "nesterov-momentum-0": {"optimizer.name": "nesterov", "optimizer.momentum": 0.0},  # torch refuses it: plain SGD
}


@pytest.mark.parametrize("case", list(OPTIMIZED))
def test_optimizers_and_schedules_equal_pbp_hpc_in_float64(case):
    """torch.optim.SGD(momentum, nesterov, weight_decay) on the mean gradient, the learning rate
    set per step from the schedule: pbp_hpc's optimizers are PyTorch's form. Batches of 13 leave a
    short last batch, where a summed-gradient formulation would scale the momentum wrongly."""
    cfg = tiny(**{"train.batch_size": 13, "train.epochs": 3, **OPTIMIZED[case]})
    ours = train.run(cfg, MPI.COMM_SELF, return_params=True)
    theirs = framework.run(cfg, return_params=True)
    np.testing.assert_allclose(theirs["params"], ours["params"], rtol=0, atol=1e-10)
    assert len(theirs["epochs"]) == len(ours["epochs"]) == cfg.train.epochs
    for a, b in zip(theirs["epochs"], ours["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
    assert theirs["test_accuracy"] == ours["test_accuracy"]


def test_the_optimizer_is_torch_sgd_with_the_configs_settings():
    layout = framework.model.Layout([5, 4, 3])
    cfg = tiny(**{"optimizer.name": "nesterov", "optimizer.momentum": 0.7, "optimizer.weight_decay": 0.01})
    net, opt = framework.build(torch, cfg, layout)
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (0.7, True, 0.01, 0)
    assert framework.make_optimizer(torch, net, tiny(**{"optimizer.name": "sgd"})).param_groups[0]["momentum"] == 0


@pytest.mark.parametrize("act,loss,modules", [("sigmoid", "mse", ["Linear", "Sigmoid"] * 2),
                                              ("tanh", "cross_entropy", ["Linear", "Tanh", "Linear"]),
                                              ("relu", "mse", ["Linear", "ReLU"] * 2)])
def test_the_network_has_the_configs_activation_and_a_linear_output_for_cross_entropy(act, loss, modules):
    layout = framework.model.Layout([5, 4, 3])
    net = framework.build_network(torch, layout, framework.model.glorot_uniform(layout, 0, "float64"), act, loss)
    assert [type(m).__name__ for m in net] == modules


def test_layout_round_trip_keeps_parameters_bit_for_bit():
    layout = framework.model.Layout([5, 4, 3])
    theta = framework.model.glorot_uniform(layout, 3, "float64")
    theta[layout.b_slices[0]] = [1, 2, 3, 4]  # nonzero biases, so a bias mix-up would show
    net = framework.build_network(torch, layout, theta)
    np.testing.assert_array_equal(framework.flat_parameters(net, layout), theta)


def test_multi_rank_request_is_refused():
    with pytest.raises(framework.WorldSizeError, match="single process"):
        framework.run(tiny(**{"parallel.ranks": 2}))


def test_cli_prints_train_shaped_json():
    args = ["--set", "data.name=synthetic", "--set", "model.layers=[784,8,10]", "--set", "data.n_train=60",
            "--set", "data.n_test=12", "--set", "train.epochs=2", "--set", "train.batch_size=16",
            "--set", "parallel.threads_per_rank=1", "--json", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "pbp_hpc.framework", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert JSON_KEYS <= set(out)
    assert out["status"] == "ok" and out["ranks"] == 1 and out["threads_per_rank"] == 1
    assert len(out["epochs"]) == 2 and all(EPOCH_KEYS <= set(e) for e in out["epochs"])
    assert all(e["comm_s"] == 0.0 and e["examples"] == 50 for e in out["epochs"])
    assert out["provenance"]["framework"]["name"] == "torch"
    assert out["provenance"]["framework"]["num_threads"] == 1
    assert "UserWarning" not in proc.stderr


def test_cli_without_torch_says_how_to_install_and_exits_2(tmp_path):
    # A torch package that fails to import stands in for a machine without PyTorch.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pbp_hpc import framework; "
            "sys.exit(framework.main(['--set', 'data.name=synthetic']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install torch" in proc.stderr
