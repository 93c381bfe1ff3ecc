"""Which part of each layer a rank of a tensor group owns, and its flat buffer of it.

Layers are taken in pairs (Megatron-LM's layout for an MLP): the first of a pair is split by
*columns* (rank t owns a block of its output units: W[:, cols_t], b[cols_t]), the second by
*rows* (rank t owns the matching block of its input rows, W[rows_t, :], and a copy of the
whole bias). A column-split layer needs no communication in its forward pass (its input is
whole on every rank); the row-split layer's products are partial sums that one Allreduce of
B x n_out over the tensor group completes, the bias added once, so the pair's output is whole
(and bit-identical) on every rank again. Backward, the row-split layer's input gradient is
local, and the column-split layer's is a partial sum (one Allreduce of B x n_in), needed only
where a layer lies below it: Net-1h (784-1024-10) is one pair and sends B x 10 values a step.

With an odd number of layers the last one is either **replicated** (FULL: every rank holds
and computes it whole; its input is the previous pair's whole output, so no message either way)
or **split** by columns (OUT: rank t computes its block of the outputs, one Allgather of
B x n_out makes the output row whole on every rank for the loss, and its input gradient is a
partial sum completed by an Allreduce of B x n_in). Replicating costs (T-1)/T x 6 B n_in n_out
redundant flops a step, splitting costs the two messages: parallel/tensor_output.py chooses by
that estimate (Net-1h's 1024 x 10: 60 kflop per example against two messages, replicated; a
wide output such as 512 x 784: split), or as `parallel.tensor_output` says. The header says so.

Unit counts need not divide by T: block t of n units is my_share(n, T, t) (sizes differ by at
most one). A rank's flat buffer holds, layer by layer, its weight block (row-major) then its
bias block, so an optimizer updates it as it would the whole model; `extract` and `assemble`
convert between it and the whole model's flat layout, through engine.layout's Layout of the
same part (`ShardLayout.layout`, which parallel.shards gathers and scatters by).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbp_hpc.engine import layout

COL, ROW, FULL, OUT = "col", "row", "full", "out"  # OUT: the output layer split by columns, gathered


def plan(n_layers: int, split_output: bool = False) -> list[str]:
    """How each layer is held: (col, row) pairs from the input up, the odd last layer full (or,
    with split_output, split by columns with its outputs gathered)."""
    kinds = [COL if l % 2 == 0 else ROW for l in range(n_layers)]
    if n_layers % 2 == 1:
        kinds[-1] = OUT if split_output else FULL
    return kinds


@dataclass
class ShardLayout:
    """Rank t's (of T) part of every layer of the whole model `sizes`, in one flat buffer.

    Quacks like engine.model.Layout where a reducer or optimizer needs it (n_params, n_layers,
    layer_slice, w_slices, b_slices); shapes[l] is the shape of its weight block."""

    sizes: list[int]
    T: int
    t: int
    kinds: list[str] = field(default_factory=list)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # the split dimension's (lo, hi), or (0, n)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    w_slices: list[slice] = field(default_factory=list)
    b_slices: list[slice] = field(default_factory=list)
    n_params: int = 0
    held: Any = None  # engine.layout.Layout of this part (made in __post_init__)
    split_output: bool = False  # an odd last layer split by columns (OUT) rather than replicated

    def __post_init__(self) -> None:
        self.kinds = plan(len(self.sizes) - 1, self.split_output)
        # engine.layout's Layout of this part (rows-split biases on every rank) places the buffer
        splits = [{COL: "cols", OUT: "cols", ROW: "rows", FULL: "whole"}[k] for k in self.kinds]
        self.held = layout.Layout(list(self.sizes), layout.tensor_parts(self.sizes, splits, self.T, self.t,
                                                                        replicate_bias=True))
        self.blocks = [(p.lo, p.hi) if p.kind != "whole" else (0, n_out)
                       for p, n_out in zip(self.held.parts, self.sizes[1:])]
        self.shapes = [tuple(shape) for shape in self.held.w_shapes]
        self.w_slices, self.b_slices = list(self.held.w_slices), list(self.held.b_slices)
        self.n_params = self.held.n_params

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def layer_slice(self, l: int) -> slice:
        return slice(self.w_slices[l].start, self.b_slices[l].stop)

    def widths(self) -> list[int]:
        """Each layer's output width on this rank: its block for a column-split layer (COL, OUT), else whole."""
        return [s[1] for s in self.shapes]

    @property
    def layout(self) -> layout.Layout:
        """The same part as engine.layout's Layout (what parallel.shards gathers and scatters by)."""
        return self.held

    def views(self, flat: Any, xp: Any) -> tuple[list[Any], list[Any]]:
        """Per-layer (W block, b block) views into a flat shard buffer."""
        ws = [xp.reshape(flat[s], shape) for s, shape in zip(self.w_slices, self.shapes)]
        return ws, [flat[s] for s in self.b_slices]


def extract(whole: np.ndarray, shard: ShardLayout, out: np.ndarray) -> np.ndarray:
    """out <- shard's part of a whole flat model (host arrays)."""
    layout.take(shard.layout, np.asarray(whole), out)
    return out


def assemble(shards: list[np.ndarray], sizes: list[int], out: np.ndarray, split_output: bool = False) -> np.ndarray:
    """out <- the whole flat model from every rank's shard (shards[t] from rank t of T).

    Parts held by several ranks (the row-split layers' biases, a replicated last layer) are
    identical on all of them; rank 0's copy is taken."""
    T = len(shards)
    for t in reversed(range(T)):  # rank 0 last: its copy of the shared parts is what stays
        layout.put(ShardLayout(sizes, T, t, split_output=split_output).layout, shards[t], out)
    return out
