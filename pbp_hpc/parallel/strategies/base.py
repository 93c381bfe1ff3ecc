"""The strategy interface: how the ranks combine their work into updates of the parameters.

A strategy is built from the three other parts of a step, each chosen on its own:
the local step (engine.step: this rank's gradient sum), the reducer (parallel.reducers: how a
sum over ranks is carried out) and the optimizer (engine.optimizers: how a gradient becomes an
update). Strategies differ in when and what they combine: the gradient every step
(allreduce), or, as later ones will, parameters every k steps or asynchronously.
pbp_hpc.parallel.combinations says which choices go together.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional


def my_share(batch: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous part of a global minibatch; sizes differ by at most one."""
    return batch * rank // size, batch * (rank + 1) // size


class Strategy:
    name: ClassVar[str] = ""

    def __init__(self, cfg: Any, comm: Any, local: Any, reducer: Any, optimizer: Any, xp: Any):
        self.cfg, self.comm, self.local, self.reducer, self.optimizer, self.xp = cfg, comm, local, reducer, optimizer, xp
        self.compute_s = 0.0  # time outside communication calls, accumulated over the run
        # called between the local step and the reduction (debug.fail_*: faults injected on purpose)
        self.after_local: Optional[Callable[[int], None]] = None

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        """One global minibatch (its global example indices): returns (its summed loss, the
        number of ranks that asked to stop), the same on every rank. at: (epoch, step, global step)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Buffers to checkpoint beside the parameters (the optimizer's, and the strategy's own)."""
        return self.optimizer.state()

    def close(self) -> None:
        self.reducer.close()

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
