"""Stale synchronous parallel (SSP): async_ps with a bound s on how far a worker may run ahead.

Each worker's clock counts the updates it has completed, published on rank 0 after the update
has landed. A worker about to make its update number c (clock c) first waits until every
other worker's clock is at least c - s: every update of clocks below c - s has then been
applied before it reads the parameters. s = 0 is lockstep (every worker's c-th update waits
for all the others' (c-1)-th); a large s is async_ps. A worker whose claim finds the block's
pool empty publishes a clock no one waits for (DONE) until the next block, so a fast worker
is never held by one that has nothing left to do; the bound then still holds, since no share
is left for the fast one either.

The wait polls rank 0's clocks (one Get_accumulate of P integers) with a backoff from 50 us to
1 ms; the stall check watches it like any other wait.
"""

from __future__ import annotations

import time
from typing import Any

from pbp_hpc.parallel.strategies.async_ps import AsyncPS

DONE = 1 << 60  # a clock that satisfies every wait


class SSP(AsyncPS):
    name = "ssp"
    keys = ("meet_every_steps", "staleness_bound")

    def __init__(self, cfg: Any, grid: Any, xp: Any):
        super().__init__(cfg, grid, xp)
        self.bound = cfg.parallel.staleness_bound
        self.waited_s = 0.0

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        super().attach(local, reducer, optimizer)
        self.store.publish_clock(self.comm.rank, 0)
        self.comm.Barrier()  # every clock published before anyone compares them

    def wait_turn(self) -> None:
        need = self.clock - self.bound
        if need <= 0 or self.comm.size == 1:
            return
        t = time.perf_counter()
        pause = 50e-6
        clocks = self.store.clocks()
        if clocks.min() >= need:
            self.exchange_s += time.perf_counter() - t
            return
        with self.watch:
            while clocks.min() < need:
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
                clocks = self.store.clocks()
        waited = time.perf_counter() - t
        self.waited_s += waited
        self.exchange_s += waited

    def applied(self, delta: Any) -> None:
        self.store.publish_clock(self.comm.rank, self.clock)  # after the update landed (add() flushed it)

    def finished_block(self) -> None:
        self.store.publish_clock(self.comm.rank, DONE)

    def run_block(self, *args: Any) -> Any:
        out = super().run_block(*args)
        # after the meeting's barrier and settle(): no one compares clocks until every worker
        # has put its real clock back, which the barrier below ensures
        self.store.publish_clock(self.comm.rank, self.clock)
        self.comm.Barrier()
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gate_wait_s": self.waited_s}
