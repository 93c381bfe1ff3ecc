#!/usr/bin/env bash
# Training at the BLAS limit, side by side: python -m pbp_hpc.bench (see benchmarks/README.md).
#
#   benchmarks/run.sh                 # full: Net-1h and Net-2h, batches 128/1024/4096 (~8 min on 2 idle cores)
#   benchmarks/run.sh --quick         # batches 128 and 1024 on 10,000 examples (under 2 min)
#   benchmarks/run.sh --clock cpu     # on a machine other people are using (1-thread cases by CPU time)
#   benchmarks/run.sh --race          # issue 26's race table instead: as typed vs JAX and PyTorch on 1 and 2 cores (~25 min)
#
# Extra arguments go to the benchmark (--data-dir DIR, --nets, --batches, --reps, --pin, ...).
# The table goes to the terminal and to benchmarks/results/bench-<host>-<time>.txt, every number
# to the .json beside it; the fastest ranks x threads split per batch size is merged into
# pbp_hpc/parallel/hybrid_splits.json, which pbp_hpc.hybrid.best_split reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$root/.venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"
fi

out="$here/results"
mkdir -p "$out"
stamp="bench-$(hostname -s)-$(date +%Y%m%d-%H%M%S)"
python -m pbp_hpc.bench --json "$out/$stamp.json" "$@" | tee "$out/$stamp.txt"
