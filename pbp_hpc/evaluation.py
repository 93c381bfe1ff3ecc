"""Validation during training: accuracy passes, the curve they draw, and the stops they decide.

Every `train.eval_every` epochs (and every `train.eval_every_steps` steps, if set) the ranks
measure validation accuracy together. Each pass is a point of the run's curve: training time
so far (evaluations excluded), wall time, step, epoch, accuracy, and the mean training loss
since the previous point. A pass may end the run: the target accuracy is reached
(`train.target_accuracy`: the result records time, epochs and steps to it), or
`train.early_stopping` passes went by without a better accuracy. The best pass's parameters
are kept (on rank 0, in one preallocated host buffer) for `train.save_model`.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc import faults, model_file
from pbp_hpc.data import device as device_data
from pbp_hpc.parallel import runtime
from pbp_hpc.parallel.strategies.base import my_share


def accuracy(st: Any, source: Any) -> Optional[float]:
    """Accuracy on a whole source, the work split across ranks; every rank gets the answer.
    None for a source with no examples (JSON has no NaN)."""
    n_total = len(source)
    if n_total == 0:
        return None
    comm = st.grid.data  # the ranks of a tensor group or pipeline evaluate the same examples together
    lo, hi = my_share(n_total, comm.size, comm.rank)
    correct = 0
    chunk = st.local.work.max_batch
    for start in range(lo, hi, chunk):
        correct += st.local.count_correct(source, device_data.index_range(source, start, min(hi, start + chunk)))
    faults.inject(st.cfg, st.comm.rank, "evaluation")  # debug.fail_phase (tests)
    total = np.array([int(correct)], dtype=np.int64)  # a buffer: MPI then waits without holding the GIL the watch needs
    watch = st.watch  # a rank stopped or slow in the pass is noticed here, as in a step
    with watch.around(f"the evaluation after step {watch.step}"):
        comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    return int(total[0]) / n_total


class Tracker:
    """The evaluation curve of one run, its best point and its stopping rules."""

    def __init__(self, st: Any, steps_per_epoch: int, curve: Optional[list[dict[str, Any]]] = None,
                 best_theta: Optional[np.ndarray] = None):
        t = st.cfg.train
        self.st, self.per_epoch = st, steps_per_epoch
        self.every_steps, self.target, self.patience = t.eval_every_steps, t.target_accuracy, t.early_stopping
        self.curve: list[dict[str, Any]] = curve if curve is not None else []
        self.eval_s = 0.0  # this run's time in evaluation passes (excluded from training time)
        self.reached: Optional[dict[str, Any]] = None
        self.best = max((p["val_accuracy"] for p in self.curve if p["val_accuracy"] is not None), default=-1.0)
        # passes since the best (a resumed run's early stopping counts the passes before its stop too)
        self.since_best = next((len(self.curve) - 1 - i for i in range(len(self.curve) - 1, -1, -1)
                                if self.curve[i]["val_accuracy"] == self.best), 0)
        self.best_theta = np.empty(st.n_params, dtype=st.cfg.model.dtype) if (t.save_model and st.comm.rank == 0) else None
        self.best_at: Optional[dict[str, Any]] = None
        if best_theta is not None and self.best >= 0:  # resumed: the best pass so far and its parameters
            self.best_at = next(p for p in self.curve if p["val_accuracy"] == self.best)
            if self.best_theta is not None:
                self.best_theta[...] = best_theta
        self.loss_sum, self.loss_n = 0.0, 0
        self.passes = 0  # this run's validation passes so far (debug.stall_evaluation counts them)

    def due(self, global_step: int) -> bool:
        """Whether a pass is due after this step (the step-based cadence)."""
        return self.every_steps is not None and (global_step + 1) % self.every_steps == 0

    def add_loss(self, loss_sum: float, examples: int) -> None:
        self.loss_sum += loss_sum
        self.loss_n += examples

    def evaluate(self, epoch: int, steps_done: int, train_s: float, wall_s: float) -> Optional[str]:
        """A validation pass after `steps_done` global steps; returns why the run should stop, or None."""
        t0 = time.perf_counter()
        watch = self.st.watch
        stalled0 = watch.stalled_s
        self._inject_stall()
        with self.st.strategy.evaluated():  # the weight average, where train.ema_decay keeps one
            acc = accuracy(self.st, self.st.data.val)
            # the same on every rank (acc is reduced): a better pass's parameters, gathered over the model's ranks
            if acc is not None and acc > self.best and (self.best_theta is not None or self.st.grid.model.size > 1):
                whole = self.st.whole(self.st.theta, root=0)
                if self.best_theta is not None:
                    self.best_theta[...] = whole
        # seconds the pass waited past parallel.stall_warning_s for another rank (the slowest rank's)
        stalled = float(runtime.slowest(self.st.comm, [watch.stalled_s - stalled0], watch)[0])
        point = {"epoch": epoch, "step": steps_done, "epochs": steps_done / self.per_epoch, "time_s": train_s,
                 "wall_s": wall_s, "val_accuracy": acc,
                 "loss": self.loss_sum / self.loss_n if self.loss_n else None, "stalled_s": stalled}
        noise = getattr(self.st, "noise", None)
        if noise is not None:  # the gradient noise scale so far (parallel/noise_scale.py)
            point["b_noise"] = noise.value
        self.passes += 1
        self.curve.append(point)
        self.loss_sum, self.loss_n = 0.0, 0
        if acc is not None and acc > self.best:
            self.best, self.since_best, self.best_at = acc, 0, point
        else:
            self.since_best += 1
        self.eval_s += time.perf_counter() - t0
        if self.target is not None and self.reached is None and acc is not None and acc >= self.target:
            self.reached = {"accuracy": self.target, "val_accuracy": acc, "time_s": train_s, "eval_time_s": self.eval_s,
                            "wall_s": wall_s + (time.perf_counter() - t0), "epochs": point["epochs"], "steps": steps_done}
            return f"target validation accuracy {self.target} reached ({acc:.4f})"
        if self.patience is not None and self.since_best >= self.patience:
            return f"early stopping: {self.patience} evaluation(s) without a better validation accuracy (best {self.best:.4f})"
        return None

    def _inject_stall(self) -> None:
        """debug.stall_evaluation: this rank stops answering for debug.stall_s in this pass (tests)."""
        dbg = self.st.cfg.debug
        if self.passes == dbg.stall_evaluation and dbg.fail_rank in (None, self.st.comm.rank):
            time.sleep(dbg.stall_s)

    def save_best(self) -> Optional[str]:
        """Write the best pass's parameters to train.save_model (rank 0); the path, or None."""
        cfg = self.st.cfg
        if not cfg.train.save_model:
            return None
        with self.st.strategy.evaluated():  # no validation pass: the last weights (averaged, with train.ema_decay)
            last = self.st.whole(self.st.theta, root=0) if self.best_at is None else None  # collective over the model's ranks

        def write() -> None:
            faults.inject(cfg, self.st.comm.rank, "writes", model_file.ModelFileError)  # debug.fail_phase (tests)
            if self.st.comm.rank == 0:
                theta = self.best_theta if self.best_at is not None else last
                model_file.save(cfg.train.save_model, theta, cfg.to_dict(), {"best": self.best_at})

        # rank 0 writes; its failure is raised on every rank (a rank left in a barrier would wait for ever)
        runtime.together(self.st.comm, write, name_ranks=False)
        return cfg.train.save_model

    def summary(self) -> dict[str, Any]:
        target = None
        if self.target is not None:
            target = self.reached or {"accuracy": self.target, "val_accuracy": None, "time_s": None,
                                      "eval_time_s": self.eval_s, "wall_s": None, "epochs": None, "steps": None}
            target = {**target, "reached": self.reached is not None}
        return {"evaluations": self.curve, "target": target, "eval_time_s": self.eval_s,
                "best_val_accuracy": self.best if self.best >= 0 else None}
