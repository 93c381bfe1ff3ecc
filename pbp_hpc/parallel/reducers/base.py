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

EXTRAS = 2  # slots after the gradients
LOSS_SLOT = 0  # offsets within the extras
STOP_SLOT = 1

Fill = Callable[[Optional[np.ndarray]], np.ndarray]  # fill(out) -> the initial parameters (into out if given)


def buffer_size(layout: Layout) -> int:
    return layout.n_params + EXTRAS


class Reducer:
    """Base class: a gradient buffer of its own, parameters of the caller's namespace, no update of its own."""

    name: ClassVar[str] = ""
    # True where the summation happens in the update (shm): its time counts as communication
    sums_in_update: ClassVar[bool] = False

    def __init__(self, comm: MPI.Comm, layout: Layout, dtype: Any, xp: Any):
        self.comm, self.layout, self.xp, self.dtype = comm, layout, xp, dtype
        self.n = layout.n_params
        self.seconds = 0.0  # time in communication calls, accumulated over the run
        self.choice: dict[str, Any] = {}  # how the factory chose this reducer (device runs), for the record
        self.grad = self.allocate(buffer_size(layout))
        self.extras = self.grad[self.n :]
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

    def layer_done(self, l: int) -> None:
        """Layer l's gradient is final in grad (called from the top layer down)."""

    def finish(self) -> None:
        """Return when the extras are global and every span of shares() sums to the global gradient."""
        raise NotImplementedError

    def shares(self) -> list[tuple[slice, list[Any]]]:
        """The parameter spans this rank updates, each with the buffers whose sum is its global gradient."""
        return self._shares

    def updated(self) -> None:
        """This rank applied its shares; on return every rank may read the new parameters."""

    def describe(self) -> dict[str, Any]:
        """What the run's record says about the reducer."""
        return {"reducer": self.name, **self.choice}

    def close(self) -> None:
        """Free what the reducer holds outside Python's reach (windows, communicators); idempotent."""

    def __enter__(self) -> "Reducer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _timed_allreduce(self, buf: Any) -> None:
        if self.comm.size == 1:
            return
        t = perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.seconds += perf_counter() - t
