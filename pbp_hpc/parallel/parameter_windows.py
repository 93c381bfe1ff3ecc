"""Parameters in MPI one-sided windows, striped over the ranks: the store of async_ps and ssp.

Rank r owns stripe r of the flat parameter vector (contiguous, sizes differing by at most one
element), so reads and updates spread over every rank's memory and network link instead of
one server's. A worker reads the whole vector with one Get_accumulate(NO_OP) per stripe and
adds its update with one Accumulate(SUM) per stripe, inside a single passive-target epoch
(Lock_all) that lasts the run. Element-wise, MPI makes accumulates atomic with respect to each
other and to Get_accumulate, so concurrent updates are never lost and a read never sees half
an element; it may see some of another worker's update and not the rest, which is the
staleness asynchronous SGD accepts. Rank 0 also holds a few int64 counters (the updates
applied, the shares claimed, the workers' clocks), changed with Fetch_and_op.

Progress: with the MPICH wheel, a Lock/Accumulate/Unlock of 4 MB on a rank that is computing
(in BLAS, making no MPI call) completes only when that rank next enters MPI: 3.1 s for 3 s of
its compute, 2 ms when it waits in MPI (measured here, one node and two emulated nodes alike).
Of the ways out, measured on 2 cores with the owner running 1500x1500 GEMMs for 3 s:

    nothing                       first accumulate 3100 ms, then 2 ms
    Python progress thread, 1 ms  14 ms, then 2-9 ms; the owner's GEMMs: 24 in 3 s (21 without it)
    MPIR_CVAR_ASYNC_PROGRESS=1    25 ms, then 1-5 ms; the owner's GEMMs: 17 in 3 s (MPICH's thread spins)
    dedicated server ranks        a rank (here: a core) taken from the computation

so each rank runs a progress thread that enters MPI every PROGRESS_S (an Iprobe on a private
communicator, which drives MPICH's progress engine) and sleeps in between: a few ms of latency
and no core lost. It needs MPI_THREAD_MULTIPLE, which mpi4py asks for by default; without it
the store refuses to start rather than hang.
"""

from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from pbp_hpc.parallel.strategies.base import my_share

PROGRESS_S = 0.001  # the progress thread's sleep: ~1 ms latency, <1% of a core (measured above)

# rank 0's counters
UPDATES = 0  # updates applied so far (the version of the parameters)
CLAIMS = 1  # shares of the current block claimed so far (async_ps, ssp)
CLOCKS = 2  # ssp: from here, one slot per worker: the updates it has completed


class ParameterWindows:
    """The striped parameter store, its counters on rank 0 and its progress thread (collective to make)."""

    def __init__(self, comm: MPI.Comm, theta: np.ndarray):
        if comm.size > 1 and MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            raise RuntimeError("the asynchronous strategies need MPI_THREAD_MULTIPLE (a progress thread enters MPI "
                               f"while the main thread computes); this MPI gave thread level {MPI.Query_thread()}")
        self.comm, self.n, self.dtype = comm, theta.shape[0], theta.dtype
        self.mpi_type = MPI._typedict[theta.dtype.char]
        self.stripes = [my_share(self.n, comm.size, r) for r in range(comm.size)]
        lo, hi = self.stripes[comm.rank]
        item = theta.dtype.itemsize
        self.win = MPI.Win.Allocate((hi - lo) * item, item, comm=comm)
        self.own = np.frombuffer(self.win.tomemory(), dtype=theta.dtype, count=hi - lo)
        self.own[...] = theta[lo:hi]  # every rank made the same initial parameters from the seed
        n_counters = CLOCKS + comm.size
        self.counters = MPI.Win.Allocate(n_counters * 8 if comm.rank == 0 else 0, 8, comm=comm)
        if comm.rank == 0:
            np.frombuffer(self.counters.tomemory(), dtype=np.int64, count=n_counters)[...] = 0
        self._one = np.ones(1, dtype=np.int64)
        self._got = np.zeros(1, dtype=np.int64)
        self._clocks = np.zeros(comm.size, dtype=np.int64)
        comm.Barrier()  # every stripe and counter initialised before anyone reads them
        self.win.Lock_all()
        self.counters.Lock_all()
        self.bytes_moved = 0
        self._quit = threading.Event()
        self._progress_comm = comm.Dup()
        self._thread = None
        if comm.size > 1:
            self._thread = threading.Thread(target=self._progress, daemon=True, name="pbp_hpc-rma-progress")
            self._thread.start()

    def _progress(self) -> None:
        comm = self._progress_comm
        while not self._quit.wait(PROGRESS_S):
            comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    # -- the parameters -------------------------------------------------------------------------
    def read(self, out: np.ndarray) -> None:
        """The current parameters into out (atomic per element with respect to updates)."""
        for r, (lo, hi) in enumerate(self.stripes):
            if hi > lo:
                part = out[lo:hi]
                self.win.Get_accumulate([part, self.mpi_type], [part, self.mpi_type], r, op=MPI.NO_OP)
        self.win.Flush_all()
        self.bytes_moved += out.nbytes

    def overwrite(self, theta: np.ndarray) -> None:
        """Collective: the store holds theta (every rank passes the same); no rank reads it
        before every stripe is written (a resume: the checkpoint's parameters)."""
        lo, hi = self.stripes[self.comm.rank]
        self.own[...] = theta[lo:hi]
        self.win.Sync()  # the local stores visible to the window (MPI's unified memory model)
        self.comm.Barrier()
        self.win.Sync()

    def add(self, delta: np.ndarray) -> None:
        """parameters += delta, on every owner; complete (visible to any later read) on return."""
        for r, (lo, hi) in enumerate(self.stripes):
            if hi > lo:
                self.win.Accumulate([delta[lo:hi], self.mpi_type], r, op=MPI.SUM)
        self.win.Flush_all()
        self.bytes_moved += delta.nbytes

    # -- rank 0's counters ----------------------------------------------------------------------
    def fetch_add(self, slot: int, value: int = 1) -> int:
        """The counter's value before adding value (atomic)."""
        self._one[0] = value
        self.counters.Fetch_and_op(self._one, self._got, 0, slot, op=MPI.SUM)
        self.counters.Flush(0)
        return int(self._got[0])

    def fetch(self, slot: int) -> int:
        self.counters.Fetch_and_op(self._one, self._got, 0, slot, op=MPI.NO_OP)
        self.counters.Flush(0)
        return int(self._got[0])

    def publish_clock(self, worker: int, clock: int) -> None:
        self._one[0] = clock
        self.counters.Accumulate(self._one, 0, CLOCKS + worker, op=MPI.REPLACE)
        self.counters.Flush(0)
        self._one[0] = 1

    def clocks(self) -> np.ndarray:
        """Every worker's published clock (atomic per slot)."""
        self.counters.Get_accumulate(self._clocks, self._clocks, 0, (CLOCKS, self.comm.size, MPI.INT64_T), op=MPI.NO_OP)
        self.counters.Flush(0)
        return self._clocks

    def close(self) -> None:
        """Collective (every rank must call it): stops the progress thread, frees the windows."""
        if self._thread is not None:
            self._quit.set()
            self._thread.join(1.0)
            self._thread = None
        if self.win is not None:
            self.win.Unlock_all()
            self.counters.Unlock_all()
            self.own = None  # type: ignore[assignment]  # the memory goes with the window
            self.win.Free()
            self.counters.Free()
            self._progress_comm.Free()
            self.win = None  # type: ignore[assignment]
