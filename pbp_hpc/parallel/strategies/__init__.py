"""Strategies, one module each, behind one factory: `make(cfg, comm, local, reducer, optimizer, xp)`.

    allreduce   the gradient summed over ranks every step; the same update everywhere (allreduce.py)

The interface is base.Strategy. To add one: a module with a subclass of it and a line below
(or `register(name, cls)`); `parallel.strategy` then accepts it, and
pbp_hpc.parallel.combinations says which reducers and optimizers it runs with.
"""

from __future__ import annotations

from typing import Any

from pbp_hpc.registry import Registry

STRATEGIES = Registry("strategy", {
    "allreduce": "pbp_hpc.parallel.strategies.allreduce:AllreduceStrategy",
})
register = STRATEGIES.register
names = STRATEGIES.names


def make(cfg: Any, comm: Any, local: Any, reducer: Any, optimizer: Any, xp: Any) -> Any:
    return STRATEGIES.load(cfg.parallel.strategy)(cfg, comm, local, reducer, optimizer, xp)
