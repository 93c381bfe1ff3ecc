"""The optimizer interface: how a reduced gradient becomes an update of the flat parameters.

Each step, the allreduce strategy calls apply_all(shares, lr, batch) with the spans of the
parameters this rank updates (the reducer's shares: everything, or slices of node-shared
parameters under shm and shared_batch), which by default calls apply(span, parts, lr, batch)
for each; the strategies that update from one rank's own gradient call apply() on the whole
buffer. sum(parts) is the global gradient *sum* over the span of a minibatch of `batch`
examples and lr the learning rate of this step (the schedule's). Every rank
applies the same update to the same values, so parameters stay identical without a broadcast.

State (momentum, say) lives in buffers shaped like the parameters, which the reducer allocates
(node-shared under shm, so each rank updates its slice of it as of the parameters), and is
returned by state() for the checkpoint, under names of its own.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional


class Optimizer:
    name: ClassVar[str] = ""
    # the state buffers it asks state_buffer for, in order (a strategy that packs the parameters
    # and the state into one buffer, as local_sgd does, sizes it from this before building it)
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, theta: Any, state_buffer: Callable[[], Any], xp: Any):
        self.cfg, self.theta, self.xp = cfg, theta, xp
        self.weight_decay = cfg.optimizer.weight_decay
        # True where the update is theta -= lr / B * g with no state: one rank may then apply it
        # inside the gradient GEMMs (engine.step's fused path), with no gradient buffer or pass
        self.fusable = False
        self._views: dict[tuple[int, int, int], Any] = {}
        # set by the strategy where this rank's spans are slices of the node's one copy of the
        # parameters (shm, shared_batch): sums a small float64 array over the node's ranks, for
        # an optimizer whose update needs norms over whole layers (layerwise.py)
        self.node_sum: Optional[Callable[[Any], None]] = None

    def view(self, buf: Any, span: slice) -> Any:
        """buf[span], made once per (buffer, span): the spans are fixed for a run, so the step makes no view."""
        key = (id(buf), span.start, span.stop)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = buf[span]
        return v

    def apply(self, span: slice, parts: list[Any], lr: float, batch: int) -> None:
        raise NotImplementedError

    def apply_all(self, shares: list[tuple[slice, list[Any]]], lr: float, batch: int) -> None:
        """One step over every span this rank updates (the reducer's shares()); an optimizer
        that needs the whole step at once (layer norms) overrides it."""
        for span, parts in shares:
            self.apply(span, parts, lr, batch)

    def state(self) -> dict[str, Any]:
        """Buffers to checkpoint (name -> parameter-shaped array); restored in place by the caller."""
        return {}
