"""The process grid: which communicator each piece of a run works on, made once per run.

P = D x T x S ranks: D data-parallel replicas, each holding the model split over T tensor ranks
(a layer's units) and S pipeline stages (consecutive layers). Rank order puts the tensor rank
innermost, so a tensor group sits on one node:

    world rank = (d * S + s) * T + t

    data      the D ranks with the same (s, t): they hold the same part of the model and sum
              its gradients (reducers and strategies work on this one)
    tensor    the T ranks with the same (d, s): together they hold one stage's layers
    pipeline  the S ranks with the same (d, t): consecutive stages
    model     the T x S ranks with the same d: together one whole model (gather_whole's group)
    node      the data group's ranks that share this node's memory (MPI_COMM_TYPE_SHARED)
    across    the data group's ranks with this one's node rank, one per node (COMM_SELF on one node)

With T = S = 1 (the default) `data` is the world itself and tensor, pipeline and model are
COMM_SELF: exactly the single communicator every run used before the grid. A communicator is
split only where it differs from the world and from COMM_SELF; on one node `node` is the data
communicator itself (MPICH gives each new communicator shared buffers of its own). close()
frees what make_grid split (collective).

    grid = make_grid(MPI.COMM_WORLD, cfg)   # or make_grid(world, (D, T, S)), D may be None
    prev, nxt = grid.ring()                 # data-group ring neighbours (ranks in grid.data)
    before, after = grid.stages()           # pipeline neighbours (MPI.PROC_NULL at the ends)
    grid.close()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from mpi4py import MPI

from pbp_hpc.errors import ConfigError


@dataclass(frozen=True)
class Grid:
    world: MPI.Comm
    D: int
    T: int
    S: int
    d: int  # this rank's coordinates
    t: int
    s: int
    data: MPI.Comm
    tensor: MPI.Comm
    pipeline: MPI.Comm
    model: MPI.Comm
    node: MPI.Comm
    across: MPI.Comm
    node_sizes: tuple[int, ...]  # the data group's ranks on each node, one entry per node
    _owned: list = field(default_factory=list, repr=False, compare=False)

    @property
    def nodes(self) -> int:
        """How many nodes the data group spans."""
        return len(self.node_sizes)

    @property
    def equal_nodes(self) -> bool:
        """Whether every node holds as many of the data group's ranks (node-shared buffers need it)."""
        return len(set(self.node_sizes)) == 1

    @property
    def one_node(self) -> bool:
        return self.node.size == self.data.size

    def ring(self, comm: Optional[MPI.Comm] = None) -> tuple[int, int]:
        """(previous, next) rank on a ring over comm (the data group by default)."""
        comm = self.data if comm is None else comm
        return (comm.rank - 1) % comm.size, (comm.rank + 1) % comm.size

    def stages(self) -> tuple[int, int]:
        """(previous, next) pipeline stage's rank in `pipeline`; MPI.PROC_NULL past either end."""
        return (self.s - 1 if self.s > 0 else MPI.PROC_NULL, self.s + 1 if self.s < self.S - 1 else MPI.PROC_NULL)

    def close(self) -> None:
        """Free the communicators make_grid split (collective; idempotent)."""
        while self._owned:
            c = self._owned.pop()
            if c != MPI.COMM_NULL:
                c.Free()


Dims = Sequence[Optional[int]]  # (D, T, S); D None: world.size // (T * S)


def dims_of(cfg_or_dims: Union[Any, Dims], size: int) -> tuple[int, int, int]:
    """(D, T, S) from a config (parallel.tensor, parallel.pipeline; 1 where absent) or a triple."""
    if isinstance(cfg_or_dims, (tuple, list)):
        D, T, S = cfg_or_dims
    else:
        par = cfg_or_dims.parallel
        D, T, S = None, getattr(par, "tensor", 1) or 1, getattr(par, "pipeline", 1) or 1
    if T < 1 or S < 1 or size % (T * S):
        raise ConfigError(f"parallel.tensor={T} x parallel.pipeline={S} does not divide the {size} ranks: "
                          "launch a multiple of tensor x pipeline ranks")
    D = size // (T * S) if D is None else D
    if D * T * S != size:
        raise ConfigError(f"the grid {D} x {T} x {S} (data x tensor x pipeline) is {D * T * S} ranks, "
                          f"but the world has {size}")
    return D, T, S


def make_grid(world: MPI.Comm, cfg_or_dims: Union[Any, Dims] = (None, 1, 1)) -> Grid:
    """The grid of this run (collective over world)."""
    D, T, S = dims_of(cfg_or_dims, world.size)
    r = world.rank
    t, s, d = r % T, (r // T) % S, r // (T * S)
    owned: list = []

    # Split is collective over world: every rank takes part in the same calls, in the same order
    data = _split(world, D, s * T + t, d, owned)
    tensor = _split(world, T, d * S + s, t, owned)
    pipeline = _split(world, S, d * T + t, s, owned)
    model = _split(world, T * S, d, s * T + t, owned)
    node, across, node_sizes = _nodes(data, owned)
    return Grid(world, D, T, S, d, t, s, data, tensor, pipeline, model, node, across, node_sizes, owned)


def _split(world: MPI.Comm, n: int, color: int, key: int, owned: list) -> MPI.Comm:
    """The n-rank communicator of this color: the world or COMM_SELF where it is one of them.
    n is the same on every rank, so every rank skips (or makes) the same collective Split."""
    if n == 1:
        return MPI.COMM_SELF
    if n == world.size:
        return world
    c = world.Split(color, key)
    owned.append(c)
    return c


def _nodes(data: MPI.Comm, owned: list) -> tuple[MPI.Comm, MPI.Comm, tuple[int, ...]]:
    """The data group's node-local and across-node communicators, and its ranks per node
    (collective over data)."""
    if data.size == 1:
        return data, MPI.COMM_SELF, (1,)
    node = data.Split_type(MPI.COMM_TYPE_SHARED, key=data.rank)
    sizes = tuple(n for n in data.allgather(node.size if node.rank == 0 else 0) if n)
    if len(sizes) == 1:  # one node: the data communicator itself
        node.Free()
        return data, MPI.COMM_SELF, sizes
    owned.append(node)
    across = data.Split(node.rank, key=data.rank)
    owned.append(across)
    return node, across, sizes
