"""Tensor parallelism in a training run: `parallel.tensor: T` ranks hold each layer's units in slices.

The world of P = D x T ranks is a grid, tensor innermost: world rank r = d * T + t, so the
T ranks of a tensor group are neighbours (one node, where the launcher fills nodes in order)
and the D ranks of a data-parallel group are T apart. Each tensor group computes every step
of its data share together (parallel/tensor_step.py, the layout of engine/tensor_layout.py);
each data-parallel group sums its members' gradient shards with the usual reducer (blocking,
over its own communicator) and every rank applies the optimizer to its shard only, so the
optimizer's state is sharded as the parameters are. The update is the one a single rank makes.

The whole model exists only where it is asked for: `Sharding.gather` assembles it (every
rank of each tensor group gets it) for checkpoints, train.save_model, return_params and the
best model's copy; `Sharding.scatter` gives each rank its part of a whole model on resume,
so a checkpoint written with T = 2 resumes with T = 1 and the reverse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from pbp_hpc.data import datasets
from pbp_hpc.engine import backend, model, optimizers
from pbp_hpc.engine.tensor_layout import COL, FULL, ROW, ShardLayout, assemble, extract
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import reducers
from pbp_hpc.parallel.strategies.allreduce import AllreduceStrategy
from pbp_hpc.parallel.tensor_step import TensorStep, activation_bytes


def split_world(comm: MPI.Comm, T: int) -> tuple[MPI.Comm, MPI.Comm]:
    """(data-parallel group, tensor group) of this rank: rank r is (d, t) = divmod(r, T)."""
    d, t = divmod(comm.rank, T)
    tensor = comm.Split(color=d, key=t)
    data = comm.Split(color=t, key=d)
    return data, tensor


def check(cfg: Any, size: int) -> None:
    """Refuse, before any work, a world or a network that parallel.tensor cannot split."""
    T, sizes = cfg.parallel.tensor, cfg.model.layers
    if size % T:
        raise ConfigError(f"parallel.tensor is {T} but the job has {size} rank(s): the ranks must be "
                          f"data-parallel groups of T = {T} (a multiple of {T})")
    kinds = ShardLayout(sizes, T, 0).kinds
    split = [(l, sizes[l + 1] if k == COL else sizes[l]) for l, k in enumerate(kinds) if k in (COL, ROW)]
    narrow = [(l, n) for l, n in split if n < T]
    if narrow:
        l, n = narrow[0]
        raise ConfigError(f"parallel.tensor is {T} but model.layers splits layer {l} over {n} unit(s): "
                          f"choose parallel.tensor <= {n}")


class Sharding:
    """This rank's part of the model and the tensor group that holds the rest of it."""

    def __init__(self, sizes: list[int], tensor: MPI.Comm, dtype: Any, xp: Any):
        self.sizes, self.tensor, self.dtype, self.xp = sizes, tensor, np.dtype(dtype), xp
        self.shard = ShardLayout(sizes, tensor.size, tensor.rank)
        self.n_whole = model.Layout(sizes).n_params

    def local(self, whole: np.ndarray) -> np.ndarray:
        """This rank's part of a whole flat model (host)."""
        return extract(np.asarray(whole), self.shard, np.empty(self.shard.n_params, dtype=self.dtype))

    def gather(self, buf: Any) -> np.ndarray:
        """The whole model (host) from every tensor rank's buf (collective over the tensor group)."""
        mine = np.ascontiguousarray(backend.to_host(buf)[: self.shard.n_params])
        shards = self.tensor.allgather(mine)
        return assemble(shards, self.sizes, np.empty(self.n_whole, dtype=mine.dtype))

    def scatter(self, whole: Any, buf: Any) -> None:
        """buf <- this rank's part of a whole flat model."""
        buf[: self.shard.n_params] = self.xp.asarray(self.local(whole))

    def header(self, data_size: int) -> str:
        kinds = self.shard.kinds
        pairs = sum(1 for k in kinds if k == ROW)
        last = ("; the odd last layer is replicated (splitting it would add an Allgather of B x "
                f"{self.sizes[-1]} and an Allreduce of B x {self.sizes[-2]} a step)") if kinds[-1] == FULL else ""
        return (f"pbp_hpc: grid data {data_size} x tensor {self.tensor.size}: {pairs} pair(s) of layers "
                f"split by columns then rows (layers {kinds}){last}")


