"""Which choices go together: the one place that says so, checked when a config is loaded.

A run combines independent choices: the backend, the algorithm, the strategy
(parallel.strategy), the reducer (parallel.reducer, or parallel.gpu_reducer on a GPU) and the
optimizer (optimizer.name). Most combinations work; the ones that do not are listed here as
pairs, each with its reason, and a config that makes one is refused before any work with a
message naming both choices. Adding a strategy, reducer or optimizer that cannot run with
something is a line in RULES, not a check in the code that runs it; a strategy's rules follow
from what its class declares (strategy_rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


class Above:
    """The values of a count above `n` (a Rule's refused values for parallel.tensor > 1, say)."""

    def __init__(self, n: int):
        self.n = n

    def __contains__(self, v: Any) -> bool:
        return isinstance(v, int) and v > self.n


TENSOR = ("parallel.tensor", Above(1))
PIPELINE = ("parallel.pipeline", Above(1))


@dataclass(frozen=True)
class Rule:
    first: tuple[str, Any]  # (config key, the values it refuses with `second`: a tuple, or Above)
    second: tuple[str, Any]
    why: str


RULES = [
    Rule(("algorithm", ("per_example",)), ("backend", ("cupy",)),
         "per_example is the numpy baseline; with backend: cupy use batched"),
    Rule(("parallel.reducer", ("overlap", "shm", "shared_batch")), ("backend", ("cupy",)),
         "that reducer works on host buffers; with backend: cupy choose parallel.gpu_reducer"),
    Rule(("parallel.reducer", ("shared_batch",)), ("algorithm", ("per_example",)),
         "shared_batch computes the node's examples together in batched GEMMs; per_example is the one-at-a-time baseline"),
    Rule(("parallel.compression", ("fp16", "bf16")), ("backend", ("cupy",)),
         "the device reducers send full precision; compression is for the host reducers"),
    Rule(("parallel.error_feedback", (True,)), ("parallel.compression", ("none",)),
         "error feedback carries compression's rounding into the next step; without compression there is none"),
    Rule(TENSOR, ("parallel.reducer", ("overlap", "shm", "shared_batch")),
         "the data-parallel groups of a tensor-parallel run sum their gradient shards with one Allreduce; "
         "use parallel.reducer auto or blocking"),
    Rule(TENSOR, ("algorithm", ("per_example",)),
         "tensor parallelism splits the batched GEMMs; per_example is the one-at-a-time baseline"),
    Rule(TENSOR, ("backend", ("cupy",)), "tensor parallelism runs on host buffers; with backend: cupy use parallel.tensor 1"),
    Rule(PIPELINE, ("parallel.reducer", ("overlap", "shm", "shared_batch")),
         "each stage's data-parallel group sums its gradient with one Allreduce; use parallel.reducer auto or blocking"),
    Rule(PIPELINE, ("algorithm", ("per_example",)),
         "a pipeline runs batched microbatches; per_example is the one-at-a-time baseline"),
    Rule(PIPELINE, ("backend", ("cupy",)), "pipeline parallelism runs on host buffers; with backend: cupy use parallel.pipeline 1"),
    Rule(("parallel.pipeline_schedule", ("decoupled",)), TENSOR,
         "the decoupled schedule's synthetic gradients are built for whole stages; use parallel.tensor 1 "
         "(or pipeline_schedule 1f1b)"),
    Rule(("parallel.pipeline_schedule", ("decoupled",)), ("parallel.pipeline", (1,)),
         "decoupled stages need a pipeline: set parallel.pipeline to 2 or more"),
    Rule(TENSOR, ("optimizer.name", ("lars", "lamb")),
         "the layer-wise optimizers scale each layer by its whole norm, and a tensor group holds parts of layers; "
         "use parallel.tensor 1 (or optimizer nesterov)"),
    Rule(PIPELINE, ("optimizer.name", ("lars", "lamb")),
         "the layer-wise optimizers are built for the whole model's layers, and a pipeline stage holds some of them; "
         "use parallel.pipeline 1 (or optimizer nesterov)"),
]


def strategy_rules() -> list[Rule]:
    """The rules of the registered strategies, from what each class declares (strategies.base.Strategy)."""
    from pbp_hpc.parallel import strategies

    own = tuple(n for n in strategies.names() if not strategies.facts(n).sums_gradients)
    host = tuple(n for n in strategies.names() if strategies.facts(n).host_only)
    return [
        Rule(("parallel.strategy", own), ("parallel.reducer", ("overlap", "shm", "shared_batch")),
             "that strategy does not sum a gradient every step: it averages or pushes parameters itself, "
             "over private buffers; use parallel.reducer auto or blocking"),
        Rule(("parallel.strategy", host), ("backend", ("cupy",)),
             "that strategy exchanges host buffers (MPI windows, node shared memory); with backend: cupy use allreduce"),
        Rule(TENSOR, ("parallel.strategy", own),
             "a tensor group computes every step together; that strategy lets ranks run apart; use allreduce"),
        Rule(PIPELINE, ("parallel.strategy", own),
             "a pipeline computes every step together; that strategy lets ranks run apart; use allreduce"),
        Rule(("parallel.strategy", own), ("parallel.compression", ("fp16", "bf16")),
             "compression applies to the gradient sum of allreduce; that strategy sends parameters or updates at full precision"),
    ]


def value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def violation(cfg: Any) -> Optional[str]:
    """The first rule the config breaks, in words naming both choices; None if it breaks none."""
    for rule in RULES + strategy_rules():
        (k1, bad1), (k2, bad2) = rule.first, rule.second
        v1, v2 = value(cfg, k1), value(cfg, k2)
        if v1 in bad1 and v2 in bad2:
            return f"{k1}={v1} does not go with {k2}={v2}: {rule.why}"
    return None
