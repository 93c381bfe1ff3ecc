"""The seams of a training step, as Protocols: what the strategy, the reducer and the local step
promise each other (and the optimizer, whose one implementation is engine.optimizers.base).

    LocalStep   this rank's part of a step: engine.step's variants, engine.shared_batch.SharedBatchStep
    Reducer     a sum over the data group's ranks: parallel.reducers (base.Reducer)
    Strategy    how ranks combine their work: parallel.strategies (base.Strategy)

Nothing here runs: these are for type checkers and readers. Imports nothing heavy.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol


class LocalStep(Protocol):
    applies_update: bool  # the update happens inside its GEMMs (the caller skips the optimizer)
    work: Any  # its activations' buffers (evaluation reads predictions through them)

    def __call__(self, idx: Any, scale: float = 0.0) -> None:
        """The gradient sum and loss of examples idx into the reducer's buffer (scale: -lr / B where fused)."""

    def complete(self, reducer: "Reducer") -> bool:
        """After the ranks met: what is left of the gradient (shared_batch's phase 2); True where the update is applied."""

    def count_correct(self, source: Any, idx: Any) -> Any:
        """How many of examples idx the current parameters classify correctly."""


class Optimizer(Protocol):
    theta: Any
    weight_decay: float
    fusable: bool  # a plain SGD step: may be applied inside the gradient GEMMs

    def apply(self, span: slice, parts: list[Any], lr: float, batch: int) -> None:
        """theta[span] updated from the gradient sum(parts), lr / batch times it."""

    def state(self) -> dict[str, Any]:
        """Its buffers, by name (checkpointed beside the parameters)."""


class Reducer(Protocol):
    name: str
    comm: Any  # the grid's data group
    n: int  # parameters this rank holds
    grad: Any  # [gradients | extras]
    extras: Any
    loss_out: Any  # where the local step writes its loss sum
    seconds: float  # time in communication calls
    sums_in_update: bool
    watch: Any  # the run's stall check (parallel.stall.StallWatch)
    choice: dict[str, Any]

    def parameters(self, fill: Callable[[Optional[Any]], Any]) -> Any: ...
    def state_buffer(self) -> Any: ...
    def node_batch(self, rows_per_rank: int) -> Any: ...
    def layer_done(self, l: int) -> None: ...
    def finish(self) -> None: ...
    def shares(self) -> list[tuple[slice, list[Any]]]: ...
    def updated(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class Strategy(Protocol):
    name: str
    sums_gradients: bool
    fusable: bool
    keys: tuple[str, ...]
    compute_s: float
    after_local: Optional[Callable[[int], None]]

    @property
    def comm_s(self) -> float: ...

    def parameters(self, reducer: Reducer, fill: Callable[[Any], Any]) -> Any: ...
    def state_buffer(self, reducer: Reducer) -> Callable[[], Any]: ...
    def attach(self, local: LocalStep, reducer: Reducer, optimizer: Optimizer) -> None: ...
    def block_end(self, first: int, limit: int, steps: int, epoch: int) -> int: ...
    def run_block(self, order: Any, epoch: int, first: int, end: int, steps: int, lr_of: Callable[[int], float],
                  stop_of: Callable[[int], bool]) -> tuple[float, int, int, int]: ...
    def state(self) -> dict[str, Any]: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
