"""Training at the BLAS limit: time per epoch against the GEMMs alone, PyTorch, JAX, and more ranks.

    python -m pbp_hpc.bench [--quick | --smoke] [--data-dir DIR] [--json FILE] [--splits FILE]

Prints one table. For each network, batch size and split of this node's cores into
ranks x threads (plus 1 x 1, the baseline), and for the command a user types (`as typed`), a row says:

  TPE          median training time per epoch (slowest rank; epoch loop as in pbp_hpc.train)
  GFLOP/s      model.flops_per_example x examples / TPE: the dense network's work, whatever was skipped
  peak%        GFLOP/s as a fraction of square-2048 SGEMM measured here at the same cores
  in%          mean share of the input columns the first layer's GEMMs used (train.skip_zero_inputs:
               columns zero in the whole batch are left out); /dense rows use them all
  GEMM         the same epoch's matmuls alone, replayed into the same buffers (each rank its own)
  /GEMM        TPE / GEMM: what everything that is not a GEMM costs
  torch        PyTorch eager, same network, update, batch, data order; threads = ranks x threads
  /torch       TPE / torch
  jax          JAX, jit-compiled, the same network, update, batch, data order, data on the device;
               XLA on ranks x threads threads (one child process per thread count)
  /jax         TPE / jax
  speedup      TPE(1 x 1) / TPE
  comm%        the reducer's share of the epoch (slowest rank)
  RSS, budget  peak resident memory per rank (MB), and dataset + parameters + gradients + one
               batch's activations + 20%; both above the process's footprint before the data
  heap B/step  growth of the traced heap per step over 400 steps (tracemalloc, after gc): 0.0 = nothing kept
  best         * on the fastest split of all the cores (written to --splits for pbp_hpc.hybrid)

The `as typed` row of each (network, batch) is `mpiexec -n C python -m pbp_hpc.train --set ...
--json` with the group's network, training setup, batch and data and no tuning flags (no
binding, the default reducer, no threads setting), run by the parent after the job for reps + 1
epochs: its TPE is the median of train's own epoch times after the first; its other columns
compare it with the job's cases of the split it ran as (C x 1 unless the defaults change).

How: the parent starts one `mpiexec -n C` job (C = cores); every case runs inside it, so
cases are measured side by side: each repetition runs one epoch of every case, in rotated
order, and the table shows medians. A case with fewer ranks runs on the first ranks while
the others sleep (not spin) in a non-blocking barrier. Rank 0 drives PyTorch in a child
process of its own, and JAX in one per thread count, so their memory and thread pools stay out
of our ranks.

Modes: full (default; Net-1h and Net-2h, batches 128, 1024, 4096, all of MNIST's 50,000
training examples, about 8 minutes on 2 idle cores), --quick (batches 128 and 1024, 10,000
examples: GFLOP/s do not depend on the data size; under 2 minutes), --smoke (a tiny network
on synthetic data, one epoch: for the tests).

Model-parallel rows (2x1/tensor2, 2x1/pipeline2(M8)) sit beside data 2, with the bytes a rank
sends per step (KB/step). `--race` prints issue 26's race table instead (pbp_hpc.bench.race).

Modules: race (the race's cells: as typed on 1 and 2 cores, the peers on the same cores),
race_floor (the as-typed cells' GEMM floors, an MPI job), race_table (its table and goals), cases (the Spec, splits and cases), runs (our timed epochs and the GEMM replay),
memory (RSS, budget, heap growth), peers (the peers' client and serving loop, the PyTorch
child), jax_peer (the JAX child), typed (the `as typed` runs), worker (the MPI job), table (rows,
table, goals, the splits file), stopping (stop signals in the parent, passed to its child job),
cli (arguments, header, launch, main).
"""

from pbp_hpc.bench.cases import LEARNING_RATE, NETWORKS, SEED, Case, Spec, cases_for, make_spec, splits_of
from pbp_hpc.bench.cli import launch, main, parse_args
from pbp_hpc.bench.memory import dataset_bytes
from pbp_hpc.bench.runs import GemmReplay, OurRun, Timing
from pbp_hpc.bench.table import COLUMNS, GOALS, TUNED, TYPED, checks, rows_of, table, write_splits

__all__ = [
    "COLUMNS", "GOALS", "LEARNING_RATE", "TUNED", "TYPED", "NETWORKS", "SEED", "Case", "GemmReplay", "OurRun", "Spec", "Timing",
    "cases_for", "checks", "dataset_bytes", "launch", "main", "make_spec", "parse_args", "rows_of", "splits_of",
    "table", "write_splits",
]
