"""Gradient reducers: how the ranks' summed gradients become one global sum.

Every reducer works on the same flat buffer, laid out as [layer 0 | layer 1 | ... | extras],
where the extras are scalars that ride along for free: the summed loss and the count of ranks
that were asked to stop (a signal), so no step needs a second collective.

Interface (one small one, as ChainerMN's communicators): `layer_done(l)` is called by the
backward pass as soon as layer l's gradient is final, `finish()` returns when the whole buffer
holds the global sum, and `seconds` accumulates the time spent in communication calls.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from mpi4py import MPI

from .model import Layout

EXTRAS = 2  # slots after the gradients
LOSS_SLOT = 0  # offsets within the extras
STOP_SLOT = 1


class Reducer(Protocol):
    seconds: float

    def layer_done(self, l: int) -> None: ...

    def finish(self) -> None: ...


def buffer_size(layout: Layout) -> int:
    return layout.n_params + EXTRAS


class BlockingReducer:
    """One in-place Allreduce of the whole buffer after the backward pass.

    The fewest messages, so the least latency: the right choice when the buffer is small or
    the network is fast relative to compute.
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        self.comm, self.buf, self.seconds = comm, buf, 0.0

    def layer_done(self, l: int) -> None:
        pass

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        self.seconds += time.perf_counter() - t


class OverlapReducer:
    """A non-blocking Allreduce per layer, started as soon as that layer's gradient is final.

    The top layer is finished first, so its bucket also carries the extras (the loss is
    known after the forward pass). Whether the sends really proceed while the next GEMM runs
    depends on the MPI library's progress engine (MPICH: MPIR_CVAR_ASYNC_PROGRESS=1).
    """

    def __init__(self, comm: MPI.Comm, buf: Any, layout: Layout):
        self.comm, self.buf, self.seconds = comm, buf, 0.0
        spans = [layout.layer_slice(l) for l in range(layout.n_layers)]
        spans[-1] = slice(spans[-1].start, layout.n_params + EXTRAS)
        self.buckets = [buf[s] for s in spans]  # views made once, not per step
        self.requests: list[MPI.Request] = []

    def layer_done(self, l: int) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buckets[l], op=MPI.SUM))
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        if not self.requests:
            return
        t = time.perf_counter()
        MPI.Request.Waitall(self.requests)
        self.requests.clear()
        self.seconds += time.perf_counter() - t


REDUCERS = {"blocking": BlockingReducer, "overlap": OverlapReducer}


def make_reducer(name: str, comm: MPI.Comm, buf: Any, layout: Layout) -> Reducer:
    try:
        return REDUCERS[name](comm, buf, layout)
    except KeyError:
        raise ValueError(f"unknown reducer {name!r}; choose one of {sorted(REDUCERS)}") from None
