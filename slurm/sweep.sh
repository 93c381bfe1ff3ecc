#!/bin/bash
# =====================================================================================================
# pbp_hpc: a parameter sweep as a Slurm job array -- one array task per sweep point, each one MPI run.
#
# The easy way: let the helper count the points, submit this array and the merge job after it:
#
#     python -m pbp_hpc.sweep jobs/strong_scaling.yaml --slurm
#
# It runs  sbatch --array=0-(N-1) --ntasks=... --cpus-per-task=... slurm/sweep.sh  and then
#          sbatch --dependency=afterany:<array job id> slurm/merge.sh  (merge + analysis, see merge.sh),
# both with --output in a folder of their own beside the results: results/<name>/logs/<date-time>/.
#
# By hand:
#     python -m pbp_hpc.sweep jobs/strong_scaling.yaml --list   # prints the points; N = their number
#     PBP_JOBFILE=jobs/strong_scaling.yaml PBP_RESULTS_DIR=results/scaling-2 \
#         sbatch --array=0-3%2 --ntasks=4 slurm/sweep.sh          # 4 points, at most 2 at a time
#     PBP_RESULTS_DIR=results/scaling-2 sbatch --dependency=afterany:<array job id> slurm/merge.sh
#
# Naming: the sweep file is a YAML job file (jobs/<name>.yaml), given as PBP_JOBFILE or as the first
# argument after the script name. Each task writes $PBP_RESULTS_DIR/point-<task id>.h5 (default
# results directory: results/<job file name without .yaml>, the same folder that `--slurm` uses), and
# by hand its log goes to logs/pbp-sweep-<array job id>_<task id>.out (logs/ is in the repository;
# choose another with sbatch --output=DIR/%x-%A_%a.out; DIR must exist). Arguments after the job file
# are passed on to `python -m pbp_hpc.sweep`. --ntasks must cover the sweep's largest point: a task
# whose point needs more ranks stops before training and names the sbatch options that fit.
#
# A point already recorded in its point-<task id>.h5 is not run again (an earlier submission into the
# same results folder, or a requeue): the task then says so at its start, lists the point's runs and
# their state, and ends without training. Use a new PBP_RESULTS_DIR to run the sweep afresh.
#
# What to edit (or override on the sbatch command line, as the helper does):
#   --array            0-(N-1) for N points; append %K to run at most K at once. Required.
#   --ntasks / --nodes MPI ranks for each point (each array task is its own allocation)
#   --cpus-per-task    cores per rank (BLAS threads)
#   --time             limit for ONE point (not for the whole sweep); keep it above 2 minutes
#
# Environment (all optional except the job file): PBP_JOBFILE, PBP_RESULTS_DIR, PBP_VENV (default .venv
# in the submit directory, if there is one), PBP_PYTHON, PBP_MAX_RESTARTS (default 20), and
# PBP_SRUN_MPI, the plugin `pbp_hpc.sweep --launcher srun` passes to `srun --mpi=` (default auto: pmix
# for Open MPI, pmi2 for MPICH, Intel MPI, MVAPICH -- see train.sh; a wrong one gives P 1-rank runs).
#
# Time limit: as in train.sh, Slurm sends SIGUSR1 to this script ~120 s before the limit; it is passed
# to `pbp_hpc.sweep`, which passes it to its srun, the point checkpoints and stops, and this array task
# (only this one) is requeued and resumes later with the same task ID.
# =====================================================================================================
#SBATCH --job-name=pbp-sweep
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
##SBATCH --array=0-11%4
##SBATCH --partition=compute
##SBATCH --account=myproject

set -uo pipefail

# ---- software environment: uncomment what your cluster needs -----------------------------------------
# module purge
# module load python/3.11
# module load mpich          # then PBP_SRUN_MPI=pmi2 (auto-detected)
# module load openmpi        # then PBP_SRUN_MPI=pmix (auto-detected)

