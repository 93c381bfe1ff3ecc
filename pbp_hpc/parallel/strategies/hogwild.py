"""Hogwild!: the ranks of a node update one shared parameter array, without locks.

The node holds one copy of the parameters in an MPI-3 shared window; every rank computes its
gradient on whatever the array holds at that moment (others may be writing it) and adds its
update in place (the optimizer's axpy on the shared array), with no lock: two ranks adding to
the same element at once can lose one of the additions, which Hogwild! accepts because
updates are sparse in time and small. Rank r takes its share of every global minibatch (the
same data per epoch as allreduce); updates are lr / B times a share's gradient sum, so the P
updates of a global minibatch move the parameters as one allreduce step does (weight decay
split 1/P per update). Optimizer state (momentum's velocity) is each rank's own.

Across nodes it is local SGD: every `parallel.meet_every_steps` global steps (and at an
evaluation, the epoch's end) the node arrays are averaged by one Allreduce among one rank per
node. That meeting also settles the loss, the stop requests and the divergence check. Resume
restores the parameters exactly and each rank's velocity from rank 0's.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from pbp_hpc.errors import DivergenceError
from pbp_hpc.parallel.strategies.base import BlockResult, LrOf, StopOf, Strategy, settle, share_indices


class Hogwild(Strategy):
    name = "hogwild"

    def __init__(self, cfg: Any, comm: Any, xp: Any):
        super().__init__(cfg, comm, xp)
        self.meet = cfg.parallel.meet_every_steps
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        # one rank per node (its node rank 0) averages the node arrays across nodes
        self.leaders = comm.Split(0 if self.node.rank == 0 else MPI.UNDEFINED, key=comm.rank)
        self.nodes = comm.allreduce(1 if self.node.rank == 0 else 0)
        self.win: Any = None
        self.comm_seconds = 0.0
        self.updates = 0

    def parameters(self, reducer: Any, fill: Callable[[Any], Any]) -> Any:
        item = np.dtype(reducer.dtype).itemsize
        n = reducer.n
        self.win = MPI.Win.Allocate_shared(n * item if self.node.rank == 0 else 0, item, comm=self.node)
        theta = np.frombuffer(self.win.Shared_query(0)[0], dtype=reducer.dtype, count=n)
        if self.node.rank == 0:
            fill(theta)
        self.node.Barrier()
        return theta

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        super().attach(local, reducer, optimizer)
        optimizer.weight_decay /= self.comm.size  # P updates per global minibatch: each carries 1/P of the decay

    def restored(self) -> None:
        # every rank of the node wrote the same checkpointed values into the node's one array:
        # none may start updating it while another is still writing
        self.node.Barrier()

    def block_end(self, first: int, limit: int, steps: int, epoch: int) -> int:
        return min(limit, first + self.meet)

    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: LrOf, stop_of: StopOf
                  ) -> BlockResult:
        P, r, B = self.comm.size, self.comm.rank, self.cfg.train.batch_size
        loss_sum, examples, stop = 0.0, 0, False
        for s in range(first, end):
            g = epoch * steps + s
            stop = stop_of(g) or stop
            idx = share_indices(order, B, s, r, P)
            tc = time.perf_counter()
            self.local(idx)
            if self.after_local is not None:
                self.after_local(g)
            loss_sum += float(self.loss[0])
            self.optimizer.apply(self.whole, [self.grad], lr_of(g), B)  # on the shared array, no lock
            self.updates += 1
            examples += idx.shape[0]
            self.straggler.after(g, time.perf_counter() - tc)
            self.compute_s += time.perf_counter() - tc
        t = time.perf_counter()
        self._meet()
        loss, stop_ranks, seen = settle(self.comm, self.reducer.watch, loss_sum, stop, examples)
        self.comm_seconds += time.perf_counter() - t
        if not math.isfinite(loss) or not bool(np.isfinite(self.theta).all()):
            raise DivergenceError(f"training diverged at epoch {epoch} before step {end}: loss is {loss} "
                                  "(the learning rate is likely too high for lock-free updates)", epoch, end - 1)
        return loss, seen, end, stop_ranks

    def _meet(self) -> None:
        """Every rank's updates are in its node's array; across nodes, the arrays are averaged."""
        watch = self.reducer.watch
        watch.enter()
        try:
            self.node.Barrier()
            if self.nodes > 1:
                if self.node.rank == 0:
                    self.leaders.Allreduce(MPI.IN_PLACE, self.theta, op=MPI.SUM)
                    self.theta *= 1.0 / self.nodes
                self.node.Barrier()  # no rank reads the array before its leader wrote the average
        finally:
            watch.leave()

    @property
    def comm_s(self) -> float:
        return self.comm_seconds

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "meet_every_steps": self.meet, "nodes": self.nodes,
                "updates": int(self.comm.allreduce(self.updates))}

    def close(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None
            if self.leaders != MPI.COMM_NULL:
                self.leaders.Free()
            self.node.Free()
        super().close()
