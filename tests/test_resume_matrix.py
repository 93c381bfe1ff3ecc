"""The resume matrix: every strategy, stopped mid-epoch and at an epoch's end, resumes what it saved.

For each strategy (allreduce, local_sgd, async_ps, ssp, hogwild) a tiny synthetic run is stopped
by debug.signal_step (a checkpoint is written), then a run of the same config opens it and the
parameters the strategy itself reads first (the MPI windows of async_ps/ssp, the node's array
of hogwild, the flat buffer of the others) are compared, bit for bit, with the checkpoint's.
Then the best model and the evaluation curve are checked to survive a resume.

In-process MPI tests: `mpiexec -n 2 python -m pytest --with-mpi -m mpi tests/test_resume_matrix.py`
(about 20 s on 2 loaded cores; each run is a few dozen steps of a 784-16-10 net; skipped under -n 3).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPORT_SETUP
from pbp_hpc import checkpoint, config, model_file, resume, train
from pbp_hpc.data import datasets

WORLD = MPI.COMM_WORLD
STRATEGIES = ["allreduce", "local_sgd", "async_ps", "ssp", "hogwild"]
STEPS = 12  # 240 examples, batch 20
# where the stop is asked: global step 16 (epoch 1, step 4: a block of 4 steps ends there), and
# the last step of epoch 0 (the epoch is recorded, the checkpoint says epoch 1 step 0)
WHERE = {"mid-epoch": 16, "epoch end": STEPS - 1}


def shared_dir() -> Path:
    """One directory every rank names (rank 0's). The matrix runs at 2 ranks only: its cost is the
    CI budget's, and 3 asynchronous workers add no path a resume takes that 2 do not."""
    if WORLD.size != 2:
        pytest.skip("the resume matrix runs under mpiexec -n 2")
    d = Path(WORLD.bcast(tempfile.mkdtemp(prefix="pbp_hpc-resume-") if WORLD.rank == 0 else None))
    if WORLD.rank == 0:
        atexit.register(shutil.rmtree, d, True)
    return d


def cfg_of(directory: Path, **over: object) -> config.Config:
    base = {**REPORT_SETUP, "model.layers": "[784, 16, 10]", "model.dtype": "float64", "data.name": "synthetic",
            "data.n_train": 288, "data.n_test": 40, "train.batch_size": 20, "train.epochs": 3,
            "train.learning_rate": 0.5, "train.eval_every": 1, "train.progress": "false",
            "parallel.meet_every_steps": 4, "parallel.local_steps": 2, "checkpoint.path": str(directory / "ck.h5")}
    base.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return config.load(None, [f"{k}={v}" for k, v in base.items()])


def first_read(cfg: config.Config) -> np.ndarray:
    """Open the checkpoint as a resumed run does, and return what the strategy reads first."""
    directory = datasets.resolve_data(cfg, WORLD)
    data = datasets.load(cfg, WORLD.size, directory, WORLD)
    with train.State(cfg, WORLD, np, data) as st:
        resume.try_resume(st, lambda s: None)
        out = np.empty_like(st.theta)
        store = getattr(st.strategy, "store", None)
        if store is not None:  # async_ps, ssp: every read goes to the windows
            store.read(out)
        else:
            out[...] = st.theta
        return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_parameters_a_strategy_reads_after_a_resume_are_the_checkpoints(strategy, where):
    d = shared_dir()
    stopped = train.run(cfg_of(d, parallel__strategy=strategy, debug__signal_step=WHERE[where]), WORLD)
    assert stopped["status"] == "checkpointed"
    if where == "epoch end":
        assert stopped["stopped_at"] == {"epoch": 1, "step": 0}
    saved = WORLD.bcast(checkpoint.load(d / "ck.h5")["theta"] if WORLD.rank == 0 else None)
    read = first_read(cfg_of(d, parallel__strategy=strategy, checkpoint__resume="true"))
    assert read.tobytes() == saved.tobytes(), f"{np.count_nonzero(read != saved)} of {read.size} parameters differ"


def _saved_model(d: Path, **over: object) -> tuple[np.ndarray, dict, dict]:
    """A run with train.save_model and a validation pass every 3 steps (a curve with ups and downs)."""
    cfg = cfg_of(d, train__save_model=str(d / "model.h5"), train__eval_every_steps=3, train__learning_rate=4.0, **over)
    result = train.run(cfg, WORLD)
    if result["status"] != "ok":
        return None, result, {}
    theta, _, meta = model_file.load(d / "model.h5")
    return theta, result, meta


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strategy", ["allreduce", "async_ps"])
def test_the_best_model_and_the_curve_survive_a_resume(strategy):
    d = shared_dir()
    whole, full, meta = _saved_model(d / "full", parallel__strategy=strategy)
    _saved_model(d / "cut", parallel__strategy=strategy, debug__signal_step=2 * STEPS - 1)
    theta, resumed, meta_r = _saved_model(d / "cut", parallel__strategy=strategy, checkpoint__resume="true")
    cut_curve = [p["step"] for p in resumed["evaluations"]]
    assert cut_curve == [p["step"] for p in full["evaluations"]]  # every pass before the stop kept, none twice
    best = max(resumed["evaluations"], key=lambda p: p["val_accuracy"])
    assert meta_r["best"]["step"] == best["step"]
    if strategy == "allreduce":  # deterministic: the resumed run's model is the uninterrupted run's
        assert meta["best"]["step"] <= 2 * STEPS, "the setup should put the best pass before the stop"
        assert theta.tobytes() == whole.tobytes()
    # the model written is the best pass's, which the checkpoint carried
    ck = WORLD.bcast(checkpoint.load(d / "cut" / "ck.h5") if WORLD.rank == 0 else None)
    assert theta.tobytes() == ck["state"]["best_theta"].tobytes()