log() { printf '[sweep.sh %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "sweep.sh is a Slurm batch script: submit it with  sbatch --array=0-(N-1) slurm/sweep.sh JOBFILE" >&2
    echo "(or let  python -m pbp_hpc.sweep JOBFILE --slurm  do it)" >&2
    exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    log "not an array job: submit with --array=0-(N-1), N = the number of points (python -m pbp_hpc.sweep JOBFILE --list)"
    exit 2
fi

if [ -z "${PBP_JOBFILE:-}" ]; then
    [ $# -ge 1 ] || { log "no sweep file: set PBP_JOBFILE or pass it after the script name"; exit 2; }
    PBP_JOBFILE=$1
    shift
fi
[ -f "$PBP_JOBFILE" ] || { log "sweep file $PBP_JOBFILE not found (relative to $(pwd))"; exit 2; }
stem=$(basename "$PBP_JOBFILE")
stem=${stem%.*}
PBP_RESULTS_DIR=${PBP_RESULTS_DIR:-results/$stem}
mkdir -p "$PBP_RESULTS_DIR"
export PBP_JOBFILE PBP_RESULTS_DIR

if [ -n "${PBP_VENV:-}" ]; then
    [ -f "$PBP_VENV/bin/activate" ] || { log "PBP_VENV=$PBP_VENV has no bin/activate"; exit 2; }
    # shellcheck disable=SC1091
    . "$PBP_VENV/bin/activate"
elif [ -f "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate"
fi
PYTHON=${PBP_PYTHON:-python}

# ---- data: as `make run` finds it -------------------------------------------------------------------------
# --data-dir (after the script name) or PBP_HPC_DATA win; else ../shared/data/mnist beside the repository
# when it holds MNIST; else the package's per-user cache (~/.cache/pbp_hpc/mnist, downloaded once).
SHARED_MNIST=${SLURM_SUBMIT_DIR:-.}/../shared/data/mnist
if [ -z "${PBP_HPC_DATA:-}" ] && compgen -G "$SHARED_MNIST/train-images*idx3-ubyte*" >/dev/null; then
    PBP_HPC_DATA=$(cd "$SHARED_MNIST" && pwd)
    export PBP_HPC_DATA
fi

# ---- threads ------------------------------------------------------------------------------------------
CPUS=${SLURM_CPUS_PER_TASK:-1}
export SRUN_CPUS_PER_TASK=$CPUS # since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch
export OMP_NUM_THREADS=$CPUS OPENBLAS_NUM_THREADS=$CPUS MKL_NUM_THREADS=$CPUS
export PYTHONUNBUFFERED=1

# ---- srun's MPI plugin, for the ranks that pbp_hpc.sweep launches ----------------------------------------
MPI_PLUGIN=${PBP_SRUN_MPI:-auto}
if [ "$MPI_PLUGIN" = auto ]; then
    MPI_LIB=$("$PYTHON" -c 'import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False
from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])' 2>/dev/null)
    case $MPI_LIB in
        *"Open MPI"*) MPI_PLUGIN=pmix ;;
        *) MPI_PLUGIN=pmi2 ;;
    esac
else
    MPI_LIB="(not checked)"
fi
export PBP_SRUN_MPI=$MPI_PLUGIN

POINT=$SLURM_ARRAY_TASK_ID
RESULT=$PBP_RESULTS_DIR/point-$POINT.h5
RESTARTS=${SLURM_RESTART_COUNT:-0}
TASK_JOB=${SLURM_ARRAY_JOB_ID}_${POINT}

log "array task $TASK_JOB (job $SLURM_JOB_ID, restart $RESTARTS) on ${SLURM_JOB_NODELIST:-?}: point $POINT of" \
    "$PBP_JOBFILE, ${SLURM_NTASKS:-?} ranks x $CPUS threads, srun --mpi=$MPI_PLUGIN [$MPI_LIB] -> $RESULT"
if [ -f "$RESULT" ]; then
    # Said first, so that a task that ends having trained nothing is not a mystery.
    log "$RESULT exists already (written by an earlier submission into $PBP_RESULTS_DIR, or by this task" \
        "before a requeue): the runs recorded in it are not run again. The point's runs:"
    "$PYTHON" -m pbp_hpc.sweep "$PBP_JOBFILE" --list --point "$POINT" --results "$RESULT" --launcher srun \
        ${1+"$@"} >&2
    log "to run the point afresh, submit again with PBP_RESULTS_DIR set to a new folder"
fi

# ---- SIGUSR1 (time limit near): checkpoint, then requeue this task ---------------------------------------
signals=0
child=
# shellcheck disable=SC2317  # invoked by the trap
on_usr1() {
    signals=$((signals + 1))
    log "SIGUSR1: time limit near; asking point $POINT to write a checkpoint and stop"
    [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
}
trap on_usr1 USR1

run_step() { # run_step CMD...: run CMD in the background, wait for it through trapped signals
    local rc seen r2
    "$@" &
    child=$!
    while :; do
        seen=$signals
        wait "$child"
        rc=$?
        [ "$seen" = "$signals" ] && break
        kill -0 "$child" 2>/dev/null && continue
        wait "$child"
        r2=$?
        [ $r2 = 127 ] || rc=$r2
        break
    done
    child=
    return $rc
}

requeue() {
    if [ "$RESTARTS" -ge "${PBP_MAX_RESTARTS:-20}" ]; then
        log "restarted $RESTARTS times already (PBP_MAX_RESTARTS=${PBP_MAX_RESTARTS:-20}); not requeueing"
        exit 0
    fi
    log "requeueing array task $TASK_JOB"
    scontrol requeue "$TASK_JOB" || { log "scontrol requeue failed"; exit 1; }
    exit 0
}

[ "$signals" -gt 0 ] && requeue

# pbp_hpc.sweep runs here, in the batch step, and starts the point's ranks itself with srun.
run_step "$PYTHON" -m pbp_hpc.sweep "$PBP_JOBFILE" \
    --point "$POINT" \
    --results "$RESULT" \
    --launcher srun \
    ${1+"$@"}
rc=$?

if [ "$signals" -gt 0 ]; then
    [ $rc -eq 0 ] && requeue
    log "point $POINT exited with $rc after SIGUSR1; not requeueing"
fi
log "point $POINT exited with $rc"
exit $rc
