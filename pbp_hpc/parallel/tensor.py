"""Tensor parallelism in a training run: `parallel.tensor: T` ranks hold each layer's units in slices.

The world of P = D x T ranks is the process grid (parallel/grid.py), tensor innermost: world
rank r = d * T + t, so the
T ranks of a tensor group are neighbours (one node, where the launcher fills nodes in order)
and the D ranks of a data-parallel group are T apart. Each tensor group computes every step
of its data share together (parallel/tensor_step.py, the layout of engine/tensor_layout.py);
each data-parallel group sums its members' gradient shards with the usual reducer (blocking,
over its own communicator) and every rank applies the optimizer to its shard only, so the
optimizer's state is sharded as the parameters are. The update is the one a single rank makes.

The whole model exists only where it is asked for: this rank's part is `ShardLayout.layout`
(engine.layout), and parallel.shards assembles the whole model over the grid's model group
for checkpoints, train.save_model, return_params and the best model's copy, and gives each
rank its part of a whole model on resume, so a checkpoint written with T = 2 resumes with
T = 1 and the reverse.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from pbp_hpc.data import datasets
from pbp_hpc.engine import losses, model, optimizers
from pbp_hpc.engine.tensor_layout import COL, OUT, ROW, ShardLayout, extract
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers, tensor_output
from pbp_hpc.parallel.strategies.allreduce import AllreduceStrategy
from pbp_hpc.parallel.tensor_step import TensorStep, activation_bytes


def check(cfg: Any, size: int) -> None:
    """Refuse, before any work, a world or a network that parallel.tensor cannot split."""
    T, sizes = cfg.parallel.tensor, cfg.model.layers
    if size % T:
        raise ConfigError(f"parallel.tensor is {T} but the job has {size} rank(s): the ranks must be "
                          f"data-parallel groups of T = {T} (a multiple of {T})")
    check_units(sizes, T, cfg.parallel.tensor_output == "split")


def check_units(sizes: list[int], T: int, split_output: bool, first: int = 0) -> None:
    """Refuse a network (or a pipeline stage's layers, the first of them layer `first` of the
    model) that splits a layer over fewer units than T."""
    kinds = ShardLayout(sizes, T, 0, split_output=split_output).kinds
    split = [(l, sizes[l + 1] if k in (COL, OUT) else sizes[l]) for l, k in enumerate(kinds) if k in (COL, ROW, OUT)]
    narrow = [(l, n) for l, n in split if n < T]
    if narrow:
        l, n = narrow[0]
        raise ConfigError(f"parallel.tensor is {T} but model.layers splits layer {first + l} over {n} unit(s): "
                          f"choose parallel.tensor <= {n}")


def header(sizes: list[int], kinds: list[str], D: int, T: int, output: Optional[str] = None) -> str:
    """output: tensor_output's words on the odd last layer (None: there is none)."""
    pairs = sum(1 for k in kinds if k == ROW)
    last = f"; {output}" if output else ""
    return (f"pbp_hpc: grid data {D} x tensor {T}: {pairs} pair(s) of layers "
            f"split by columns then rows (layers {kinds}){last}")


class PartsStrategy(AllreduceStrategy):
    """Algorithm 5 over the data-parallel group (the grid's data communicator), on a local step
    that holds part of the model (tensor_step, pipeline_step); the local step's own messages
    count as communication, not compute."""

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        before = self.local.seconds
        out = super().step(gidx, lr, stop, at)
        self.compute_s -= self.local.seconds - before
        return out

    @property
    def comm_s(self) -> float:
        return self.reducer.seconds + self.exchange_s + self.local.seconds

    def check(self, loss: float, epoch: int, step: int, params: bool = False) -> None:
        """The divergence check. The ranks holding parts of one model compute the same loss, so
        each checks its own; a fault injected on one of them (debug.fail_*) breaks that, and then
        the loss is summed over the model group first, so that all of them raise together."""
        if self.cfg.debug.fail_step is not None and self.grid.model.size > 1:
            loss = self.grid.model.allreduce(loss)
        super().check(loss, epoch, step, params)


class TensorStrategy(PartsStrategy):
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grid": {"data": self.grid.D, "tensor": self.grid.T, "pipeline": self.grid.S},
                "tensor_layout": self.local.kinds,
                "bytes_per_step": {"activations": self.local.bytes_per_step(), "gradients": self.reducer.wire_bytes()}}


def build(st: Any) -> None:
    """The state of a tensor-parallel run (train.State's fields) on st.grid (collective over the world)."""
    cfg, xp, grid = st.cfg, st.xp, st.grid
    check(cfg, st.comm.size)
    rows = -(-cfg.train.batch_size // grid.D)
    ((split, said),) = tensor_output.decide(cfg.parallel.tensor_output, [(cfg.model.layers, len(cfg.model.layers) > 2)],
                                            grid.T, rows, cfg.model.dtype, grid.world)
    shard = ShardLayout(cfg.model.layers, grid.T, grid.t, split_output=split)
    st.layout = shard.layout  # what this rank holds: shards.gather_whole assembles the model over grid.model
    st.strategy = TensorStrategy(cfg, grid, xp)
    try:
        name = cfg.parallel.reducer
        why = ("auto: tensor parallelism: each data-parallel group sums its gradient shards in one Allreduce"
               if name == "auto" else "parallel.reducer")
        name = "blocking" if name == "auto" else name
        st.reducer = reducers.HOST.load(name)(grid.data, shard, getattr(xp, cfg.model.dtype), xp, grid)
        st.reducer.choice = {"reducer_reason": why}
        st.reducer.watch = st.watch
        reducers.configure(st.reducer, cfg.parallel)
        st.grad = st.reducer.grad
        whole = model.init_params(model.Layout(cfg.model.layers), cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        st.theta = st.reducer.parameters(lambda out: extract(whole, shard, np.empty(shard.n_params, dtype=whole.dtype)))
        st.optimizer = optimizers.make(cfg, st.theta, st.reducer.state_buffer, xp)
        # one data-parallel rank and plain SGD: the shard's gradient is complete here, so the
        # update may happen inside the gradient GEMMs (as engine.step's fused path on one rank)
        fused = grid.D == 1 and st.optimizer.fusable
        skip = xp is np and cfg.train.skip_zero_inputs and datasets.has_active_features(st.data.train)
        st.local = TensorStep(shard, st.theta, st.grad, st.reducer.loss_out, st.data.train, xp,
                              rows, st.reducer.layer_done, grid.tensor,
                              cfg.model.activation, losses.of(cfg.model), fused=fused, skip_zero_inputs=skip)
        st.local.watch = st.watch
        st.strategy.attach(st.local, st.reducer, st.optimizer)
        st.grid_header = header(cfg.model.layers, shard.kinds, grid.D, grid.T, said)
    except BaseException:
        st.strategy.reducer = getattr(st, "reducer", None)
        st.strategy.close()
        raise


def expected_activation_bytes(sizes: list[int], T: int, rows: int, itemsize: int, split_output: bool = False) -> int:
    """Activation bytes a rank sends per training step of `rows` rows (see tensor_step.activation_bytes)."""
    return activation_bytes(ShardLayout(sizes, T, 0, split_output=split_output), rows, itemsize)
