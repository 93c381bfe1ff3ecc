"""One epoch of training: its data order, its blocks of steps, the evaluation passes and
checkpoints due inside it, and its record, whose time parts add up (parallel/accounting.py).

`Loop` is what the training loop (pbp_hpc/train.py) carries from epoch to epoch; `run_epoch`
runs the steps of one epoch from a given step on (a resumed run starts mid-epoch).
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc import evaluation, periodic
from pbp_hpc.config import Config
from pbp_hpc.data import device as device_data
from pbp_hpc.engine import model
from pbp_hpc.engine.schedules import Schedule
from pbp_hpc.parallel import accounting, runtime


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The global data order of an epoch: the same on every rank, a function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x45504F]).permutation(n)


def order_of(st: Any, epoch: int, n: int) -> Any:
    """Host data: epoch_order. Device data: an order drawn on the device, so none is uploaded."""
    t = st.cfg.train
    if isinstance(st.data.train, device_data.DeviceSource):
        return device_data.device_epoch_order(st.xp, t.seed, epoch, n, t.shuffle)
    return epoch_order(t.seed, epoch, n, t.shuffle)


def _stop_requested(st: Any, global_step: int) -> bool:
    """A SIGUSR1/SIGTERM reached this rank, or debug.signal_step stands in for one (tests)."""
    dbg = st.cfg.debug
    return runtime.stop_signalled() or (global_step == dbg.signal_step and dbg.signal_rank in (None, st.comm.rank))


def _progress(cfg: Config, comm: MPI.Comm, total: int, epoch: int, quiet: bool) -> Any:
    if comm.rank != 0 or quiet or not cfg.train.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, file=sys.stderr)


class Loop:
    """What the loop carries from step to step and epoch to epoch: the schedule, the
    evaluation tracker, the training time so far (evaluations excluded), the epochs' records."""

    def __init__(self, st: Any, steps: int, records: list[dict[str, Any]], extra: dict[str, Any]):
        self.steps, self.records = steps, records
        self.schedule = Schedule(st.cfg, steps)
        self.tracker = evaluation.Tracker(st, steps, extra.get("evaluations"), extra.get("best_theta"))
        self.train_s = float(extra.get("train_s", 0.0))
        self.account = accounting.EpochAccount(st.comm, steps)  # where each epoch's time goes
        self.t_start = time.perf_counter()
        self.last_checkpoint = time.monotonic()  # rank 0's clock decides checkpoint.every_seconds (periodic.py)
        self.checkpoint_s = 0.0  # seconds spent writing periodic checkpoints, over the run

    def wall(self) -> float:
        return time.perf_counter() - self.t_start

    def extra(self) -> dict[str, Any]:
        """For the checkpoint: what a resumed run continues from."""
        return {"evaluations": self.tracker.curve, "train_s": self.train_s}

    def arrays(self) -> dict[str, Any]:
        """For the checkpoint: the best pass's parameters (rank 0, train.save_model), so that a
        resumed run still writes the best pass's model (resume.LOOP_ARRAYS)."""
        return {"best_theta": self.tracker.best_theta if self.tracker.best_at is not None else None}