class TensorStrategy(AllreduceStrategy):
    """Algorithm 5 over the data-parallel group, on a tensor-parallel local step; the tensor
    group's Allreduces count as communication, not compute."""

    def __init__(self, cfg: Any, data: MPI.Comm, tensor: MPI.Comm, xp: Any):
        super().__init__(cfg, data, xp)
        self.tensor = tensor

    def step(self, gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> tuple[float, int]:
        before = self.local.seconds
        out = super().step(gidx, lr, stop, at)
        self.compute_s -= self.local.seconds - before
        return out

    @property
    def comm_s(self) -> float:
        return self.reducer.seconds + self.local.seconds

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "grid": {"data": self.comm.size, "tensor": self.tensor.size, "pipeline": 1},
                "tensor_layout": self.local.kinds,
                "bytes_per_step": {"activations": self.local.bytes_per_step(), "gradients": self.reducer.wire_bytes()}}

    def close(self) -> None:
        try:
            super().close()
        finally:
            for c in (self.comm, self.tensor):
                if c != MPI.COMM_NULL:
                    c.Free()
            self.comm = self.tensor = MPI.COMM_NULL


def build(st: Any) -> None:
    """The state of a tensor-parallel run (train.State's fields), collective over the world."""
    cfg, comm, xp = st.cfg, st.comm, st.xp
    check(cfg, comm.size)
    data, tensor = split_world(comm, cfg.parallel.tensor)
    st.strategy = TensorStrategy(cfg, data, tensor, xp)
    st.data_comm = data
    st.sharding = sh = Sharding(cfg.model.layers, tensor, cfg.model.dtype, xp)
    try:
        name = cfg.parallel.reducer
        why = ("auto: tensor parallelism: each data-parallel group sums its gradient shards in one Allreduce"
               if name == "auto" else "parallel.reducer")
        name = "blocking" if name == "auto" else name
        st.reducer = reducers.HOST.load(name)(data, sh.shard, getattr(xp, cfg.model.dtype), xp)
        st.reducer.choice = {"reducer_reason": why}
        reducers.configure(st.reducer, cfg.parallel)
        st.grad = st.reducer.grad
        whole = model.init_params(st.layout, cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        st.theta = st.reducer.parameters(lambda out: sh.local(whole))
        st.optimizer = optimizers.make(cfg, st.theta, st.reducer.state_buffer, xp)
        n = sh.shard.n_params
        # one data-parallel rank and plain SGD: the shard's gradient is complete here, so the
        # update may happen inside the gradient GEMMs (as engine.step's fused path on one rank)
        fused = data.size == 1 and st.optimizer.fusable
        skip = xp is np and cfg.train.skip_zero_inputs and datasets.has_active_features(st.data.train)
        st.local = TensorStep(sh.shard, st.theta, st.grad, st.grad[n:n + 1], st.data.train, xp,
                              -(-cfg.train.batch_size // data.size), st.reducer.layer_done, tensor,
                              cfg.model.activation, cfg.model.loss, fused=fused, skip_zero_inputs=skip)
        st.strategy.attach(st.local, st.reducer, st.optimizer)
        st.grid_header = sh.header(data.size)
    except BaseException:
        st.strategy.reducer = getattr(st, "reducer", None)
        st.strategy.close()
        raise


def expected_activation_bytes(sizes: list[int], T: int, rows: int, itemsize: int) -> int:
    """Activation bytes a rank sends per training step of `rows` rows (see tensor_step.activation_bytes)."""
    return activation_bytes(ShardLayout(sizes, T, 0), rows, itemsize)
