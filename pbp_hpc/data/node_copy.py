"""One copy of a loaded data set per node, in an MPI-3 shared window (data.one_copy_per_node).

Every rank holding its own copy of MNIST costs ~55 MB a rank: 1.7 GB for 32 ranks on a node.
Here the node's first rank loads the set alone, copies its arrays into one window that the
node's ranks map (MPI_Win_allocate_shared, as the shm reducer's gradient rows), and every rank
of the node reads them through read-only views. The other ranks neither read the files nor
decompress them.

Freeing the window is collective over the node and invalidates the views: whoever holds them
calls the returned release() once no rank will read them again (pbp_hpc.train: when the run's
State closes). Without it the window lives until MPI_Finalize.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import numpy as np
from mpi4py import MPI

from pbp_hpc.errors import DataError

T = TypeVar("T")
ALIGN = 64  # each array starts on a cache line
# data.one_copy_per_node: auto shares from this many ranks on a node. Measured here (2 cores, MNIST,
# Net-1h, batch 128): 2 ranks reading one shared copy took 2.6-2.9 s per epoch against 2.2-2.5 with a
# copy each (their GEMMs slower too, and twice the system time; the gather itself only 5-10%
# slower): below 5 ranks the memory saved (55 MB a rank) is not worth it.
AUTO_MIN_RANKS = 5


def _nothing() -> None:
    pass


def once_per_node(comm: MPI.Comm, load: Callable[[], T], min_ranks: int = 2) -> tuple[T, Callable[[], None]]:
    """load() run by the node's first rank; the numpy arrays of the dataclass it returns shared
    by the node's ranks (collective over comm). Returns (the loaded dataclass, release). On a node
    with fewer than min_ranks ranks, every rank loads its own copy (no window).

    A DataError or OSError on the loading rank is raised on every rank of its node, so the
    node's ranks fail together (pbp_hpc.parallel.runtime.together then tells the other nodes).
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    if node.size < max(2, min_ranks):  # nobody to share with, or too few to be worth it: no window
        node.Free()
        return load(), _nothing
    loaded: Any = None
    message: Any = None
    if node.rank == 0:
        try:
            loaded = load()
        except (DataError, OSError) as exc:
            message = str(exc)
        if loaded is not None:
            arrays = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)
                      if isinstance(getattr(loaded, f.name), np.ndarray)}
            # what the other ranks need to build the same object: every field but the arrays' data
            message = (dataclasses.replace(loaded, **{k: None for k in arrays}),
                       [(k, a.shape, a.dtype.str) for k, a in arrays.items()])
    message = node.bcast(message, root=0)
    if isinstance(message, str):
        node.Free()
        raise DataError(message)
    skeleton, specs = message
    offsets, total = [], 0
    for _, shape, dtype in specs:
        offsets.append(total)
        total += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    win = MPI.Win.Allocate_shared(total if node.rank == 0 else 0, 1, comm=node)
    memory = win.Shared_query(0)[0]
    views = {}
    for (name, shape, dtype), offset in zip(specs, offsets):
        views[name] = np.frombuffer(memory, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        if node.rank == 0:
            views[name][...] = getattr(loaded, name)
    del loaded  # the loading rank's private copy goes
    win.Fence()  # the copies are complete, and visible to every rank of the node
    for view in views.values():
        view.flags.writeable = False  # one rank writing would change every rank's data

    def release() -> None:
        win.Free()
        node.Free()

    return dataclasses.replace(skeleton, **views), release
