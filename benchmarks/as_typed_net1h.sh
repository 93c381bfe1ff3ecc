#!/bin/bash
# Issue 27's "as typed" bar: `mpiexec -n 2 python -m pbp_hpc.train --config configs/report_net1h.yaml
# --set train.batch_size=128` (Net-1h, real MNIST, float32, all 50,000 training examples, 5 epochs)
# against 1 rank x 2 threads, data 2 (parallel.grid manual, reducer auto) and tensor 2, interleaved (per repetition the four
# in turn). Prints one line per run: rep, mode, the epoch times from the epoch lines, and the median of
# the epochs after the first (s/epoch).
#   REPS=2 benchmarks/as_typed_net1h.sh [DATA_DIR]
set -u
cd "$(dirname "$0")/.."
D=${1:-../shared/data/mnist}
C="--config configs/report_net1h.yaml --set train.batch_size=128 --data-dir $D"
for rep in $(seq 1 "${REPS:-2}"); do
 for mode in typed 1x2 data2 tensor2; do
  case $mode in
   typed) cmd="mpiexec -n 2 python -m pbp_hpc.train $C";;
   1x2) cmd="python -m pbp_hpc.train $C --set parallel.threads_per_rank=2";;
   data2) cmd="mpiexec -n 2 python -m pbp_hpc.train $C --set parallel.threads_per_rank=1 --set parallel.grid=manual";;
   tensor2) cmd="mpiexec -n 2 python -m pbp_hpc.train $C --set parallel.threads_per_rank=1 --set parallel.tensor=2";;
  esac
  timeout 600 $cmd 2>&1 | python -c "
import re, statistics, sys
text = sys.stdin.read()
t = [float(x) for x in re.findall(r'^epoch\s+\d+\s.*?time ([0-9.]+)s', text, re.M)]
head = [l for l in text.splitlines() if l.startswith('pbp_hpc: ') and 'rank(s)' in l]
print('$rep', '$mode', ' '.join(f'{x:.3f}' for x in t), 'median(2..):', f'{statistics.median(t[1:]):.3f}' if len(t) > 1 else '-',
      '|', head[0][9:120] if head else '')"
 done
done
