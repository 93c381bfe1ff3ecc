"""One in-place Allreduce of the whole buffer after the backward pass.

The fewest messages, so the least latency: the right choice when the buffer is small or the
network is fast relative to compute. With parallel.compression the gradients travel as 16-bit
words (compression.py) and the extras beside them, in full precision.
"""

from __future__ import annotations

import time
from typing import Optional

from pbp_hpc.parallel.reducers import compression
from pbp_hpc.parallel.reducers.base import EXTRAS, Reducer


class BlockingReducer(Reducer):
    name = "blocking"
    compressed: Optional[compression.CompressedSum] = None

    def use_compression(self, kind: str, feedback: bool) -> None:
        if self.comm.size > 1:
            self.compressed = compression.CompressedSum(self.comm, self.n, kind, feedback)

    def wire_bytes(self) -> int:
        if self.compressed is None:
            return super().wire_bytes()
        return self.compressed.wire_bytes() + compression.allreduce_bytes(self.comm.size, EXTRAS, self.extras.itemsize)

    def finish(self) -> None:
        if self.compressed is None:
            self._timed_allreduce(self.grad)
            return
        t = time.perf_counter()
        extras = self._start_extras()
        self.compressed.blocking(self.grad[: self.n], self._watched)
        self.watch.wait(extras)
        self.seconds += time.perf_counter() - t
