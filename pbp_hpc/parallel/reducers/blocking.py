"""One in-place Allreduce of the whole buffer after the backward pass.

The fewest messages, so the least latency: the right choice when the buffer is small or the
network is fast relative to compute.
"""

from __future__ import annotations

from pbp_hpc.parallel.reducers.base import Reducer


class BlockingReducer(Reducer):
    name = "blocking"

    def finish(self) -> None:
        self._timed_allreduce(self.grad)
