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

import time
from typing import Any, Callable

import numpy as np

from pbp_hpc.parallel.strategies.base import BlockResult, LrOf, StopOf, Strategy, share_indices


class Hogwild(Strategy):
    name = "hogwild"
    keys = ("meet_every_steps",)
    asynchronous = host_only = splits_decay = True

    def __init__(self, cfg: Any, grid: Any, xp: Any):
        super().__init__(cfg, grid, xp)
        self.meet = cfg.parallel.meet_every_steps
        self.node = grid.node  # the ranks sharing the node's array
        # one rank per node (its node rank 0) averages the node arrays across nodes
        self.leaders = grid.across if self.node.rank == 0 else None
        self.nodes = grid.nodes
        self.win: Any = None
        self.updates = 0

    def parameters(self, reducer: Any, fill: Callable[[Any], Any]) -> Any:
        from mpi4py import MPI

        item = np.dtype(reducer.dtype).itemsize
        n = reducer.n
        self.win = MPI.Win.Allocate_shared(n * item if self.node.rank == 0 else 0, item, comm=self.node)
        theta = np.frombuffer(self.win.Shared_query(0)[0], dtype=reducer.dtype, count=n)
        if self.node.rank == 0:
            fill(theta)
        self.node.Barrier()
        return theta

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
            self.compute(idx, g, lr=lr_of(g), batch=B)  # the update on the shared array, no lock
            loss_sum += float(self.loss[0])
            self.updates += 1
            examples += idx.shape[0]
        self._meet()
        return self.settle(loss_sum, stop, examples, epoch, end, params=True)

    def _meet(self) -> None:
        """Every rank's updates are in its node's array; across nodes, the arrays are averaged."""
        from mpi4py import MPI

        t = time.perf_counter()
        with self.watch:
            self.node.Barrier()
            if self.nodes > 1:
                if self.leaders is not None:
                    self.leaders.Allreduce(MPI.IN_PLACE, self.theta, op=MPI.SUM)
                    self.theta *= 1.0 / self.nodes
                self.node.Barrier()  # no rank reads the array before its leader wrote the average
        self.exchange_s += time.perf_counter() - t

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "nodes": self.nodes, "updates": int(self.comm.allreduce(self.updates))}

    def close(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None
        super().close()
