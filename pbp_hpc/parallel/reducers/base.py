"""The reducer interface: how the ranks' gradient sums become one global sum.

Every reducer owns the same flat buffer, laid out as [layer 0 | layer 1 | ... | extras], where
the extras are scalars that ride along for free: the summed loss and the count of ranks that
were asked to stop (a signal), so no step needs a second collective.

A step, as the allreduce strategy runs it:
    local step writes grad (calling layer_done(l) as each layer's gradient is final)
    finish()                      grad's extras are global; every span of shares() sums to the global gradient
    for span, parts in shares():  the optimizer updates parameters[span] from sum(parts)
    updated()                     every rank sees the new parameters before its next forward pass

A new reducer is a module with a subclass of Reducer, registered by name in
pbp_hpc.parallel.reducers (or from outside with reducers.register). Only finish() must be
written; the rest have defaults for a reducer that sums the whole buffer in place.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, ClassVar, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.model import Layout
from pbp_hpc.parallel.reducers import EXTRAS, LOSS_SLOT, NOISE_SLOT, STOP_SLOT  # noqa: F401  (defined with the registry: no MPI)
from pbp_hpc.parallel.stall import StallWatch  # noqa: F401  (where it lived)

Fill = Callable[[Optional[np.ndarray]], np.ndarray]  # fill(out) -> the initial parameters (into out if given)


def buffer_size(layout: Layout) -> int:
    return layout.n_params + EXTRAS


class Reducer:
    """Base class: a gradient buffer of its own, parameters of the caller's namespace, no update of its own."""

    name: ClassVar[str] = ""
    # True where the summation happens in the update (shm): its time counts as communication
    sums_in_update: ClassVar[bool] = False

    def __init__(self, comm: MPI.Comm, layout: Layout, dtype: Any, xp: Any, grid: Any = None):
        """comm: the communicator whose ranks' sums it adds (the grid's data group); grid: the
        run's parallel.grid.Grid, whose node and across communicators node-shared reducers use
        (None: a reducer made on a bare communicator, in tests)."""
        self.comm, self.layout, self.xp, self.dtype, self.grid = comm, layout, xp, dtype, grid
        self.n = layout.n_params
        self.seconds = 0.0  # time in communication calls, accumulated over the run
        self.choice: dict[str, Any] = {}  # how the factory chose this reducer (device runs), for the record
        self.watch = StallWatch(comm)  # the run's state hands its own in (train.State); this one for tests
        self.grad = self.allocate(buffer_size(layout))
        self.extras = self.grad[self.n :]
        self.loss_out = self.grad[self.n + LOSS_SLOT : self.n + LOSS_SLOT + 1]  # where the local step writes its loss
        self._shares = [(slice(0, self.n), [self.grad[: self.n]])]

    def allocate(self, size: int) -> Any:
        """The flat gradient buffer (collective where a reducer shares it)."""
        return self.xp.zeros((size,), dtype=self.dtype)

    def parameters(self, fill: Fill) -> Any:
        """The parameter buffer, filled by fill (collective where a reducer shares it)."""
        return self.xp.asarray(fill(None))

    def state_buffer(self) -> Any:
        """A zeroed buffer shaped like the parameters, for an optimizer's state (shared where they are)."""
        return self.xp.zeros((self.n,), dtype=self.dtype)

    def node_batch(self, rows_per_rank: int) -> Any:
        """Node-shared buffers for a batch the node's ranks compute together
        (engine.shared_batch.NodeBatch), where this reducer sums that way; None otherwise."""
        return None

    def layer_done(self, l: int) -> None:
        """Layer l's gradient is final in grad (called from the top layer down)."""

    def finish(self) -> None:
        """Return when the extras are global and every span of shares() sums to the global gradient."""
        raise NotImplementedError

    def shares(self) -> list[tuple[slice, list[Any]]]:
        """The parameter spans this rank updates, each with the buffers whose sum is its global gradient."""
        return self._shares

    def spans(self) -> list[slice]:
        """The parameter spans this rank updates (those of shares(), known without a step)."""
        return [span for span, _ in self._shares]

    def updated(self) -> None:
        """This rank applied its shares; on return every rank may read the new parameters."""

    def slice_sum(self) -> Optional[Callable[[np.ndarray], None]]:
        """Where shares() are slices of parameters that other ranks update the rest of (shm,
        shared_batch): a function that sums a small float64 array over those ranks in place (an
        optimizer's per-layer norms); None where this rank's shares are the whole parameters."""
        return None

    def use_compression(self, kind: str, feedback: bool) -> None:
        """parallel.compression: send the gradients as 16-bit floats (compression.py); a
        reducer that can overrides this (blocking, overlap, shm)."""
        from pbp_hpc.errors import ConfigError

        raise ConfigError(f"parallel.compression={kind} is not supported by reducer {self.name}: "
                          "choose parallel.compression=none, or reducer blocking, overlap or shm")

    def fuse(self, fusion_bytes: int) -> None:
        """parallel.fusion_bytes: combine small messages up to this size; a reducer that sends
        one message per step (blocking, shm) has nothing to combine."""

    def wire_bytes(self) -> int:
        """Bytes this rank sends per step at best (the algorithm's count, not a measurement)."""
        from pbp_hpc.parallel.reducers.compression import allreduce_bytes

        return allreduce_bytes(self.comm.size, self.grad.shape[0], np.dtype(self.dtype).itemsize)

    def describe(self) -> dict[str, Any]:
        """What the run's record says about the reducer."""
        return {"reducer": self.name, **self.choice}

    def close(self) -> None:
        """Free what the reducer holds outside Python's reach (windows, communicators); idempotent."""
        self.watch.close()

    def __enter__(self) -> "Reducer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _watched(self, call: Callable[[], None]) -> None:
        """A blocking MPI call under the stall check."""
        with self.watch:
            call()

    def _start_extras(self) -> Any:
        """The extras' own nonblocking Allreduce, in full precision, beside a compressed sum."""
        return self.comm.Iallreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)

    def _timed_allreduce(self, buf: Any) -> None:
        if self.comm.size == 1:
            return
        t = perf_counter()
        with self.watch:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.seconds += perf_counter() - t
