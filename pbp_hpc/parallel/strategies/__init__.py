"""Strategies, one module each, behind one factory: `make(cfg, grid, xp)` (then base.Strategy's
parameters() and attach()).

    allreduce   the gradient summed over ranks every step; the same update everywhere (allreduce.py)
    local_sgd   k local steps on each rank's shares, then parameters and state averaged (local_sgd.py)
    async_ps    parameters in MPI windows striped over ranks; updates pushed without waiting (async_ps.py)
    ssp         async_ps with bounded staleness: no worker more than s updates ahead (ssp.py)
    hogwild     one node-shared parameter array updated without locks; nodes averaged (hogwild.py)

Adding a strategy (tests/example_strategy.py is one, 40 lines: gossip):
  1. A module with a subclass of base.Strategy that declares what it is: `name`;
     `sums_gradients` (True: it sums a gradient every step through the reducer, which any reducer
     and compression then serve; False: it exchanges parameters itself over private buffers);
     `keys`, the parallel.* settings it reads (a checkpoint resumes only with the same ones);
     `asynchronous`, `host_only`, `splits_decay` where they hold. The combination rules, the
     resume key, the reducer `auto` picks and analyze's grouping are read from these.
  2. Its run: a synchronous strategy writes step(); one that meets every few steps writes
     block_end() and run_block(). Every local step goes through self.compute() (its chores
     are done there), and a block ends with self.settle() (loss, stops and the divergence check).
     Its communicators come from self.grid (parallel/grid.py): self.comm is the data group,
     grid.ring() a ring's neighbours, grid.node / grid.across the node split.
  3. A line in STRATEGIES below, or `register(name, cls)` from a test or plugin; then
     `parallel.strategy` accepts it.
"""

from __future__ import annotations

from typing import Any

from pbp_hpc.registry import Registry

# in the order tables list them: from lockstep to fully asynchronous
STRATEGIES = Registry("strategy", {
    "allreduce": "pbp_hpc.parallel.strategies.allreduce:AllreduceStrategy",
    "local_sgd": "pbp_hpc.parallel.strategies.local_sgd:LocalSGD",
    "ssp": "pbp_hpc.parallel.strategies.ssp:SSP",
    "async_ps": "pbp_hpc.parallel.strategies.async_ps:AsyncPS",
    "hogwild": "pbp_hpc.parallel.strategies.hogwild:Hogwild",
})
register = STRATEGIES.register
names = STRATEGIES.names


def facts(name: str) -> Any:
    """The class of strategy `name`, whose attributes say what it is (imports no MPI)."""
    return STRATEGIES.load(name)


def make(cfg: Any, grid: Any, xp: Any) -> Any:
    return STRATEGIES.load(cfg.parallel.strategy)(cfg, grid, xp)
