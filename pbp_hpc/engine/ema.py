"""An exponential moving average of the weights (`train.ema_decay`), evaluated in their place.

After every step, over the spans this rank updates (the reducer's: all of theta, or this rank's
slices of the node's one copy under shm/shared_batch):

    d_t = min(decay, (1 + t) / (10 + t))        (t: steps averaged so far; TensorFlow's
    ema <- d_t ema + (1 - d_t) theta             ExponentialMovingAverage with num_updates)

The ramp keeps a short run's average from remembering the initial weights. For a validation
or test pass, or the saved model, swapped() exchanges theta and the average in place (span by
span through one scratch buffer, then the reducer's barrier), so the passes read the average
through the same buffers as ever; training resumes on the raw weights. The average and its
step count are checkpointed ("ema", "ema_steps").
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from pbp_hpc.engine import ops


class WeightAverage:
    def __init__(self, decay: float, theta: Any, buffer: Any, spans: list[slice], xp: Any,
                 barrier: Callable[[], None]):
        self.decay, self.theta, self.avg, self.xp, self.barrier = decay, theta, buffer, xp, barrier
        self.pairs = [(theta[s], buffer[s]) for s in spans]
        self.scratch = xp.empty((max((s.stop - s.start for s in spans), default=0),), dtype=theta.dtype)
        self.steps = np.zeros(1, dtype=np.float64)  # an array: the checkpoint restores it in place
        for w, a in self.pairs:
            a[...] = w  # the average starts at the initial weights (a resumed run overwrites it)

    def update(self) -> None:
        t = float(self.steps[0])
        d = min(self.decay, (1.0 + t) / (10.0 + t))
        for w, a in self.pairs:  # a <- d a + (1 - d) w, one pass (BLAS axpby)
            ops.axpby_(self.xp, 1.0 - d, w, d, a)
        self.steps[0] = t + 1.0

    def _swap(self) -> None:
        self.barrier()  # no rank still reads theta (a pass, the copy of the best model) while another swaps
        for w, a in self.pairs:
            tmp = self.scratch[: w.shape[0]]
            tmp[...] = w
            w[...] = a
            a[...] = tmp
        self.barrier()  # every rank's spans are swapped before any rank reads theta

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: theta holds the average (on every rank); after: the raw weights again."""
        self._swap()
        yield  # (after a failure inside, no swap back: the barrier could wait for a rank that is gone)
        self._swap()

    def state(self) -> dict[str, Any]:
        return {"ema": self.avg, "ema_steps": self.steps}
