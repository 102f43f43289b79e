#!/usr/bin/env bash
# One call on a lent 2-GPU machine (see BENCHMARKS.md, "Setup"). Usage:
#   bash benchmarks/gpu_session.sh first   # GPU 0: FID timing + throughput, then convergence; GPU 1: convergence
#   JOBS='uniform:0 ...' bash benchmarks/gpu_session.sh more   # both GPUs: convergence, resuming from $CONV
# Results are packed into $OUT/results.tgz (JSON, PNG, logs, TensorBoard events; no checkpoints).
set -uo pipefail
PHASE=${1:-more}
BUDGET=${BUDGET:-530}                 # seconds for this call's convergence launcher(s)
CONV=${CONV:-/tmp/conv}
JOBS=${JOBS:-"uniform:0 speed:0 uniform:1 speed:1"}   # strategy:seed, in order (GPU 0 joins in "first")
STEPS=${STEPS:-20000}
EVERY=${EVERY:-2000}
PER_GPU=${PER_GPU:-1}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/r" "$CONV"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/r/nvidia-smi.csv"
launch() {  # gpus budget jobs
  python3 benchmarks/convergence.py launch --gpus $1 --per-gpu "$PER_GPU" --time-limit "$2" --jobs $3 \
    --steps "$STEPS" --eval-every "$EVERY" --root .data --out "$CONV"
}
start=$(date +%s)
if [ "$PHASE" = first ]; then
  launch 1 "$BUDGET" "${JOBS1:-uniform:0 speed:0}" > "$OUT/r/conv_gpu1.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/fid_speed.py --counts 5000 10000 --root .data \
    --out "$OUT/r/fid_speed.json" > "$OUT/r/fid_speed.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/throughput.py --batch-sizes 128 512 --steps 200 --root .data \
    --out "$OUT/r/throughput.json" > "$OUT/r/throughput.log" 2>&1
  left=$(( BUDGET - ($(date +%s) - start) ))
  # GPU 0 joins with the second seed of the main pair while GPU 1 works through the first.
  [ "$left" -gt 150 ] && launch 0 "$left" "${JOBS0:-uniform:1 speed:1}" > "$OUT/r/conv_gpu0.log" 2>&1
  wait
else
  launch "0 1" "$BUDGET" "$JOBS" > "$OUT/r/conv.log" 2>&1
fi
python3 benchmarks/convergence.py report --steps "$STEPS" --out "$CONV" > "$OUT/r/report.log" 2>&1
cp benchmarks/results/summary.json "$OUT/r/summary.json"
tar czf "$OUT/results.tgz" -C "$OUT" r -C "$CONV" --exclude='*.ckpt' --exclude='hparams.yaml' . 2>/dev/null
rm -rf "$OUT/r"
ls -la "$OUT"; tail -5 "$CONV"/logs/*.log; cat "$CONV/speedups.json" 2>/dev/null | head -60
