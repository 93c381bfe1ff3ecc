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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pbp_hpc.engine import layout, losses, model, optimizers
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers
from pbp_hpc.parallel.pipeline_step import PipelineStep
from pbp_hpc.parallel.tensor import PartsStrategy
from pbp_hpc.parallel.volumes import split_layers  # noqa: F401  (the split by work: one place, shared with the models)


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


def stage_layout(sizes: list[int], stages: list[tuple[int, int]], s: int) -> layout.Layout:
    """Stage s's part of the model as engine.layout's Layout: its layers whole, the others none
    (its flat buffer is that of model.Layout(sizes[lo:hi + 1]), the stage's own network)."""
    lo, hi = stages[s]
    return layout.Layout(list(sizes), [layout.WHOLE if lo <= l < hi else layout.Part("none")
                                       for l in range(len(sizes) - 1)])


def header(stages: list[tuple[int, int]], D: int, microbatches: int, schedule: str) -> str:
    layers = ", ".join(f"stage {s}: layers {lo}..{hi - 1}" for s, (lo, hi) in enumerate(stages))
    return (f"pbp_hpc: grid data {D} x pipeline {len(stages)} ({layers}), "
            f"{microbatches} microbatches a step, schedule {schedule}")


class PipelineStrategy(PartsStrategy):
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grid": {"data": self.grid.D, "tensor": self.grid.T, "pipeline": self.grid.S},
                "pipeline_schedule": self.local.schedule, "microbatches": self.local.M,
                "bytes_per_step": {"activations": self.local.bytes_per_step(), "gradients": self.reducer.wire_bytes()}}


def build(st: Any) -> None:
    """The state of a pipeline-parallel run (train.State's fields) on st.grid (collective over the world)."""
    cfg, xp, grid = st.cfg, st.xp, st.grid
    p = cfg.parallel
    check(cfg, st.comm.size)
    stages = split_layers(cfg.model.layers, grid.S, p.pipeline_split)
    lo, hi = stages[grid.s]
    st.layout = stage_layout(cfg.model.layers, stages, grid.s)  # shards.gather_whole assembles it over grid.model
    mine = model.Layout(cfg.model.layers[lo:hi + 1])  # the stage's own network: the same flat buffer
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
        whole = model.init_params(model.Layout(cfg.model.layers), cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        span = slice(model.Layout(cfg.model.layers).w_slices[lo].start, model.Layout(cfg.model.layers).b_slices[hi - 1].stop)
        st.theta = st.reducer.parameters(lambda out: np.ascontiguousarray(whole[span]))
        st.optimizer = optimizers.make(cfg, st.theta, st.reducer.state_buffer, xp)
        st.local = PipelineStep(mine, st.theta, st.grad, st.reducer.loss_out, st.data.train, xp,
                                -(-cfg.train.batch_size // grid.D), st.reducer.layer_done, grid.pipeline, lo,
                                len(cfg.model.layers) - 1, p.microbatches, p.pipeline_schedule,
                                cfg.model.activation, losses.of(cfg.model))
        st.local.watch = st.watch
        st.strategy.attach(st.local, st.reducer, st.optimizer)
        st.grid_header = header(stages, grid.D, p.microbatches, p.pipeline_schedule)
    except BaseException:
        st.strategy.reducer = getattr(st, "reducer", None)
        st.strategy.close()
        raise
