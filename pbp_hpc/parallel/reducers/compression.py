"""Gradients sent as 16-bit floats (parallel.compression: fp16 | bf16), summed in float32.

MPI has no 16-bit float type to reduce, and a reduction operator written in Python
(MPI.Op.Create) runs numpy on every pair of buffers: measured on 2 emulated nodes, Net-1h's
795,010 values, a bf16 Allreduce with such an op took 33 ms, longer than float64's Allreduce
(30) and 1.7x the sum below (20; benchmarks/compression.py). So the sum is a reduce-scatter and
an allgather written out (Rabenseifner's two halves), both moving 16-bit words:

    alltoall     rank r receives every rank's chunk r          (P-1)/P n 2 bytes per rank
    each rank adds its chunk's P parts in float32, in rank order
    allgather    every rank receives every chunk's sum, rounded to 16 bits again

That is 4 (P-1)/P n bytes per rank, against MPI_Allreduce's 2 (P-1)/P n itemsize at best:
half of float32's, a quarter of float64's. Every rank ends with the same bits (each chunk's
sum is rounded once, by its owner), so the ranks' parameters stay identical.

Two roundings per step: each rank's gradient to 16 bits, and each chunk's sum. With
parallel.error_feedback, both are carried into the next step (error feedback, Seide et al.
2014; Karimireddy et al. 2019): a rank adds to its next gradient what its own rounding lost,
and a chunk's owner also what the rounding of the chunk's sum lost (a sum is linear: the
correction counts wherever it is added). Without it the losses are dropped, as Horovod's
fp16 compression drops them. fp16 keeps 11 bits of precision but overflows past 65504 (a
gradient sum that large becomes inf and the run stops as diverged); bf16 keeps float32's
range with 8 bits of precision.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.parallel.volumes import allreduce_bytes  # noqa: F401  (the formula: one place, shared with the models)

KINDS = ("none", "fp16", "bf16")
WORD = 2  # bytes per value on the wire

Encode = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (float32 values, uint16 out, uint32 scratch)
Decode = Callable[[np.ndarray, np.ndarray], None]  # (uint16 words, float32 out)


def _fp16_encode(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # past 65504: inf, which the divergence check then reports
        np.copyto(out.view(np.float16), x, casting="unsafe")


def _fp16_decode(words: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, words.view(np.float16), casting="unsafe")


def _bf16_encode(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """float32 -> bfloat16 (its upper 16 bits), rounded to nearest even; NaN stays NaN.

    In place in scratch (a temporary of the buffer's size costs page faults each step)."""
    bits = x.view(np.uint32)
    np.right_shift(bits, np.uint32(16), out=scratch)
    scratch &= np.uint32(1)
    scratch += np.uint32(0x7FFF)
    scratch += bits  # NaN's mantissa could carry into the sign: fixed below
    scratch >>= np.uint32(16)
    np.copyto(out, scratch, casting="unsafe")
    if np.isnan(np.max(x, initial=-np.inf)):  # max is NaN where any value is: one cheap pass
        out[np.isnan(x)] = 0x7FC0


def _bf16_decode(words: np.ndarray, out: np.ndarray) -> None:
    bits = out.view(np.uint32)
    np.copyto(bits, words, casting="unsafe")
    bits <<= np.uint32(16)


CODECS: dict[str, tuple[Encode, Decode]] = {"fp16": (_fp16_encode, _fp16_decode), "bf16": (_bf16_encode, _bf16_decode)}


def round_trip(kind: str, x: np.ndarray) -> np.ndarray:
    """x as it arrives after compression (float32): what a rank's rounding keeps."""
    encode, decode = CODECS[kind]
    words = np.empty(x.shape, dtype=np.uint16)
    out = np.empty(x.shape, dtype=np.float32)
    encode(np.ascontiguousarray(x, dtype=np.float32), words, np.empty(x.shape, dtype=np.uint32))
    decode(words, out)
    return out


class CompressedSum:
    """The sum over comm's ranks of one buffer of n values, sent as 16-bit words.

    start(x) begins it (the first message is on its way on return), finish(x) writes the
    global sum into x; between them the caller may compute. Scratch buffers are allocated once.
    """

    def __init__(self, comm: MPI.Comm, n: int, kind: str, feedback: bool):
        if kind not in CODECS:
            raise ValueError(f"unknown compression {kind!r}; choose one of {', '.join(KINDS)}")
        self.comm, self.n, self.kind = comm, n, kind
        self.encode, self.decode = CODECS[kind]
        P = comm.size
        self.chunk = c = -(-n // P) if n else 0
        self.values = np.zeros(P * c, dtype=np.float32)  # this rank's values, padded to P chunks
        self.sent = np.empty(P * c, dtype=np.uint16)
        self.got = np.empty(P * c, dtype=np.uint16)  # every rank's part of this rank's chunk
        self.sum = np.empty(c, dtype=np.float32)
        self.part = np.empty(c, dtype=np.float32)
        self.mine = np.empty(c, dtype=np.uint16)  # this rank's chunk's sum, rounded
        self.all = np.empty(P * c, dtype=np.uint16)
        self.scratch = np.empty(P * c, dtype=np.uint32)
        self.residual: Optional[np.ndarray] = np.zeros(P * c, dtype=np.float32) if feedback else None
        self.request: Optional[MPI.Request] = None

    def wire_bytes(self) -> int:
        """Bytes this rank sends per sum (each phase sends P-1 chunks of 16-bit words)."""
        return 2 * (self.comm.size - 1) * self.chunk * WORD

    def blocking(self, x: Any, wait: Callable[[Callable[[], None]], None]) -> None:
        """The whole sum into x, with blocking collectives (MPICH's nonblocking ones, waited for
        at once, took 2.8x as long here: 3.8 ms against 1.4 for this alltoall of 1.6 MB).
        wait(call) runs a blocking MPI call under the stall check."""
        self._encode(x)
        wait(lambda: self.comm.Alltoall(self.sent, self.got))
        self._add_up()
        wait(lambda: self.comm.Allgather(self.mine, self.all))
        self.finish(x)

    def start(self, x: Any) -> None:
        self._encode(x)
        self.request = self.comm.Ialltoall(self.sent, self.got)

    def _encode(self, x: Any) -> None:
        # past fp16's range the values become inf, and inf - inf NaN: the divergence check reports
        # that (exit 3), so numpy's warnings on the way are noise
        with np.errstate(over="ignore", invalid="ignore"):
            self._encode_values(x)

    def _encode_values(self, x: Any) -> None:
        np.copyto(self.values[: self.n], x, casting="same_kind")
        if self.residual is not None:
            self.values += self.residual
        self.encode(self.values, self.sent, self.scratch)
        if self.residual is not None:  # what this rank's rounding lost, for the next step
            self.decode(self.sent, self.residual)
            np.subtract(self.values, self.residual, out=self.residual)

    def reduce(self) -> None:
        """After start()'s message has come: add this rank's chunk up and send its sum."""
        self._add_up()
        self.request = self.comm.Iallgather(self.mine, self.all)

    def _add_up(self) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # as in _encode: overflow is reported as divergence
            self._add_up_values()

    def _add_up_values(self) -> None:
        c, r = self.chunk, self.comm.rank
        self.decode(self.got[:c], self.sum)
        for k in range(1, self.comm.size):  # in rank order: every owner adds alike
            self.decode(self.got[k * c : (k + 1) * c], self.part)
            self.sum += self.part
        self.encode(self.sum, self.mine, self.scratch[:c])
        if self.residual is not None:  # the owner carries the rounding of its chunk's sum
            self.decode(self.mine, self.part)
            self.sum -= self.part
            self.residual[r * c : (r + 1) * c] += self.sum

    def finish(self, x: Any) -> None:
        """After the allgather: the global sum into x."""
        self.decode(self.all, self.values)
        np.copyto(x, self.values[: self.n], casting="same_kind")
        self.request = None


def run(sums: list[CompressedSum], buffers: list[Any], wait: Callable[[Any], None]) -> None:
    """Complete started sums: wait(requests) stands for MPI_Waitall (the stall check's)."""
    wait([s.request for s in sums])
    for s in sums:
        s.reduce()
    wait([s.request for s in sums])
    for s, x in zip(sums, buffers):
        s.finish(x)
