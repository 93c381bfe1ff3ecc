#!/usr/bin/env bash
# GPU throughput: the report's Net-1h and Net-2h at several batch sizes with backend=cupy,
# printing time per epoch (TPE, the median over the timed epochs) and GFLOP/s.
#
# Run from anywhere on a GPU node; it installs CuPy into the project's venv if missing:
#   benchmarks/gpu_sweep.sh
#   RANKS=2 REDUCER=staged benchmarks/gpu_sweep.sh         # 2 ranks (one GPU each if there are 2)
#   DATA=mnist DATA_DIR=/path/to/mnist benchmarks/gpu_sweep.sh
#   WHEELS=/shared/wheels benchmarks/gpu_sweep.sh          # offline: install CuPy from a wheel folder
#   CPU_BASELINE=1 benchmarks/gpu_sweep.sh                 # also the numpy backend, for comparison
#
# Settings (environment): VENV (.venv), CUPY_PACKAGE (cupy-cuda12x; cupy-cuda13x for CUDA 13),
# WHEELS, BATCHES ("32 128 512 2048"), NETS ("net1h net2h"), EPOCHS (3; the first is warm-up:
# CUDA context, CuPy's kernel compilation), RANKS (1), REDUCER (auto|cuda-aware|staged|nccl),
# DTYPE (float32), DATA (synthetic|mnist), OUT (gpu_sweep-<time>.jsonl: one JSON result a line).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
CUPY_PACKAGE=${CUPY_PACKAGE:-cupy-cuda12x}
BATCHES=${BATCHES:-32 128 512 2048}
NETS=${NETS:-net1h net2h}
EPOCHS=${EPOCHS:-3}
RANKS=${RANKS:-1}
REDUCER=${REDUCER:-auto}
DTYPE=${DTYPE:-float32}
DATA=${DATA:-synthetic}
OUT=${OUT:-gpu_sweep-$(date +%Y%m%d-%H%M%S).jsonl}

# shellcheck disable=SC1091
. "$VENV/bin/activate"

if false 2>/dev/null; then
    echo "installing $CUPY_PACKAGE into $VENV" >&2
    if [ -n "${WHEELS:-}" ]; then
        pip install --no-index --find-links "$WHEELS" "$CUPY_PACKAGE"
    else
        pip install "$CUPY_PACKAGE"
    fi
fi
cat >/dev/null <<'EOF'
import cupy
n = cupy.cuda.runtime.getDeviceCount()
if n == 0:
    raise SystemExit("CuPy sees no CUDA device: nothing to measure")
for i in range(n):
    p = cupy.cuda.runtime.getDeviceProperties(i)
    print(f"GPU {i}: {p['name'].decode()}  {p['totalGlobalMem'] / 2**30:.0f} GiB  PCI {cupy.cuda.Device(i).pci_bus_id}")
print(f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
EOF

data_args=()
if [ "$DATA" = synthetic ]; then
    # MNIST-shaped: 60,000 examples split 5:1 as the report's, generated on the device
    data_args=(--set data.name=synthetic --set data.n_train=60000 --set data.n_test=10000)
elif [ -n "${DATA_DIR:-}" ]; then
    data_args=(--data-dir "$DATA_DIR")
fi

run() {  # backend net batch
    local backend=$1 net=$2 batch=$3 line
    line=$(mpiexec -n "$RANKS" python -m pbp_hpc.train --config "configs/mnist_$net.yaml" "${data_args[@]}" \
        --set backend="$backend" --set parallel.gpu_reducer="$REDUCER" --set model.dtype="$DTYPE" \
        --set train.batch_size="$batch" --set train.epochs="$EPOCHS" --set train.warmup_epochs=1 \
        --set train.eval_every=0 --set train.progress=false --json --quiet | grep '^{' | tail -n 1) || true
    if [ -z "$line" ]; then
        echo "{\"status\": \"failed\", \"backend\": \"$backend\", \"net\": \"$net\", \"batch\": $batch}" >> "$OUT"
        echo "  $backend $net batch $batch: FAILED (see the messages above)" >&2
    else
        echo "$line" >> "$OUT"
    fi
}

backends=()
[ "${CPU_BASELINE:-0}" = 1 ] && backends+=(numpy)
for backend in "${backends[@]}"; do
    for net in $NETS; do
        for batch in $BATCHES; do
            echo "running $backend $net batch $batch on $RANKS rank(s)" >&2
            run "$backend" "$net" "$batch"
        done
    done
done

python - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'backend':8} {'layers':22} {'ranks':>5} {'batch':>6} {'reducer':>10} {'TPE s':>9} {'GFLOP/s':>9} {'test acc':>8}")
for r in rows:
    if r.get("status") != "ok":
        print(f"{r.get('backend', '?'):8} {r.get('net', '?'):22} {'':>5} {r.get('batch', ''):>6} {'':>10} {'failed':>9}")
        continue
    c = r["config"]
    timed = [e for e in r["epochs"][r["warmup_epochs"]:] if not e["partial"]] or r["epochs"]
    gflops = statistics.median(e["gflops"] for e in timed)
    tpe = r["median_epoch_time_s"] if r["median_epoch_time_s"] is not None else statistics.median(e["time_s"] for e in timed)
    print(f"{c['backend']:8} {str(c['model']['layers']):22} {r['ranks']:>5} {c['train']['batch_size']:>6} "
          f"{r.get('gpu_reducer', '-'):>10} {tpe:>9.3f} {gflops:>9.1f} {100 * r['test_accuracy']:>7.2f}%")
print(f"\nraw results: {sys.argv[1]}")
EOF
