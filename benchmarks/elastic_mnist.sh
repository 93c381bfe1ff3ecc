#!/bin/bash
# The MNIST numbers of docs/elastic.md (issue 23): Net-1h with the defaults (8 epochs, float32).
#   1. a 2-rank run stopped mid-run (global step 150 of 392) and resumed on 1 and on 3 ranks, against
#      the uninterrupted 2-rank run;
#   2. 3 ranks under the elastic launcher, rank 2 SIGKILLed halfway (global step 196), checkpoints every
#      20 steps, against the uninterrupted 3-rank run.
# Usage: bash benchmarks/elastic_mnist.sh OUTDIR [DATA_DIR]   (from the repository root, venv active)
set -euo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DATA=$(cd "${2:-../shared/data/mnist}" && pwd)
T="timeout 900"
run() { local name=$1; shift; (cd "$OUT" && $T "$@" --data-dir "$DATA" --json > "$name.json" 2> "$name.err") || echo "$name exited $?"; }
acc() { python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r.get('status'), r.get('ranks'), r.get('test_accuracy'), r.get('restarts'), r.get('lost_s'))" "$OUT/$1.json"; }

run full2 mpiexec -n 2 python -m pbp_hpc.train --set checkpoint.path=full2.h5
run cut2 mpiexec -n 2 python -m pbp_hpc.train --set checkpoint.path=cut.h5 --set debug.signal_step=150
cp "$OUT/cut.h5" "$OUT/cut1.h5"; cp "$OUT/cut.h5" "$OUT/cut3.h5"
run resumed1 mpiexec -n 1 python -m pbp_hpc.train --set checkpoint.path=cut1.h5 --resume
run resumed3 mpiexec -n 3 python -m pbp_hpc.train --set checkpoint.path=cut3.h5 --resume
run full3 mpiexec -n 3 python -m pbp_hpc.train --set checkpoint.path=full3.h5
run elastic3 python -m pbp_hpc.elastic --min-ranks 2 -- mpiexec -n 3 python -m pbp_hpc.train \
    --set checkpoint.path=elastic.h5 --set checkpoint.every_steps=20 \
    --set debug.fail_rank=2 --set debug.fail_step=196 --set debug.fail_kind=kill
for n in full2 resumed1 resumed3 full3 elastic3; do acc $n; done
