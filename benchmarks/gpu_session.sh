#!/usr/bin/env bash
# One call on a lent 2-GPU machine (see BENCHMARKS.md, "Setup"). Usage:
#   bash benchmarks/gpu_session.sh timing  # convergence on both GPUs for $BUDGET s, then FID timing on the idle GPUs
#   bash benchmarks/gpu_session.sh more    # convergence only, resuming from the checkpoints in $CONV
# Throughput: python3 benchmarks/throughput.py --batch-sizes 128 512 --root .data (about 8 minutes).
# Results are packed into $OUT/results.tgz (JSON, PNG, logs, TensorBoard events; no checkpoints).
set -uo pipefail
PHASE=${1:-more}
BUDGET=${BUDGET:-530}                 # seconds for this call's convergence launcher(s)
CONV=${CONV:-/tmp/conv}
JOBS=${JOBS:-"uniform:0 speed:0 uniform:1 speed:1"}   # strategy:seed, in this order
STEPS=${STEPS:-20000}
EVERY=${EVERY:-2000}
PER_GPU=${PER_GPU:-2}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/r" "$CONV"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/r/nvidia-smi.csv"
launch() {  # gpus budget jobs
  python3 benchmarks/convergence.py launch --gpus $1 --per-gpu "$PER_GPU" --time-limit "$2" --jobs $3 \
    --steps "$STEPS" --eval-every "$EVERY" --root .data --out "$CONV"
}
launch "0 1" "$BUDGET" "$JOBS" > "$OUT/r/conv.log" 2>&1
if [ "$PHASE" = timing ]; then  # FID timing on idle GPUs: eager on GPU 0, compiled on GPU 1, side by side
  for v in eager:0 compiled:1; do
    CUDA_VISIBLE_DEVICES=${v#*:} timeout 150 python3 benchmarks/fid_speed.py --variants ${v%:*} --counts 5000 10000 \
      --root .data --out "$OUT/r/fid_speed_${v%:*}.json" > "$OUT/r/fid_speed_${v%:*}.log" 2>&1 &
  done
  wait
fi
python3 benchmarks/convergence.py report --out "$CONV" > "$OUT/r/report.log" 2>&1
cp benchmarks/results/summary.json "$OUT/r/summary.json"
tar czf "$OUT/results.tgz" -C "$OUT" r -C "$CONV" --exclude='*.ckpt' --exclude='hparams.yaml' . 2>/dev/null
rm -rf "$OUT/r"
ls -la "$OUT"; tail -5 "$CONV"/logs/*.log; cat "$CONV/speedups.json" 2>/dev/null | head -60