def run_epoch(st: Any, loop: Loop, epoch: int, first: int, quiet: bool
           ) -> tuple[dict[str, Any], Optional[tuple[int, int, int]], Optional[str]]:
    """Steps first.. of an epoch: its record (the slowest rank's times, evaluation passes
    excluded); where a signal asked to stop, (epoch, next step, ranks that asked), or None; and
    why an evaluation pass ended the run, or None."""
    cfg, comm, strategy, steps, tracker = st.cfg, st.comm, st.strategy, loop.steps, loop.tracker
    order = order_of(st, epoch, len(st.data.train))
    # a rank stopped at an epoch's edge stalls the others in this barrier or in the closing
    # reduction below: both count as the epoch's (a tiny epoch spends much of its time there)
    stalled0 = st.watch.stalled_s
    with st.watch:  # the stall check covers the loop's own collectives too
        comm.Barrier()  # epochs start together, so the slowest rank's time is the epoch's time
    t0, compute0, comm0, eval0 = time.perf_counter(), strategy.compute_s, strategy.comm_s, tracker.eval_s
    account = loop.account
    account.start()
    loss_sum, seen, stopped, ended, done = 0.0, 0, None, None, first
    ckpt0, checkpoints, due = loop.checkpoint_s, 0, False
    bar = _progress(cfg, comm, steps - first, epoch, quiet)
    stop_of = functools.partial(_stop_requested, st)
    while done < steps:  # blocks of steps: one step each for allreduce (parallel/strategies/base.py)
        end = strategy.block_end(done, _block_limit(tracker, epoch, steps, done), steps, epoch)
        begun = epoch * steps + done  # the block's first global step
        account.begin(strategy.comm_s, st.watch)
        loss, n, reached, stop_ranks = strategy.run_block(order, epoch, done, end, steps, loop.schedule, stop_of)
        account.block(strategy.comm_s, st.watch)
        loss_sum += loss
        seen += n
        tracker.add_loss(loss, n)
        if bar is not None:
            bar.update(reached - done)
        done = reached
        g = epoch * steps + done - 1  # the last step done
        if tracker.due(g) and done < steps:  # an epoch's last step: the epoch-end pass covers it
            in_epoch = time.perf_counter() - t0 - (tracker.eval_s - eval0)
            ended = tracker.evaluate(epoch, g + 1, loop.train_s + in_epoch, loop.wall())
        if stop_ranks > 0:  # the count of ranks asked to stop, the same on all
            stopped = (epoch, done, stop_ranks)
        if stopped is not None or ended is not None:
            break
        due = periodic.due(st, loop, begun, g + 1)
        if due and done < steps:  # mid-epoch: where the next block begins (an epoch's end: _train, once recorded)
            in_epoch = time.perf_counter() - t0 - (tracker.eval_s - eval0) - (loop.checkpoint_s - ckpt0)
            periodic.write(st, loop, epoch, done, train_s=loop.train_s + in_epoch)
            checkpoints, due = checkpoints + 1, False
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0 - (tracker.eval_s - eval0) - (loop.checkpoint_s - ckpt0)
    closing = st.watch.stalled_s
    parts = account.close(wall, strategy.compute_s - compute0, strategy.comm_s - comm0, closing - stalled0, st.watch)
    closing = st.watch.stalled_s - closing  # this rank's stall in that reduction itself
    loop.train_s += parts["time_s"]
    flops = model.flops_per_example(cfg.model.layers) * seen
    return {
        "epoch": epoch,
        "loss": loss_sum / max(seen, 1),
        "val_accuracy": None,
        # the slowest rank's time and its parts, which add up to it (parallel/accounting.py), and
        # the spread of compute and wait over the ranks
        **{k: parts[k] for k in ("time_s", "compute_s", "comm_s", "wait_s", "other_s",
                                 "compute_s_min", "compute_s_max", "wait_s_min", "wait_s_max")},
        "gflops": flops / parts["time_s"] / 1e9 if parts["time_s"] > 0 else 0.0,
        "examples": seen,
        "steps_done": done,
        "partial": first > 0 or done < steps,
        # seconds of steps that waited past parallel.stall_warning_s for another rank (the slowest
        # rank's; plus this rank's in the reduction that found the slowest)
        "stalled_s": parts["stalled_s"] + closing,
        # seconds spent writing checkpoints in the epoch (rank 0's; not in time_s), and how many
        "checkpoint_s": loop.checkpoint_s - ckpt0,
        "checkpoints": checkpoints,
        "checkpoint_due": due,
    }, stopped, ended


def _block_limit(tracker: evaluation.Tracker, epoch: int, steps: int, step: int) -> int:
    """Where a block starting at `step` must end at the latest: the epoch's end, or just after
    the next step at which an evaluation pass is due (train.eval_every_steps)."""
    every = tracker.every_steps
    if every is None:
        return steps
    g = epoch * steps + step
    return min(steps, step + (every - 1 - g % every) % every + 1)
