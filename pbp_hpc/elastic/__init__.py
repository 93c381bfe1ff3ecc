"""Elastic runs: `python -m pbp_hpc.elastic [--min-ranks K] [--max-restarts R] -- mpiexec -n P python -m pbp_hpc.train ...`.

A job that loses a rank or a node is restarted from its last checkpoint on the ranks and hosts
that are left (docs/elastic.md). The launcher is a plain process around mpiexec or srun: it
never joins the MPI world (mpi4py is told not to initialise MPI here).
"""

import mpi4py

mpi4py.rc.initialize = False  # the launcher only reads exit codes and output; MPI is the ranks'
mpi4py.rc.finalize = False

from pbp_hpc.elastic.cli import main  # noqa: E402

__all__ = ["main"]
