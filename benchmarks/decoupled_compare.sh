#!/bin/bash
# The decoupled pipeline schedule against 1f1b, interleaved (docs/model_parallel.md, "Decoupled stages"):
# Net-2h (configs/mnist_net2h.yaml), 2 stages, 8 microbatches, real MNIST, float32, EPOCHS epochs each:
# 1f1b | decoupled, the paper's width x width module, every microbatch | rank 64, every microbatch |
# rank 64, one microbatch in 8 returns its true gradient (synthetic_lr 1e-3 throughout).
# Usage: DATA=../shared/data/mnist REPS=2 EPOCHS=4 benchmarks/decoupled_compare.sh
cd "$(dirname "$0")/.." || exit 2
DATA=${DATA:-../shared/data/mnist} REPS=${REPS:-2} EPOCHS=${EPOCHS:-4}
for rep in $(seq "$REPS"); do
  for mode in "1f1b 1 0" "decoupled 1 0" "decoupled 1 64" "decoupled 8 64"; do
    set -- $mode
    echo "== rep $rep sched $1 every $2 rank $3 $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    mpiexec -n 2 python -m pbp_hpc.train --config configs/mnist_net2h.yaml --data-dir "$DATA" \
      --set parallel.pipeline=2 --set parallel.microbatches=8 --set parallel.pipeline_schedule="$1" \
      --set parallel.synthetic_every="$2" --set parallel.synthetic_rank="$3" --set train.epochs="$EPOCHS" 2>&1 \
      | grep -E "^epoch|test accuracy"
  done
done
