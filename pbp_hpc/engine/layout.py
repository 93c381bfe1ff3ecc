"""Where each layer's parameters live in a flat buffer, and which part of each layer a rank holds.

One contiguous buffer holds, layer after layer, the weights W_l (n_in x n_out, row-major, so a
batch times W_l is a plain GEMM) and then the bias b_l. A rank may hold only part of a layer
(tensor parallelism: its units split across ranks; pipeline parallelism: whole layers on other
ranks), so each layer has a Part:

    whole   W (n_in x n_out) and b (n_out): today's replicated layout, every rank owns everything
    cols    output units lo..hi: the columns W[:, lo:hi] (n_in x k, row-major) and b[lo:hi]
    rows    input units lo..hi: the rows W[lo:hi, :] (k x n_out), and b only where `bias`
            (one rank of the group owns it, or every rank holds a replica)
    none    nothing of this layer (a pipeline stage that does not compute it)

The rank's flat buffer is what it holds, layer after layer, weights then bias: contiguous, so
a reducer sums it and an optimizer updates it exactly as it does a whole model's. `put` and
`take` copy a rank's buffer into / out of the whole model's flat vector (the layout of
Layout(sizes)); parallel/shards.py gathers and scatters whole models over a communicator with
them. A Layout made from sizes alone is the whole model, and behaves as it always has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Optional, Sequence

import numpy as np

Array = Any
KINDS = ("whole", "cols", "rows", "none")


@dataclass(frozen=True)
class Part:
    """What a rank holds of one layer: kind (KINDS), the unit range lo..hi it splits, its bias."""

    kind: str = "whole"
    lo: int = 0
    hi: int = 0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer part {self.kind!r}; choose one of {', '.join(KINDS)}")


WHOLE = Part()


def split_units(n: int, parts: int, part: int) -> tuple[int, int]:
    """Units lo..hi of part `part` of `parts`: contiguous, sizes differ by at most one."""
    return n * part // parts, n * (part + 1) // parts


def tensor_parts(sizes: Sequence[int], splits: Sequence[str], T: int, t: int, replicate_bias: bool = False) -> list[Part]:
    """Rank t's parts of a tensor group of T: splits[l] is "whole", "cols" or "rows" for layer l.
    A rows-split layer's bias is rank 0's (or every rank's with replicate_bias)."""
    if len(splits) != len(sizes) - 1:
        raise ValueError(f"{len(splits)} layer splits for {len(sizes) - 1} layers")
    parts = []
    for l, kind in enumerate(splits):
        if kind == "whole":
            parts.append(WHOLE)
        elif kind in ("cols", "rows"):
            lo, hi = split_units(sizes[l + 1] if kind == "cols" else sizes[l], T, t)
            parts.append(Part(kind, lo, hi, kind == "cols" or replicate_bias or t == 0))
        else:
            raise ValueError(f"layer {l}: unknown split {kind!r}; choose whole, cols or rows")
    return parts


@dataclass
class Layout:
    """Where each layer's weights and biases live in the flat buffer of what this rank holds.

    sizes: the whole model's units per layer. parts: what this rank holds of each layer (None:
    every layer whole). w_shapes[l]: the shape of its block of W_l; b_slices[l] is empty where
    it holds no bias."""

    sizes: list[int]
    parts: Optional[list[Part]] = None
    w_slices: list[slice] = field(default_factory=list)
    b_slices: list[slice] = field(default_factory=list)
    w_shapes: list[tuple[int, int]] = field(default_factory=list)
    n_params: int = 0

    def __post_init__(self) -> None:
        if self.parts is None:
            self.parts = [WHOLE] * (len(self.sizes) - 1)
        if len(self.parts) != len(self.sizes) - 1:
            raise ValueError(f"{len(self.parts)} layer parts for {len(self.sizes) - 1} layers")
        off = 0
        for (n_in, n_out), p in zip(zip(self.sizes[:-1], self.sizes[1:]), self.parts):
            shape, nb = {"whole": ((n_in, n_out), n_out), "cols": ((n_in, p.hi - p.lo), p.hi - p.lo),
                         "rows": ((p.hi - p.lo, n_out), n_out), "none": ((0, 0), 0)}[p.kind]
            nb = nb if p.bias else 0
            self.w_shapes.append(shape)
            self.w_slices.append(slice(off, off + shape[0] * shape[1]))
            off += shape[0] * shape[1]
            self.b_slices.append(slice(off, off + nb))
            off += nb
        self.n_params = off

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def is_whole(self) -> bool:
        """Whether this rank holds every parameter (the replicated layout)."""
        return all(p == WHOLE for p in self.parts)

    def layer_slice(self, l: int) -> slice:
        """The contiguous span of layer l (weights then bias)."""
        return slice(self.w_slices[l].start, self.b_slices[l].stop)


def views(flat: Array, layout: Layout, xp: ModuleType) -> tuple[list[Array], list[Optional[Array]]]:
    """Per-layer (W, b) views into a flat buffer; writing to a view writes the buffer. A bias the
    rank does not hold is None."""
    ws = [xp.reshape(flat[s], shape) for s, shape in zip(layout.w_slices, layout.w_shapes)]
    bs = [flat[s] if (p.bias and p.kind != "none") else None for s, p in zip(layout.b_slices, layout.parts)]
    return ws, bs


def _pairs(layout: Layout, local: np.ndarray, whole: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(view into the whole model, view into the rank's buffer) for every block the rank holds."""
    full = Layout(layout.sizes)
    ws, bs = views(whole, full, np)
    mine_w, mine_b = views(local, layout, np)
    out = []
    for l, p in enumerate(layout.parts):
        if p.kind == "none":
            continue
        w_whole = {"whole": ws[l], "cols": ws[l][:, p.lo : p.hi], "rows": ws[l][p.lo : p.hi, :]}[p.kind]
        out.append((w_whole, mine_w[l]))
        if mine_b[l] is not None:
            out.append((bs[l] if p.kind != "cols" else bs[l][p.lo : p.hi], mine_b[l]))
    return out


def put(layout: Layout, local: np.ndarray, whole: np.ndarray) -> None:
    """Write the rank's buffer (laid out as `layout`) into its place in the whole model's vector."""
    for w, mine in _pairs(layout, local, whole):
        w[...] = mine


def take(layout: Layout, whole: np.ndarray, local: np.ndarray) -> None:
    """Fill the rank's buffer from the whole model's vector (its part of every layer)."""
    for w, mine in _pairs(layout, local, whole):
        mine[...] = w
