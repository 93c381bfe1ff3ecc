#!/bin/bash
# =====================================================================================================
# pbp_hpc: merge a sweep's per-point results and analyse them -- the job that runs after the array.
#
# `python -m pbp_hpc.sweep JOBFILE --slurm` submits it for you, after the array job of slurm/sweep.sh:
#
#     PBP_RESULTS_DIR=results/scaling sbatch --dependency=afterany:<array job id> slurm/merge.sh
#
# `afterany` (not `afterok`) so that the points that did finish are merged even when some failed; the
# log says which points are missing. It writes, in $PBP_RESULTS_DIR:
#     merged.h5      all point-*.h5 in one file        (python -m pbp_hpc.results merge)
#     analysis.txt   the analysis report               (python -m pbp_hpc.analyze)
#     plots/         its figures
#
# Environment: PBP_RESULTS_DIR (required, or the first argument), PBP_SWEEP_POINTS (optional: the
# number of points expected, to report the missing ones), PBP_LOG_DIR (optional: where the points'
# logs are, for the messages; `--slurm` sets it), PBP_VENV / PBP_PYTHON as in train.sh.
# Submitted by hand (from the repository root), its own log is logs/pbp-merge-<jobid>.out.
# =====================================================================================================
#SBATCH --job-name=pbp-merge
#SBATCH --output=logs/%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
##SBATCH --partition=compute
##SBATCH --account=myproject

set -uo pipefail

# module purge
# module load python/3.11

log() { printf '[merge.sh %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

PBP_RESULTS_DIR=${PBP_RESULTS_DIR:-${1:-}}
[ -n "$PBP_RESULTS_DIR" ] || { log "set PBP_RESULTS_DIR (or pass the results folder as the first argument)"; exit 2; }
[ -d "$PBP_RESULTS_DIR" ] || { log "results folder $PBP_RESULTS_DIR not found (relative to $(pwd))"; exit 2; }

if [ -n "${PBP_VENV:-}" ]; then
    [ -f "$PBP_VENV/bin/activate" ] || { log "PBP_VENV=$PBP_VENV has no bin/activate"; exit 2; }
    # shellcheck disable=SC1091
    . "$PBP_VENV/bin/activate"
elif [ -f "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "${SLURM_SUBMIT_DIR:-.}/.venv/bin/activate"
fi
PYTHON=${PBP_PYTHON:-python}
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$CPUS OPENBLAS_NUM_THREADS=$CPUS MKL_NUM_THREADS=$CPUS
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

shopt -s nullglob
points=("$PBP_RESULTS_DIR"/point-*.h5)
shopt -u nullglob
if [ ${#points[@]} -eq 0 ]; then
    log "no point-*.h5 in $PBP_RESULTS_DIR: every sweep point failed? (see the pbp-sweep-*.out logs${PBP_LOG_DIR:+ in $PBP_LOG_DIR})"
    exit 1
fi
if [ -n "${PBP_SWEEP_POINTS:-}" ]; then
    missing=()
    for ((i = 0; i < PBP_SWEEP_POINTS; i++)); do
        [ -f "$PBP_RESULTS_DIR/point-$i.h5" ] || missing+=("$i")
    done
    [ ${#missing[@]} -eq 0 ] || log "missing points (failed or cancelled): ${missing[*]}${PBP_LOG_DIR:+ (their logs: $PBP_LOG_DIR)}"
fi
log "merging ${#points[@]} point file(s) of $PBP_RESULTS_DIR"

"$PYTHON" -m pbp_hpc.results merge "${points[@]}" -o "$PBP_RESULTS_DIR/merged.h5" || {
    rc=$?
    log "merge failed ($rc)"
    exit $rc
}
"$PYTHON" -m pbp_hpc.analyze "$PBP_RESULTS_DIR/merged.h5" --plots "$PBP_RESULTS_DIR/plots" \
    >"$PBP_RESULTS_DIR/analysis.txt" || {
    rc=$?
    log "analysis failed ($rc); merged results are in $PBP_RESULTS_DIR/merged.h5"
    exit $rc
}
log "done: $PBP_RESULTS_DIR/merged.h5, $PBP_RESULTS_DIR/analysis.txt, $PBP_RESULTS_DIR/plots/"
exit 0
