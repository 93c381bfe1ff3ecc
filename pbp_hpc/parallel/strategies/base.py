"""The strategy interface: how the ranks combine their work into updates of the parameters.

A strategy is built from the three other parts of a step, each chosen on its own:
the local step (engine.step: this rank's gradient sum), the reducer (parallel.reducers: how a
sum over ranks is carried out) and the optimizer (engine.optimizers: how a gradient becomes an
update). Strategies differ in when and what they combine: the gradient every step
(allreduce), parameters every k steps (local_sgd), or updates pushed without waiting
(async_ps, ssp, hogwild). Each works on communicators of the run's process grid
(parallel.grid): `self.comm` is the grid's data group, the ranks that hold the same part of
the model.

Construction has two phases, because the strategy decides where the parameters live
(private, node-shared, beside its own buffers) before the local step can be built on them:

    strategy = strategies.make(cfg, grid, xp)
    theta = strategy.parameters(reducer, fill)          # and optimizer state: strategy.state_buffer(reducer)
    strategy.attach(local, reducer, optimizer)

The loop then runs blocks of global steps: `block_end(first, limit)` says how far the next
block goes (never past `limit`: the epoch's end or the next evaluation), `run_block(...)` runs
it. At a block's end every rank holds the same parameters, and the loss, the stop requests
and the divergence check are settled together (`settle`); inside a block a strategy may let
ranks drift apart (local_sgd) or run at their own pace (async_ps, ssp, hogwild). Synchronous
strategies write step() and get one-step blocks for free. Every strategy runs its local steps
through `compute()`, which does the chores around one (timing, the fault hook, the GPU sync,
the straggler, the stall check's step) once for all of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, ClassVar, ContextManager, Optional

import numpy as np

from pbp_hpc.errors import DivergenceError
from pbp_hpc.parallel.straggler import Straggler
from pbp_hpc.protocols import LocalStep, Optimizer, Reducer


def my_share(batch: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous part of a global minibatch; sizes differ by at most one."""
    return batch * rank // size, batch * (rank + 1) // size


LrOf = Callable[[int], float]  # global step -> learning rate (the schedule)
StopOf = Callable[[int], bool]  # global step -> whether this rank was asked to stop there
# (loss summed over the block's examples, examples, steps done (first..end), ranks that asked to stop)
BlockResult = tuple[float, int, int, int]


