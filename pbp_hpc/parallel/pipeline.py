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
laid out in order), so the whole model is the stages' buffers end to end: `StageSharding`
gathers it for checkpoints, saved models and return_params and gives each stage its span
back on resume (a checkpoint resumes on any grid with the same data-parallel rank count).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine import backend, model, optimizers
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers
from pbp_hpc.parallel.pipeline_step import PipelineStep
from pbp_hpc.parallel.strategies.allreduce import AllreduceStrategy


def split_layers(sizes: list[int], S: int, given: Optional[list[int]] = None) -> list[tuple[int, int]]:
    """Each stage's layers (lo, hi): the given counts, or the contiguous split whose most
    expensive stage is cheapest (ties: the earlier cut)."""
    L = len(sizes) - 1
    if given is not None:
        counts = list(given)
    else:
        cost = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
        best: Optional[tuple[int, tuple[int, ...]]] = None
        for cuts in itertools.combinations(range(1, L), S - 1):
            bounds = (0, *cuts, L)
            worst = max(sum(cost[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
            if best is None or worst < best[0]:
                best = (worst, cuts)
        assert best is not None
        bounds = (0, *best[1], L)
        counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    edges = [0, *itertools.accumulate(counts)]
    return list(zip(edges[:-1], edges[1:]))


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


class StageSharding:
    """This stage's span of the whole flat model, and the pipeline group that holds the rest."""

    def __init__(self, sizes: list[int], stages: list[tuple[int, int]], pipe: MPI.Comm, xp: Any):
        self.sizes, self.stages, self.pipe, self.xp = sizes, stages, pipe, xp
        whole = model.Layout(sizes)
        lo, hi = stages[pipe.rank]
        self.span = slice(whole.w_slices[lo].start, whole.b_slices[hi - 1].stop)
        self.layout = model.Layout(sizes[lo:hi + 1])
        self.n_whole = whole.n_params

    def gather(self, buf: Any) -> np.ndarray:
        mine = np.ascontiguousarray(backend.to_host(buf)[: self.layout.n_params])
        return np.concatenate(self.pipe.allgather(mine))

    def scatter(self, whole: Any, buf: Any) -> None:
        buf[: self.layout.n_params] = self.xp.asarray(np.asarray(whole)[self.span])

    def header(self, data_size: int, microbatches: int, schedule: str) -> str:
        layers = ", ".join(f"stage {s}: layers {lo}..{hi - 1}" for s, (lo, hi) in enumerate(self.stages))
        return (f"pbp_hpc: grid data {data_size} x pipeline {self.pipe.size} ({layers}), "
                f"{microbatches} microbatches a step, schedule {schedule}")


class PipelineStrategy(AllreduceStrategy):
    """Algorithm 5 over the data-parallel group, on a pipeline stage's local step; waiting for
    the neighbours' messages counts as communication, not compute."""

    def __init__(self, cfg: Any, data: MPI.Comm, pipe: MPI.Comm, xp: Any):
        super().__init__(cfg, data, xp)
        self.pipe = pipe

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        before = self.local.seconds
        out = super().step(gidx, lr, stop, at)
        self.compute_s -= self.local.seconds - before
        return out

    @property
    def comm_s(self) -> float:
        return self.reducer.seconds + self.local.seconds

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grid": {"data": self.comm.size, "tensor": 1, "pipeline": self.pipe.size},
                "pipeline_schedule": self.local.schedule, "microbatches": self.local.M,
                "bytes_per_step": {"activations": self.local.bytes_per_step(), "gradients": self.reducer.wire_bytes()}}

    def close(self) -> None:
        try:
            super().close()
        finally:
            for c in (self.comm, self.pipe):
                if c != MPI.COMM_NULL:
                    c.Free()
            self.comm = self.pipe = MPI.COMM_NULL


def build(st: Any) -> None:
    """The state of a pipeline-parallel run (train.State's fields), collective over the world."""
    cfg, comm, xp = st.cfg, st.comm, st.xp
    p = cfg.parallel
    check(cfg, comm.size)
    d, s = divmod(comm.rank, p.pipeline)
    pipe = comm.Split(color=d, key=s)
    data = comm.Split(color=s, key=d)
    st.strategy = PipelineStrategy(cfg, data, pipe, xp)
    st.data_comm = data
    stages = split_layers(cfg.model.layers, p.pipeline, p.pipeline_split)
    st.sharding = sh = StageSharding(cfg.model.layers, stages, pipe, xp)
    try:
        why = ("auto: pipeline parallelism: each stage's data-parallel group sums its gradient in one Allreduce"
               if p.reducer == "auto" else "parallel.reducer")
        st.reducer = reducers.HOST.load("blocking" if p.reducer == "auto" else p.reducer)(
            data, sh.layout, getattr(xp, cfg.model.dtype), xp)
        st.reducer.choice = {"reducer_reason": why}
        reducers.configure(st.reducer, p)
        st.grad = st.reducer.grad
        whole = model.init_params(st.layout, cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        st.theta = st.reducer.parameters(lambda out: np.ascontiguousarray(whole[sh.span]))
        st.optimizer = optimizers.make(cfg, st.theta, st.reducer.state_buffer, xp)
        n = sh.layout.n_params
        st.local = PipelineStep(sh.layout, st.theta, st.grad, st.grad[n:n + 1], st.data.train, xp,
                                -(-cfg.train.batch_size // data.size), st.reducer.layer_done, pipe, stages[s][0],
                                len(cfg.model.layers) - 1, p.microbatches, p.pipeline_schedule,
                                cfg.model.activation, cfg.model.loss)
        st.strategy.attach(st.local, st.reducer, st.optimizer)
        st.grid_header = sh.header(data.size, p.microbatches, p.pipeline_schedule)
    except BaseException:
        st.strategy.reducer = getattr(st, "reducer", None)
        st.strategy.close()
        raise
