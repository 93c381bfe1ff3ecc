"""Asynchronous SGD with a parameter store in MPI windows: no worker ever waits for another.

The parameters live in windows striped over the ranks (parallel/parameter_windows.py). A
block of global steps is a pool of shares (each global minibatch cut into P shares, the ranks'
shares in allreduce), claimed one at a time with an atomic counter, so a fast worker takes
more of them than a slow one and the data seen per epoch is still each example once. For
each share a worker:

    reads the update count (the parameters' version) and then the parameters
    computes the gradient sum of its share (the local step) and applies the optimizer to its
      private copy of what it read: the difference is its update
    adds the update to the store (Accumulate) and counts it (Fetch_and_op): the version written

and logs (worker, its clock, version read, version written): the updates applied between its
read and its write, version written - version read - 1, are the update's staleness.

Each update is lr / B times a share's gradient sum (B: the global batch), so the P updates of
one global minibatch move the parameters as one allreduce step does; the weight decay term is
split alike (1/P per update). Optimizer state (momentum's velocity) lives on each worker, fed
by that worker's gradients only: momentum being linear, the workers' velocities add up to the
velocity allreduce would keep, staleness aside.

At a block's end (every `parallel.meet_every_steps` global steps, an evaluation, the epoch's
end) the workers meet: a barrier after every update has landed, every rank reads the final
parameters, and one small Allreduce settles the loss, the stop requests and the divergence
check. Resume restores the parameters exactly and each worker's velocity from rank 0's (the
interleaving of updates is not reproducible, so neither is the rest of the run).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pbp_hpc.engine import backend
from pbp_hpc.parallel.strategies.base import BlockResult, LrOf, StopOf, Strategy, share_indices


class AsyncPS(Strategy):
    name = "async_ps"
    keys = ("meet_every_steps",)
    asynchronous = host_only = splits_decay = True

    def __init__(self, cfg: Any, grid: Any, xp: Any):
        super().__init__(cfg, grid, xp)
        self.meet = cfg.parallel.meet_every_steps
        self.claimed = 0  # the claim counter's value at the current block's start (the same on every rank)
        self.clock = 0  # updates this worker has made
        # the update log, append-only: (worker, clock, version read, version written); rank 0 gathers it
        self.log: list[tuple[int, int, int, int]] = []

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        from pbp_hpc.parallel import parameter_windows as pw

        super().attach(local, reducer, optimizer)
        self.pw = pw
        self.before = np.empty_like(self.theta)  # the parameters as read: the update is theta - before
        self.store = pw.ParameterWindows(self.comm, self.theta)

    def restored(self) -> None:
        # the windows were filled from the initial parameters when the run was built: without
        # this the first read after a resume would bring those back, not the checkpoint's
        self.store.overwrite(self.theta)

    def block_end(self, first: int, limit: int, steps: int, epoch: int) -> int:
        return min(limit, first + self.meet)

    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: LrOf, stop_of: StopOf
                  ) -> BlockResult:
        P, B, pw = self.comm.size, self.cfg.train.batch_size, self.pw
        pool = (end - first) * P
        loss_sum, examples, stop = 0.0, 0, False
        while True:
            self.wait_turn()
            t = time.perf_counter()
            j = self.store.fetch_add(pw.CLAIMS) - self.claimed  # the next share of the block's pool
            self.exchange_s += time.perf_counter() - t
            if j >= pool:
                break
            s, part = first + j // P, j % P
            g = epoch * steps + s
            idx = share_indices(order, B, s, part, P)
            stop = stop_of(g) or stop
            loss_sum += self.update(idx, lr_of(g), g)
            examples += idx.shape[0]
        self.claimed += pool + P  # every worker's last claim found the pool empty
        self.finished_block()
        t = time.perf_counter()
        with self.watch:  # the meeting: every update of the block has landed after it
            self.comm.Barrier()
        self.store.read(self.theta)
        self.exchange_s += time.perf_counter() - t
        return self.settle(loss_sum, stop, examples, epoch, end, params=True)

    def update(self, idx: Any, lr: float, g: int) -> float:
        """One share: read, compute, push. Returns the share's summed loss."""
        pw, t = self.pw, time.perf_counter()
        version_read = self.store.fetch(pw.UPDATES)
        self.store.read(self.theta)
        self.before[...] = self.theta
        self.exchange_s += time.perf_counter() - t
        # an update from this share alone, lr / B times its gradient sum (an empty share: momentum's part)
        self.compute(idx, g, lr=lr, batch=self.cfg.train.batch_size)
        loss = float(self.loss[0])
        np.subtract(self.theta, self.before, out=self.before)  # the update
        t = time.perf_counter()
        self.store.add(self.before)
        version_written = self.store.fetch_add(pw.UPDATES) + 1
        self.exchange_s += time.perf_counter() - t
        self.log.append((self.comm.rank, self.clock, version_read, version_written))
        self.clock += 1
        self.applied(self.before)
        return loss

    # hooks for ssp and the tests
    def wait_turn(self) -> None:
        """Before claiming a share (ssp waits here for the slowest worker)."""

    def finished_block(self) -> None:
        """This worker found the block's pool empty."""

    def applied(self, delta: Any) -> None:
        """This worker's update was added to the store."""

    def gathered_log(self) -> np.ndarray:
        """Every worker's update log, on every rank (collective): rows (worker, clock, read, written)."""
        mine = np.array(self.log, dtype=np.int64).reshape(-1, 4)
        return np.concatenate(self.comm.allgather(mine))

    def describe(self) -> dict[str, Any]:
        """Staleness of the run's updates (collective: every rank's log is gathered)."""
        log = self.gathered_log()
        stale = log[:, 3] - log[:, 2] - 1 if log.shape[0] else np.zeros(0, dtype=np.int64)
        per_worker = np.bincount(log[:, 0], minlength=self.comm.size) if log.shape[0] else np.zeros(self.comm.size)
        return {
            **super().describe(),
            "updates": int(log.shape[0]),
            "updates_per_worker": [int(c) for c in per_worker],
            "staleness_mean": float(stale.mean()) if stale.size else None,
            "staleness_max": int(stale.max()) if stale.size else None,
            # staleness -> how many updates had it
            "staleness_histogram": [int(c) for c in np.bincount(stale)] if stale.size else [],
            "bytes_moved_per_update": (2 * self.theta.nbytes),
        }

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
            self.store = None
        super().close()

    def state(self) -> dict[str, Any]:
        return {name: backend.to_host(buf) for name, buf in self.optimizer.state().items()}
