"""The strategy interface: how the ranks combine their work into updates of the parameters.

A strategy is built from the three other parts of a step, each chosen on its own:
the local step (engine.step: this rank's gradient sum), the reducer (parallel.reducers: how a
sum over ranks is carried out) and the optimizer (engine.optimizers: how a gradient becomes an
update). Strategies differ in when and what they combine: the gradient every step
(allreduce), parameters every k steps (local_sgd), or updates pushed without waiting
(async_ps, ssp, hogwild). pbp_hpc.parallel.combinations says which choices go together.

Construction has two phases, because the strategy decides where the parameters live
(private, node-shared, beside its own buffers) before the local step can be built on them:

    strategy = strategies.make(cfg, comm, xp)
    theta = strategy.parameters(reducer, fill)          # and optimizer state: strategy.state_buffer(reducer)
    strategy.attach(local, reducer, optimizer)

The loop then runs blocks of global steps: `block_end(first, limit)` says how far the next
block goes (never past `limit`: the epoch's end or the next evaluation), `run_block(...)` runs
it. At a block's end every rank holds the same parameters, and the loss, the stop requests
and the divergence check are settled together; inside a block a strategy may let ranks drift
apart (local_sgd) or run at their own pace (async_ps, ssp, hogwild). Synchronous strategies
write step() and get one-step blocks for free.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, ContextManager, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.parallel.straggler import Straggler


def my_share(batch: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous part of a global minibatch; sizes differ by at most one."""
    return batch * rank // size, batch * (rank + 1) // size


LrOf = Callable[[int], float]  # global step -> learning rate (the schedule)
StopOf = Callable[[int], bool]  # global step -> whether this rank was asked to stop there
# (loss summed over the block's examples, examples, steps done (first..end), ranks that asked to stop)
BlockResult = tuple[float, int, int, int]


class Strategy:
    name: ClassVar[str] = ""
    # whether one rank may apply a plain SGD update inside the gradient GEMMs (engine.step's fused
    # path): only where the update is the step's own, as in allreduce
    fusable: ClassVar[bool] = False

    def __init__(self, cfg: Any, comm: Any, xp: Any):
        self.cfg, self.comm, self.xp = cfg, comm, xp
        self.local: Any = None
        self.reducer: Any = None
        self.optimizer: Any = None
        self.compute_s = 0.0  # time outside communication calls, accumulated over the run
        # called between the local step and the reduction (debug.fail_*: faults injected on purpose)
        self.after_local: Optional[Callable[[int], None]] = None
        self.straggler = Straggler(cfg, comm)  # study.straggler_*: a rank slowed on purpose

    # -- construction ---------------------------------------------------------------------------
    def parameters(self, reducer: Any, fill: Callable[[Any], Any]) -> Any:
        """The parameter buffer, filled by fill (collective). By default the reducer's."""
        return reducer.parameters(fill)

    def state_buffer(self, reducer: Any) -> Callable[[], Any]:
        """What the optimizer calls for each state buffer it needs (zeroed, parameter-shaped)."""
        return reducer.state_buffer

    def attach(self, local: Any, reducer: Any, optimizer: Any) -> None:
        self.local, self.reducer, self.optimizer = local, reducer, optimizer
        # views the strategies that apply their own updates use (made once, not per step)
        self.theta = optimizer.theta
        self.grad = reducer.grad[: reducer.n]  # this rank's gradient sum
        self.loss = reducer.extras  # the local step writes its loss sum into slot 0
        self.whole = slice(0, reducer.n)  # every parameter: the span of an update from this rank alone
        reducer.watch.warning_s = self.cfg.parallel.stall_warning_s  # the stall check (reducers.base.StallWatch)
        reducer.watch.timeout_s = self.cfg.parallel.stall_timeout_s

    # -- running --------------------------------------------------------------------------------
    def block_end(self, first: int, limit: int, steps: int, epoch: int) -> int:
        """Where the block that starts at step `first` of the epoch ends (exclusive, <= limit)."""
        return first + 1

    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: LrOf, stop_of: StopOf
                  ) -> BlockResult:
        """Global steps first..end-1 of the epoch (its data order `order`); the same result on
        every rank. The default runs step() once per global step and ends early at a stop."""
        B, n = self.cfg.train.batch_size, order.shape[0]
        loss_sum, seen = 0.0, 0
        for s in range(first, end):
            g = epoch * steps + s
            gidx = order[s * B : min((s + 1) * B, n)]
            loss, stop_ranks = self.step(gidx, lr_of(g), stop_of(g), (epoch, s, g))
            loss_sum += loss
            seen += gidx.shape[0]
            if stop_ranks > 0:
                return loss_sum, seen, s + 1, stop_ranks
        return loss_sum, seen, end, 0

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        """One global minibatch (its global example indices): returns (its summed loss, the
        number of ranks that asked to stop), the same on every rank. at: (epoch, step, global step).
        Synchronous strategies write this; others write run_block."""
        raise NotImplementedError(f"strategy {self.name} runs blocks of steps (run_block), not single steps")

    @property
    def comm_s(self) -> float:
        """Time in communication calls so far (the epoch record's allreduce_s)."""
        return self.reducer.seconds

    def state(self) -> dict[str, Any]:
        """Buffers to checkpoint beside the parameters (the optimizer's, and the strategy's own)."""
        return self.optimizer.state()

    def evaluated(self) -> ContextManager[None]:
        """Around a validation or test pass and a saved model: the weights they should see are in
        theta inside (the weight average where train.ema_decay keeps one)."""
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """What the run's record says about the strategy (its settings, staleness where it has any)."""
        return {"strategy": self.name}

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()

    def __enter__(self) -> "Strategy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def share_indices(order: Any, B: int, step: int, part: int, parts: int) -> Any:
    """The global example indices of share `part` (of `parts`) of global minibatch `step`."""
    n = order.shape[0]
    lo_s, hi_s = step * B, min((step + 1) * B, n)
    lo, hi = my_share(hi_s - lo_s, parts, part)
    return order[lo_s + lo : lo_s + hi]


def settle(comm: Any, watch: Any, loss: float, stop: bool, examples: int) -> tuple[float, int, int]:
    """The meeting at a block's end: (loss summed over ranks, ranks that asked to stop, examples)."""
    buf = np.array([loss, 1.0 if stop else 0.0, float(examples)], dtype=np.float64)
    watch.enter()
    try:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    finally:
        watch.leave()
    return float(buf[0]), int(buf[1]), int(buf[2])
