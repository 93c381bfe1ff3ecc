"""Tables and figures from sweep results: `python -m pbp_hpc.analyze results/X.h5 [...] [--plots DIR]`.

Reads run records (pbp_hpc.results HDF5 files, or the JSON that `train --json` prints),
groups the repetitions of each measured point, and derives what the report tabulates: time
per epoch (TPE), GFLOP/s, speedups, parallel efficiency, communication fraction, accuracy,
time to a target accuracy (runs with train.target_accuracy), strong and weak scaling, and the
alpha-beta model's extrapolation (pbp_hpc.analyze.perfmodel).
Runs that failed, diverged, timed out or have no timed epoch are listed at the end, never
dropped silently. docs/analysis.md explains every column.

The modules, each importing only those above it:

    perfmodel  the alpha-beta model of the Allreduce and the speedup it predicts
    records    reading run records; what one record says (TPE, communication, ...)
    points     Case and Point: the repetitions of one configuration, aggregated
    accuracy   time to the target accuracy: rows per configuration, the fastest one
    scaling    speedup, efficiency, strong and weak scaling rows
    models     alpha and beta for these runs; the model's rows
    tables     the text tables, CSV and JSON
    figstyle   what every figure shares: series styles, panels, plain ticks, oversubscribed points
    figures    the PNG figures (matplotlib; loaded only for --plots)
    accuracy_figures  the time-to-accuracy PNG figures (likewise)
    model_parallel    data vs tensor vs pipeline per batch: time per epoch, bytes a step, the fastest
    model_parallel_figures  its figure: time per epoch against batch, a series per parallelism (--plots)
    cli        the command line

This package re-exports the names scripts and tests use, so `analyze.aggregate(...)` and
`analyze.main` work without knowing the layout.
"""

from __future__ import annotations

from pbp_hpc.analyze import perfmodel
from pbp_hpc.analyze.accuracy import (
    best_line,
    best_row,
    by_target,
    effective_tpe,
    reached,
    target_of,
    time_to_target_rows,
    variant_of,
)
from pbp_hpc.analyze.cli import main, parse_args
from pbp_hpc.analyze.models import (
    ModelSeries,
    allreduce_samples,
    choose_alpha_beta,
    model_check_rows,
    model_rows,
    model_series,
    predict,
    projection,
)
from pbp_hpc.analyze.points import Case, Point, aggregate, case_of, find, make_point, problem_row
from pbp_hpc.analyze.records import (
    DTYPE_BYTES,
    IMPLEMENTATIONS,
    NETWORK_NAMES,
    Record,
    batch_of,
    dtype_of,
    gradient_bytes,
    implementation_of,
    network_of,
    read_records,
    run_allreduce_per_step,
    run_comm_fraction,
    run_compute_per_example,
    run_examples,
    run_tpe,
    steps_per_epoch,
    timed_epochs,
)
from pbp_hpc.analyze.scaling import (
    MPI_IMPLEMENTATIONS,
    SERIAL_COUNTERPART,
    counterpart,
    efficiency,
    fastest_serial,
    performance_rows,
    serial_base,
    step_time,
    strong_scaling_rows,
    weak_scaling_rows,
)
from pbp_hpc.analyze.tables import (
    MODEL_TABLE_RANKS,
    PERF_COLUMNS,
    PERF_NOTES,
    Column,
    TTA_COLUMNS,
    TTA_NOTES,
    Table,
    accuracy_tables,
    as_json,
    build_tables,
    num,
    text,
    write_csv,
)

__all__ = [
    "perfmodel", "main", "parse_args",
    "Record", "IMPLEMENTATIONS", "NETWORK_NAMES", "DTYPE_BYTES", "read_records", "network_of", "dtype_of", "batch_of",
    "implementation_of", "timed_epochs", "run_tpe", "run_comm_fraction", "run_examples", "steps_per_epoch",
    "run_compute_per_example", "run_allreduce_per_step", "gradient_bytes",
    "Case", "Point", "case_of", "make_point", "problem_row", "aggregate", "find",
    "SERIAL_COUNTERPART", "MPI_IMPLEMENTATIONS", "counterpart", "fastest_serial", "efficiency", "performance_rows",
    "serial_base", "strong_scaling_rows", "step_time", "weak_scaling_rows",
    "ModelSeries", "allreduce_samples", "choose_alpha_beta", "model_series", "predict", "projection", "model_rows", "model_check_rows",
    "MODEL_TABLE_RANKS", "Column", "Table", "num", "text", "PERF_COLUMNS", "PERF_NOTES", "build_tables", "write_csv", "as_json",
    "target_of", "reached", "variant_of", "effective_tpe", "time_to_target_rows", "by_target", "best_row", "best_line",
    "TTA_COLUMNS", "TTA_NOTES", "accuracy_tables",
]
