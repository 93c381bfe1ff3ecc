"""Optimizers, one module each, behind one factory: `make(cfg, theta, state_buffer, xp)`.

    sgd        theta -= lr * (g / B + weight_decay * theta)                 (sgd.py)
    momentum   heavy-ball momentum, PyTorch's form                          (momentum.py)
    nesterov   Nesterov momentum, PyTorch's form                            (momentum.py)
    lars       layer-wise trust ratio on momentum SGD (You et al. 2017)     (layerwise.py)
    lamb       layer-wise trust ratio on Adam (You et al. 2019)             (layerwise.py)

The interface is base.Optimizer. To add one: a module with a subclass of it and a line below
(or `register(name, cls)`); `optimizer.name` then accepts it, and
pbp_hpc.parallel.combinations says where it may not run.
"""

from __future__ import annotations

from typing import Any, Callable

from pbp_hpc.registry import Registry

OPTIMIZERS = Registry("optimizer", {
    "sgd": "pbp_hpc.engine.optimizers.sgd:SGD",
    "momentum": "pbp_hpc.engine.optimizers.momentum:Momentum",
    "nesterov": "pbp_hpc.engine.optimizers.momentum:Nesterov",
    "lars": "pbp_hpc.engine.optimizers.layerwise:LARS",
    "lamb": "pbp_hpc.engine.optimizers.layerwise:LAMB",
})
register = OPTIMIZERS.register
names = OPTIMIZERS.names


def make(cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any) -> Any:
    return OPTIMIZERS.load(cfg.optimizer.name)(cfg, theta, state_buffer, xp)
