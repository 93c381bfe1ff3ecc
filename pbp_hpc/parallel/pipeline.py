"""Pipeline parallelism in a training run: `parallel.pipeline: S` stages of consecutive layers.

The world of P = D x S ranks is a grid, the pipeline inner: world rank r = d * S + s (the
process grid's order with T = 1). Stage s holds layers lo_s .. hi_s - 1 whole: the split given
by `parallel.pipeline_split` (layers per stage), or the one that makes the most expensive
stage cheapest (a layer costs n_in x n_out multiply-adds per example, in every pass). Each
pipeline computes its data share of every global minibatch in `parallel.microbatches`
microbatches (parallel/pipeline_step.py: GPipe or 1F1B); each data-parallel group (the D
ranks of one stage) sums its gradient with the blocking reducer over its own communicator,
and every rank applies the optimizer to its stage's parameters only. The update is the one a
single rank makes.

A stage's parameters are one contiguous span of the whole model's flat buffer (layers are
laid out in order): as engine.layout's Layout its other layers are "none", and
parallel.shards gathers the whole model over the grid's model group for checkpoints, saved
models and return_params and gives each stage its span back on resume (a checkpoint resumes
on any grid with the same data-parallel rank count).

With `parallel.tensor: T` as well (a grid of D x T x S ranks, world rank (d S + s) T + t), each
stage's layers are split over the stage's tensor group as engine/tensor_layout.py splits a
network: (column, row) pairs from the stage's first layer; a stage's odd last layer is split by
columns (its output gathered, so that it is sent whole) or replicated, as parallel/tensor_output.py
chooses for each stage. This
rank's part is then the stage's ShardLayout (the Layout's other layers "none"), gathered and
scattered by parallel.shards like any other; the step is PipelineStep over a TensorStep of
the stage's layers (pipeline_step.py's docstring says how they meet).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pbp_hpc.engine import layout, losses, model, optimizers
from pbp_hpc.engine.tensor_layout import ShardLayout
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers, tensor, tensor_output
from pbp_hpc.parallel.pipeline_step import PipelineStep
from pbp_hpc.parallel.synthetic import SyntheticGradient
from pbp_hpc.parallel.tensor import PartsStrategy
from pbp_hpc.parallel.volumes import split_layers  # noqa: F401  (the split by work: one place, shared with the models)
from pbp_hpc.parallel.strategies.base import my_share
from pbp_hpc.parallel.tensor_step import TensorStep, activation_bytes


def check(cfg: Any, size: int) -> None:
    """Refuse, before any work, a world or a network that parallel.pipeline cannot split."""
    p = cfg.parallel
    S, L = p.pipeline, len(cfg.model.layers) - 1
    if size % S:
        raise ConfigError(f"parallel.pipeline is {S} but the job has {size} rank(s): the ranks must be "
                          f"data-parallel groups of S = {S} stages (a multiple of {S})")
    if S > L:
        raise ConfigError(f"parallel.pipeline is {S} but model.layers has {L} layer(s): at most one stage per layer")
    split = p.pipeline_split
    if split is not None and (len(split) != S or sum(split) != L or min(split) < 1):
        raise ConfigError(f"parallel.pipeline_split {split} must give each of the {S} stages at least one layer, "
                          f"{L} in all")
    if p.tensor > 1:  # every stage's layers split over its tensor group (a forced split: its odd last layer too)
        for a, b in split_layers(cfg.model.layers, S, split):
            tensor.check_units(cfg.model.layers[a:b + 1], p.tensor, p.tensor_output == "split", a)


def stage_layout(sizes: list[int], stages: list[tuple[int, int]], s: int,
                 held: Optional[list[layout.Part]] = None) -> layout.Layout:
    """Stage s's part of the model as engine.layout's Layout: its layers whole (or, in a tensor
    group, this rank's parts of them: `held`), the others none. Its flat buffer is that of the
    stage's own network (model.Layout(sizes[lo:hi + 1]), or its tensor_layout.ShardLayout)."""
    lo, hi = stages[s]
    mine = [layout.WHOLE] * (hi - lo) if held is None else list(held)
    none = layout.Part("none")
    return layout.Layout(list(sizes), [none] * lo + mine + [none] * (len(sizes) - 1 - hi))


def header(stages: list[tuple[int, int]], D: int, microbatches: int, schedule: str, T: int = 1,
           kinds: Optional[list[list[str]]] = None, outputs: Optional[list[Optional[str]]] = None) -> str:
    """kinds: each stage's tensor layout (T > 1); outputs: tensor_output's words on each stage's odd last layer."""
    layers = ", ".join(f"stage {s}: layers {lo}..{hi - 1}" + (f" {kinds[s]}" if kinds else "")
                       for s, (lo, hi) in enumerate(stages))
    tensor = f" x tensor {T}" if T > 1 else ""
    last = "".join(f"; stage {s}: {said}" for s, said in enumerate(outputs or []) if said)
    return (f"pbp_hpc: grid data {D}{tensor} x pipeline {len(stages)} ({layers}), "
            f"{microbatches} microbatches a step, schedule {schedule}{last}")


class PipelineStrategy(PartsStrategy):
    def describe(self) -> dict[str, Any]:
        tp = {"tensor_layout": self.local.tp.kinds} if self.local.tp is not None else {}
        return {**super().describe(), "grid": {"data": self.grid.D, "tensor": self.grid.T, "pipeline": self.grid.S},
                **tp, "pipeline_schedule": self.local.schedule, "microbatches": self.local.M,
                "bytes_per_step": {"activations": self.local.bytes_per_step(), "gradients": self.reducer.wire_bytes(),
                                   **self.local.synthetic_bytes()}}


def build(st: Any) -> None:
    """The state of a pipeline-parallel run (train.State's fields) on st.grid (collective over
    the world); with a tensor group (grid.T > 1) each stage's layers split over it."""
    cfg, xp, grid = st.cfg, st.xp, st.grid
    p, sizes = cfg.parallel, cfg.model.layers
    check(cfg, st.comm.size)
    stages = split_layers(sizes, grid.S, p.pipeline_split)
    lo, hi = stages[grid.s]
    rows = -(-cfg.train.batch_size // grid.D)
    said, kinds = None, None
    if grid.T > 1:  # each stage split as tensor_layout splits a network, its odd last layer as chosen
        nets = [(sizes[a:b + 1], a > 0 or b - a > 1) for a, b in stages]
        chosen = tensor_output.decide(p.tensor_output, nets, grid.T, -(-rows // p.microbatches), cfg.model.dtype,
                                      grid.world)
        split = [c for c, _ in chosen]
        said = [w for _, w in chosen]
        mine: Any = ShardLayout(sizes[lo:hi + 1], grid.T, grid.t, split_output=split[grid.s])
        kinds = [ShardLayout(sizes[a:b + 1], grid.T, 0, split_output=out).kinds for (a, b), out in zip(stages, split)]
        st.layout = stage_layout(sizes, stages, grid.s, mine.held.parts)
    else:
        mine = model.Layout(sizes[lo:hi + 1])  # the stage's own network: the same flat buffer
        st.layout = stage_layout(sizes, stages, grid.s)
    # st.layout is what this rank holds: shards.gather_whole assembles the model over grid.model
    st.strategy = PipelineStrategy(cfg, grid, xp)
    try:
        why = ("auto: pipeline parallelism: each stage's data-parallel group sums its gradient in one Allreduce"
               if p.reducer == "auto" else "parallel.reducer")
        st.reducer = reducers.HOST.load("blocking" if p.reducer == "auto" else p.reducer)(
            grid.data, mine, getattr(xp, cfg.model.dtype), xp, grid)
        st.reducer.choice = {"reducer_reason": why}
        st.reducer.watch = st.watch
        reducers.configure(st.reducer, p)
        st.grad = st.reducer.grad
        whole = model.init_params(model.Layout(sizes), cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        st.theta = st.reducer.parameters(lambda out: _part(st.layout, whole))
        st.optimizer = optimizers.make(cfg, st.theta, st.reducer.state_buffer, xp)
        tp = None
        sg = None
        if p.pipeline_schedule == "decoupled" and grid.s < grid.S - 1:  # its output's gradient predicted
            sg = SyntheticGradient(xp, sizes[hi], getattr(xp, cfg.model.dtype), p.synthetic_lr, grid.data,
                                   p.synthetic_rank, cfg.train.seed + grid.s)
        if grid.T > 1:
            tp = TensorStep(mine, st.theta, st.grad, st.reducer.loss_out, st.data.train, xp,
                            -(-rows // p.microbatches), st.reducer.layer_done, grid.tensor,
                            cfg.model.activation, losses.of(cfg.model))
            tp.watch = st.watch
        st.local = PipelineStep(mine, st.theta, st.grad, st.reducer.loss_out, st.data.train, xp, rows,
                                st.reducer.layer_done, grid.pipeline, lo, len(sizes) - 1, p.microbatches,
                                p.pipeline_schedule, cfg.model.activation, losses.of(cfg.model),
                                tp=tp, extras_comm=grid.model if grid.T > 1 else None,
                                synthetic=sg, synthetic_every=p.synthetic_every)
        st.local.watch = st.watch
        st.strategy.attach(st.local, st.reducer, st.optimizer)
        st.grid_header = header(stages, grid.D, p.microbatches, p.pipeline_schedule, grid.T, kinds, said)
        if p.pipeline_schedule == "decoupled":
            st.grid_header += (f"; stages 0..{grid.S - 2} update with synthetic gradients (a linear module of "
                               + ("width x width" if not p.synthetic_rank else f"rank {p.synthetic_rank}")
                               + f", zero at the start, synthetic_lr {p.synthetic_lr:g}, trained on "
                               + ("every microbatch" if p.synthetic_every == 1 else
                                  f"one microbatch in {p.synthetic_every}") + ")")
    except BaseException:
        st.strategy.reducer = getattr(st, "reducer", None)
        st.strategy.close()
        raise


def expected_activation_bytes(sizes: list[int], stages: list[tuple[int, int]], s: int, T: int, t: int, split: bool,
                              rows: int, M: int, itemsize: int) -> int:
    """Activation bytes stage s's tensor rank t sends in a training step of `rows` rows: each
    microbatch's output up and input gradient down, and its tensor group's messages (the
    formula the count is tested against; split: the stage's odd last layer split)."""
    lo, hi = stages[s]
    S = len(stages)
    shard = ShardLayout(sizes[lo:hi + 1], T, t, split_output=split)
    total = 0
    for a, b in (my_share(rows, M, m) for m in range(M)):
        n = b - a
        if n == 0:
            continue
        total += ((n * sizes[hi] if s < S - 1 else 0) + (n * sizes[lo] if s > 0 else 0)) * itemsize
        total += activation_bytes(shard, n, itemsize, stop=False, input_grad=s > 0)
    return total


def _part(held: layout.Layout, whole: np.ndarray) -> np.ndarray:
    """This rank's part of a whole flat model (its stage's span, or its tensor shard of it)."""
    out = np.empty(held.n_params, dtype=whole.dtype)
    layout.take(held, whole, out)
    return out
