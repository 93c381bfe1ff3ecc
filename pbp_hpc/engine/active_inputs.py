"""Skipping the input features that are zero in every example of a minibatch.

Such a feature adds nothing to the first layer's product (0 * w) and its row of the first
layer's weight gradient is exactly zero (a sum of 0 * delta), so both of the first layer's
GEMMs can run on the batch's k active columns and the k matching rows of W_1 alone. The
update is the same up to the order of floating-point sums. MNIST is 81% zero pixels; in a
batch of 1024 images about 22% of the 784 pixels are zero in every image (the border, mostly;
30% at 128 images), which takes about a fifth off Net-1h's GEMM work. The cost per step:
gathering the k rows of W_1 before the forward pass and writing them (or their gradient)
back after the backward pass, about 0.5 ms at k = 610 against 9 ms saved.

Used on the CPU, for data held as uint8 (datasets.ArraySource): what makes finding the active
columns nearly free is OR-ing the batch's bytes. Dense data (synthetic) keeps the plain path,
as does any batch whose active fraction is above MAX_ACTIVE, where the saving would not pay
for the gathering.

One visible difference from the dense product: a non-finite weight in an inactive row no
longer turns the batch's output into NaN (it is never multiplied). Such a run has diverged
anyway and its loss says so.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

MAX_ACTIVE = 0.9  # compact only when at least 10% of the columns drop out


class ActiveInputs:
    """One rank's choice of active columns, and the gathers and scatters around it."""

    def __init__(self, n_in: int, n_out: int):
        self.n_in, self.n_out = n_in, n_out
        self.mask = np.zeros(n_in, dtype=np.uint8)  # OR of the batch's bytes: nonzero where active
        self.active = np.zeros(n_in, dtype=bool)
        self.cols: Optional[np.ndarray] = None  # this step's active columns, or None: a plain step
        self._runs: Optional[list[tuple[int, int, int]]] = None  # of cols, made on first use per batch
        self.steps = 0  # steps run compacted, and the columns they kept, for the result
        self.kept = 0

    def choose(self, u8: np.ndarray) -> Optional[np.ndarray]:
        """The active columns of a uint8 batch, or None where too many are active to pay."""
        np.bitwise_or.reduce(u8, axis=0, out=self.mask)
        np.not_equal(self.mask, 0, out=self.active)
        cols = np.flatnonzero(self.active)
        if cols.shape[0] > MAX_ACTIVE * self.n_in or cols.shape[0] == 0:  # (all zeros: BLAS refuses K = 0)
            self.cols = None
            return None
        self.cols, self._runs = cols, None
        self.steps += 1
        self.kept += cols.shape[0]
        return cols

    def runs(self) -> list[tuple[int, int, int]]:
        """The active columns as runs of consecutive ones: (first column, its position in the
        compacted batch, length)."""
        cols = self.cols
        assert cols is not None
        if self._runs is None:  # the batch is gathered by them, and several ranks' gradient spread
            starts = np.flatnonzero(np.diff(cols) != 1) + 1
            bounds = [0, *starts.tolist(), cols.shape[0]]
            self._runs = [(int(cols[a]), a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        return self._runs

    def rows(self, flat: np.ndarray) -> np.ndarray:
        """A (k + 1) x n_out matrix at the start of flat, which has room for (n_in + 1) x n_out
        (the step's gathered-weights buffer, or the first layer's part of the gradient buffer)."""
        assert self.cols is not None
        return flat[: (self.cols.shape[0] + 1) * self.n_out].reshape(-1, self.n_out)

    def weights(self, w1: np.ndarray, b1: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """W_1's rows for this step's active columns, then b_1, gathered into rows(flat).

        With the batch's column of ones (the compacted batch ends with one), the bias is
        inside the GEMMs: no pass to broadcast it before the forward product, and its
        gradient is the last row of the weight-gradient product.
        """
        out = self.rows(flat)
        np.take(w1, self.cols, axis=0, out=out[:-1], mode="clip")  # "raise" would buffer the copy
        out[-1] = b1
        return out

    def put_weights(self, w1: np.ndarray, b1: np.ndarray, wc: np.ndarray) -> None:
        """Write the (updated) active rows and bias back into W_1 and b_1."""
        w1[self.cols] = wc[:-1]
        b1[...] = wc[-1]

    def expand_gradient(self, flat: np.ndarray) -> None:
        """In place: the compact gradient rows(flat) (k active rows, then the bias's) become the
        first layer's full gradient, flat viewed as (n_in + 1) x n_out: W_1's rows, then b_1.

        Row i moves to row cols[i] >= i, so moving the last rows first never overwrites a row
        still to move; rows of inactive columns get zeros.
        """
        assert self.cols is not None
        g = flat[: (self.n_in + 1) * self.n_out].reshape(self.n_in + 1, self.n_out)
        k = self.cols.shape[0]
        g[self.n_in] = g[k]  # the bias's row: k < n_in, and no active row lies above k
        end = self.n_in
        for src, dst, width in reversed(self.runs()):
            g[src : src + width] = g[dst : dst + width]  # numpy copies overlapping slices correctly
            g[src + width : end] = 0
            end = src
        g[:end] = 0

    def summary(self) -> dict[str, Any]:
        """For the run's result: how often the first layer ran compacted, and how compact."""
        return {"compacted_steps": self.steps,
                "mean_active_fraction": round(self.kept / (self.steps * self.n_in), 4) if self.steps else None}
