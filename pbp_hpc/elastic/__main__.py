import sys

import mpi4py

# The launcher is a plain process around mpiexec or srun: it reads exit codes and output and never
# joins the MPI world, so MPI is not initialised here (pbp_hpc modules it imports import mpi4py.MPI).
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

from pbp_hpc.elastic.cli import main  # noqa: E402

sys.exit(main())
