"""Loose values, round 3: strict booleans, upper bounds on keys that feed a sleep, an allocation
or a count, a resume under another strategy named as such, and no numpy warnings on the way to a
clean exit 3. (The stall watch at the finer of warning/timeout: tests/test_fault_matrix.py.)
"""

from __future__ import annotations

import sys

import pytest
from mpi4py import MPI

from helpers import MPIEXEC
from pbp_hpc import config, train
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.errors import ConfigError


@pytest.mark.parametrize("value", ["yes", "off", "true", 0, 1])
def test_one_copy_per_node_takes_only_true_false_or_auto(value):
    with pytest.raises(ConfigError, match=r"data\.one_copy_per_node: expected true, false or auto"):
        config.from_dict({"data": {"one_copy_per_node": value}}, "test")


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_one_copy_per_node_accepts_its_three_values(value):
    assert config.from_dict({"data": {"one_copy_per_node": value}}, "test").data.one_copy_per_node == value


TOO_BIG = {  # a key that feeds a sleep, an allocation or a count, and a value past its bound
    "study.straggler_factor": "1e300",  # was: OverflowError (timestamp out of range) in the first slowed step
    "parallel.stall_timeout_s": "1e20",
    "parallel.stall_warning_s": "1e12",
    "debug.stall_s": "1e15",
    "parallel.fusion_bytes": str(1 << 40),
    "parallel.meet_every_steps": str(10**12),
    "parallel.staleness_bound": str(10**12),
    "data.n_train": str(10**12),
    "data.n_classes": str(10**9),
    "parallel.threads_per_rank": "100000",
}


@pytest.mark.parametrize("key", TOO_BIG)
def test_a_value_past_its_upper_bound_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: Input should be less than or equal to"):
        config.load(None, [f"{key}={TOO_BIG[key]}"])


def _tiny(tmp_path, **over):
    base = {"model.layers": "[784, 8, 10]", "data.name": "synthetic", "data.n_train": 120, "data.n_test": 20,
            "train.batch_size": 20, "train.epochs": 2, "train.eval_every": 0, "train.progress": "false",
            "checkpoint.path": str(tmp_path / "ck.h5")}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def test_resuming_under_another_strategy_names_both_strategies(tmp_path):
    stopped = train.run(_tiny(tmp_path, parallel__strategy="async_ps", debug__signal_step=3), MPI.COMM_SELF, quiet=True)
    assert stopped["status"] == "checkpointed"
    with pytest.raises(CheckpointError, match="written by a parallel.strategy=async_ps run and this run is "
                                              "parallel.strategy=allreduce"):
        train.run(_tiny(tmp_path, checkpoint__resume="true"), MPI.COMM_SELF, quiet=True)


def test_fp16_with_error_feedback_ends_in_a_clean_exit_3_without_numpy_warnings(mpi_job):
    job = mpi_job([MPIEXEC, "-n", "2", sys.executable, "-m", "pbp_hpc.train", "--set", "data.name=synthetic",
                   "--set", "data.n_train=600", "--set", "model.layers=[784, 16, 10]", "--set", "train.batch_size=20",
                   "--set", "train.epochs=2", "--set", "train.progress=false", "--set", "parallel.reducer=blocking",
                   "--set", "parallel.compression=fp16", "--set", "parallel.error_feedback=true",
                   "--set", "train.learning_rate=1e5", "--set", "optimizer.name=sgd", "-q"])
    rc, out, err, _ = job.finish(60)
    assert rc == 3, err
    assert "training diverged" in err and "Warning" not in err, err
