"""Strategies, one module each, behind one factory: `make(cfg, comm, xp)` (then base.Strategy's
parameters() and attach()).

    allreduce   the gradient summed over ranks every step; the same update everywhere (allreduce.py)
    local_sgd   k local steps on each rank's shares, then parameters and state averaged (local_sgd.py)
    async_ps    parameters in MPI windows striped over ranks; updates pushed without waiting (async_ps.py)
    ssp         async_ps with bounded staleness: no worker more than s updates ahead (ssp.py)
    hogwild     one node-shared parameter array updated without locks; nodes averaged (hogwild.py)

The interface is base.Strategy. To add one: a module with a subclass of it and a line below
(or `register(name, cls)`); `parallel.strategy` then accepts it, and
pbp_hpc.parallel.combinations says which reducers and optimizers it runs with.
"""

from __future__ import annotations

from typing import Any

from pbp_hpc.registry import Registry

STRATEGIES = Registry("strategy", {
    "allreduce": "pbp_hpc.parallel.strategies.allreduce:AllreduceStrategy",
    "local_sgd": "pbp_hpc.parallel.strategies.local_sgd:LocalSGD",
    "async_ps": "pbp_hpc.parallel.strategies.async_ps:AsyncPS",
    "ssp": "pbp_hpc.parallel.strategies.ssp:SSP",
    "hogwild": "pbp_hpc.parallel.strategies.hogwild:Hogwild",
})
register = STRATEGIES.register
names = STRATEGIES.names


# Strategies that sum a gradient every step; the others exchange parameters or updates
# their own way and take the private buffers of the blocking reducer (reducers.make).
SUMS_GRADIENTS = ("allreduce",)


def make(cfg: Any, comm: Any, xp: Any) -> Any:
    return STRATEGIES.load(cfg.parallel.strategy)(cfg, comm, xp)