class Strategy:
    # What a strategy is, declared once: the config's combination rules (combinations.py), the
    # resume key (resume.py), the reducer `auto` picks and analyze's grouping are read from these.
    name: ClassVar[str] = ""
    # sums a gradient over ranks every step: any reducer and compression go; False: it exchanges
    # parameters or updates itself over private buffers (reducer auto -> blocking, no compression)
    sums_gradients: ClassVar[bool] = False
    asynchronous: ClassVar[bool] = False  # ranks run at their own pace inside a block (analyze groups them)
    host_only: ClassVar[bool] = False  # exchanges host buffers (MPI windows, node shared memory): not with cupy
    keys: ClassVar[tuple[str, ...]] = ()  # its parallel.* settings: a checkpoint resumes only with the same
    # whether one rank may apply a plain SGD update inside the gradient GEMMs (engine.step's fused
    # path): only where the update is the step's own, as in allreduce
    fusable: ClassVar[bool] = False
    # each rank applies its own update per share (P updates per global minibatch): each carries
    # 1/P of the weight decay
    splits_decay: ClassVar[bool] = False

    def __init__(self, cfg: Any, grid: Any, xp: Any):
        self.cfg, self.grid, self.xp = cfg, grid, xp
        self.comm = grid.data  # the ranks holding the same part of the model
        self.local: Optional[LocalStep] = None
        self.reducer: Optional[Reducer] = None
        self.optimizer: Optional[Optimizer] = None
        self.watch: Any = None  # the run's stall check (parallel.stall), the reducer's
        self.compute_s = 0.0  # time outside communication calls, accumulated over the run
        self.exchange_s = 0.0  # time in the strategy's own communication (comm_s adds the reducer's)
        # called between the local step and the reduction (debug.fail_*: faults injected on purpose)
        self.after_local: Optional[Callable[[int], None]] = None
        self.straggler = Straggler(cfg, self.comm)  # study.straggler_*: a rank slowed on purpose
        self.sync: Callable[[], None] = lambda: None  # GPU kernels run asynchronously: compute time must hold them
        self.noise: Any = None  # parallel.noise_scale.NoiseScale, where the run estimates it (train.State)

    # -- construction ---------------------------------------------------------------------------
    def parameters(self, reducer: Reducer, fill: Callable[[Any], Any]) -> Any:
        """The parameter buffer, filled by fill (collective). By default the reducer's."""
        return reducer.parameters(fill)

    def state_buffer(self, reducer: Reducer) -> Callable[[], Any]:
        """What the optimizer calls for each state buffer it needs (zeroed, parameter-shaped)."""
        return reducer.state_buffer

    def attach(self, local: LocalStep, reducer: Reducer, optimizer: Optimizer) -> None:
        self.local, self.reducer, self.optimizer = local, reducer, optimizer
        # views the strategies that apply their own updates use (made once, not per step)
        self.theta = optimizer.theta
        self.grad = reducer.grad[: reducer.n]  # this rank's gradient sum
        self.loss = reducer.extras  # the local step writes its loss sum into slot 0
        self.whole = slice(0, reducer.n)  # every parameter: the span of an update from this rank alone
        self.watch = reducer.watch
        self.watch.warning_s = self.cfg.parallel.stall_warning_s  # the stall check (parallel.stall)
        self.watch.timeout_s = self.cfg.parallel.stall_timeout_s
        if self.splits_decay:
            optimizer.weight_decay /= self.comm.size
        if self.xp is not np:
            from pbp_hpc.parallel import gpu

            self.sync = gpu.stream_sync(self.xp)

    def restored(self) -> None:
        """After a resume wrote the checkpoint's parameters into self.theta on every rank
        (collective): a strategy whose parameters live elsewhere too (windows, a node's shared
        copy) makes that copy hold them before any rank reads it."""

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

    # -- the pieces every strategy's step is made of ----------------------------------------------
    def compute(self, idx: Any, g: int, scale: float = 0.0, lr: Optional[float] = None, batch: float = 0.0) -> None:
        """The local step on examples idx at global step g, with its chores: the fault hook, the
        GPU sync, the straggler's pause, the stall check's step, the time counted as compute.

        scale: -lr / B for a local step that applies the update in its GEMMs. lr: update every
        parameter from this share alone, lr / batch times its gradient sum (local_sgd, hogwild,
        async_ps), before the straggler's pause (which scales with all of it)."""
        tc = time.perf_counter()
        self.local(idx, scale)
        if self.after_local is not None:
            self.after_local(g)
        if lr is not None:
            self.optimizer.apply(self.whole, [self.grad], lr, batch)
        self.sync()
        if self.straggler.active:  # study.straggler_*: a slow rank's compute (so it counts as compute)
            self.straggler.after(g, time.perf_counter() - tc)
        self.watch.step = g
        self.compute_s += time.perf_counter() - tc

    def settle(self, loss: float, stop: bool, examples: int, epoch: int, end: int, params: bool = False
               ) -> BlockResult:
        """The meeting at a block's end: the loss summed over ranks, the stop requests counted, the
        examples counted, and the divergence check (of the parameters too where `params`: an
        update pushed without waiting may have made them non-finite with a finite loss)."""
        from mpi4py import MPI

        buf = np.array([loss, 1.0 if stop else 0.0, float(examples)], dtype=np.float64)
        t = time.perf_counter()
        with self.watch:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.exchange_s += time.perf_counter() - t
        self.check(float(buf[0]), epoch, end - 1, params)
        return float(buf[0]), int(buf[2]), end, int(buf[1])

    def check(self, loss: float, epoch: int, step: int, params: bool = False) -> None:
        """DivergenceError where the settled loss (or, with params, a parameter) is not finite:
        raised on every rank alike, since every rank checks the same settled values."""
        if math.isfinite(loss) and not (params and not bool(np.isfinite(self.theta).all())):
            return
        hint = "for asynchronous updates" if self.asynchronous else ""
        raise DivergenceError(f"training diverged at epoch {epoch} step {step}: loss is {loss} "
                              f"(the learning rate is likely too high{' ' + hint if hint else ''})", epoch, step)

    @property
    def comm_s(self) -> float:
        """Time in communication calls so far: the reducer's and the strategy's own exchanges."""
        return self.reducer.seconds + self.exchange_s

    def state(self) -> dict[str, Any]:
        """Buffers to checkpoint beside the parameters (the optimizer's, and the strategy's own)."""
        return self.optimizer.state()

    def evaluated(self) -> ContextManager[None]:
        """Around a validation or test pass and a saved model: the weights they should see are in
        theta inside (the weight average where train.ema_decay keeps one)."""
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        """What the run's record says about the strategy (its settings, staleness where it has any)."""
        return {"strategy": self.name, **{k: getattr(self.cfg.parallel, k) for k in self.keys}}

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


def mean_share(order: Any, B: int, step: int, parts: int) -> float:
    """The mean share's size of global minibatch `step` (its size / parts): what an update from one
    share divides by, so that the average of the parts' updates is allreduce's."""
    return (min((step + 1) * B, order.shape[0]) - step * B) / parts


def every_k(k: int, first: int, limit: int, steps: int, epoch: int) -> int:
    """block_end for a strategy that meets after global steps k-1, 2k-1, ... (and at `limit`)."""
    g = epoch * steps + first
    return min(limit, first + k - g % k)
