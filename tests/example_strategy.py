"""A strategy added from outside the package: gossip.

Every k global steps (parallel.local_steps) each rank averages its parameters with one
neighbour, its predecessor on a ring over the data group (the grid's), instead of with every
rank: one message each way per rank, whatever the number of ranks, at the price of parameters
that agree only after several rounds. In between, each rank updates from its own shares as
local_sgd does. With 2 ranks and k = 1 the neighbour is the other rank: local_sgd with k = 1.
It exists to show, and test, that a new strategy is one module and one registration line
(see test_seams.py).
"""

import time

import numpy as np

from pbp_hpc.parallel.strategies.base import Strategy, every_k, mean_share, share_indices


class Gossip(Strategy):
    name = "gossip"
    keys = ("local_steps",)  # k: the steps between two exchanges
    host_only = True

    def attach(self, local, reducer, optimizer):
        super().attach(local, reducer, optimizer)
        self.prev, self.next = self.grid.ring()
        self.received = np.empty_like(self.theta)  # the predecessor's parameters

    def block_end(self, first, limit, steps, epoch):
        return every_k(self.cfg.parallel.local_steps, first, limit, steps, epoch)

    def run_block(self, order, epoch, first, end, steps, lr_of, stop_of):
        B, P, r = self.cfg.train.batch_size, self.comm.size, self.comm.rank
        loss, stop, seen = 0.0, False, 0
        for s in range(first, end):
            g = epoch * steps + s
            stop = stop_of(g) or stop
            idx = share_indices(order, B, s, r, P)
            self.compute(idx, g, lr=lr_of(g), batch=mean_share(order, B, s, P))
            loss, seen = loss + float(self.loss[0]), seen + idx.shape[0]
        t = time.perf_counter()
        with self.watch:
            self.comm.Sendrecv(self.theta, self.next, recvbuf=self.received, source=self.prev)
        self.theta += self.received
        self.theta *= 0.5
        self.exchange_s += time.perf_counter() - t
        return self.settle(loss, stop, seen, epoch, end)
