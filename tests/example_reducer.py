"""A reducer added from outside the package: MPI_Reduce to rank 0, then MPI_Bcast.

Slower than one Allreduce (two collectives, rank 0 does all the adding): it exists to show,
and test, that a new reducer is one module and one registration line (see test_seams.py).
"""

import time

from mpi4py import MPI

from pbp_hpc.parallel.reducers.base import Reducer


class ReduceBcastReducer(Reducer):
    name = "reduce-bcast"

    def finish(self) -> None:
        if self.comm.size == 1:
            return
        t = time.perf_counter()
        root = self.comm.rank == 0
        self.comm.Reduce(MPI.IN_PLACE if root else self.grad, self.grad if root else None, op=MPI.SUM, root=0)
        self.comm.Bcast(self.grad, root=0)
        self.seconds += time.perf_counter() - t
