#!/bin/bash
# Net-1h (configs/report_net1h.yaml), real MNIST, float32: 1 rank x 1 thread, 1 rank x 2 threads,
# data 2 and tensor 2 at batch 1, 16, 128, 1024, interleaved (per repetition, per batch, the four
# modes in turn); one JSON line per run in $OUT. The numbers of issue 27 (docs/model_parallel.md).
#   REPS=2 OUT=results.jsonl benchmarks/model_parallel_compare.sh [DATA_DIR]
set -u
cd "$(dirname "$0")/.."
D=${1:-../shared/data/mnist}
OUT=${OUT:-model_parallel_compare.jsonl}
for rep in $(seq 1 "${REPS:-2}"); do
 for B in ${BATCHES:-1 16 128 1024}; do
  case $B in 1) N=3600;; 16) N=12000;; *) N=24000;; esac
  C="--config configs/report_net1h.yaml --data-dir $D --set data.n_train=$N --set train.epochs=3 --set train.batch_size=$B
     --set train.eval_every=0 --set data.n_test=0 --set parallel.reducer=auto --quiet --json"
  for mode in 1x1 1x2 data2 tensor2; do
   case $mode in
    1x1) cmd="python -m pbp_hpc.train $C --set parallel.threads_per_rank=1";;
    1x2) cmd="python -m pbp_hpc.train $C --set parallel.threads_per_rank=2";;
    data2) cmd="mpiexec -n 2 python -m pbp_hpc.train $C --set parallel.threads_per_rank=1 --set parallel.grid=manual";;
    tensor2) cmd="mpiexec -n 2 python -m pbp_hpc.train $C --set parallel.threads_per_rank=1 --set parallel.tensor=2";;
   esac
   timeout 900 $cmd 2>/dev/null | python -c "
import json, sys
r = json.load(sys.stdin)
print(json.dumps({'rep': $rep, 'batch': $B, 'mode': '$mode', 'n_train': r['n_train'],
                  'epochs': [e['time_s'] for e in r['epochs']], 'compute': [e['compute_s'] for e in r['epochs']],
                  'comm': [e.get('comm_s', e.get('allreduce_s')) for e in r['epochs']], 'bytes_per_step': r.get('bytes_per_step'),
                  'wire_bytes_per_step': r.get('wire_bytes_per_step')}))" >> "$OUT"
  done
 done
done
