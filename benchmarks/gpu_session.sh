#!/usr/bin/env bash
# One call on a lent 2-GPU machine (see BENCHMARKS.md, "Setup"). Usage:
#   bash benchmarks/gpu_session.sh conv     # convergence jobs on both GPUs for $BUDGET s (resumes from $CONV)
#   bash benchmarks/gpu_session.sh timing   # the same, then FID timing (eager on GPU 0, compiled on GPU 1)
#   bash benchmarks/gpu_session.sh measure  # no training: FID timing, DDP scaling 1 -> $DDP_DEVICES GPUs, throughput
#                                           # rows c, d at 512
#   bash benchmarks/gpu_session.sh ddp      # DDP scaling only (DDP_DEVICES, default "1 2"), then convergence jobs
#   bash benchmarks/gpu_session.sh single   # one GPU: FID timing (idle GPU), throughput rows c, d at 512, then
#                                           # convergence jobs on GPU 0 until CALL_SECONDS (default 585) are used
#   bash benchmarks/gpu_session.sh hostgap  # one GPU, no training (about 5 minutes): rows a and b at 128, 5 interleaved
#                                           # repeats, then each row's host time per step and a trace that names the host
#                                           # operators launching ATen's elementwise kernels (BENCHMARKS.md, section 1),
#                                           # and Inductor's code of row a's step (output_code.log; OUTPUT_CODE=0 skips
#                                           # it). THEN_CONV=1: convergence jobs get the rest of the call, as in single
# The DiT recipe's ablation seeds, one call each on one GPU (two runs share it; about 9k of the 10k steps; a second call
# with the same CONV resumes them), as BENCHMARKS.md section 0b ran them:
#   GPUS=0 PER_GPU=2 BASE=fashion_mnist_dit.yaml EVERY=2500 FINAL=0 BUDGET=545 JOBS="uniform:1:10000 speed:1:10000" \
#     LAUNCH_ARGS="--batch-size 64 --set ema.init_args.decay=0.999 model.learn_sigma=false model.backbone.init_args.learn_sigma=false" \
#     bash benchmarks/gpu_session.sh conv      # fixed variance, seed 1. The sampler ablation: the same with
#                                              # LAUNCH_ARGS="--batch-size 64 --fid-solver ddpm --fid-steps 250 --set ema.init_args.decay=0.999"
# The UNet pair at the DiT ablations' batch 64, which separates the backbone from the batch (BENCHMARKS.md, section 0b;
# seed 1: uniform:1 speed:1; at the DiT's lr add --set model.optimizer.init_args.lr=0.0001 to LAUNCH_ARGS):
#   GPUS=0 PER_GPU=2 EVERY=2500 FINAL=0 BUDGET=545 JOBS="uniform:0:10000 speed:0:10000" LAUNCH_ARGS="--batch-size 64" \
#     bash benchmarks/gpu_session.sh conv
# Throughput: python3 -m benchmarks.throughput --batch-sizes 128 512 --root .data (about 8 minutes).
# Results are packed into $OUT/results.tgz (JSON, PNG, logs, TensorBoard events; no checkpoints).
set -uo pipefail
PHASE=${1:-conv}
BUDGET=${BUDGET:-530}                 # seconds for this call's convergence launcher
CONV=${CONV:-/tmp/conv}
# strategy:seed:steps, in priority order: the main pair to N = 20k, then the study and the other strategies to 10k.
JOBS=${JOBS:-"uniform:0:20000 speed:0:20000 uniform:1:20000 speed:1:20000 speed_sampling_only:0:10000
  speed_weighting_only:0:10000 speed_auto:0:10000 p2:0:10000 min_snr:0:10000 logit_normal:0:10000
  clts:0:10000 loss_aware:0:10000 speed_cosine:0:10000"}
EVERY=${EVERY:-2500}
PER_GPU=${PER_GPU:-3}
FINAL=${FINAL:-10000}                 # samples for the final FIDs at N (DDIM-50 and DDPM-250), uniform and speed
OUT=${OUT:-/tmp/out}
GPUS=${GPUS:-"0 1"}
DDP_DEVICES=${DDP_DEVICES:-"1 2"}
BASE=${BASE:-fashion_mnist.yaml}      # the base config under configs/ (fashion_mnist_dit.yaml: the paper recipe)
LAUNCH_ARGS=${LAUNCH_ARGS:-}           # more launcher arguments, e.g. "--fid-solver ddpm --fid-steps 250"
mkdir -p "$OUT/r" "$CONV"
[ -d /tmp/site/jsonargparse ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/r/nvidia-smi.csv"
fid_timing() {  # seconds allowed; eager on GPU 0, compiled on GPU 1, side by side on otherwise idle GPUs
  for v in eager:0 compiled:1; do
    CUDA_VISIBLE_DEVICES=${v#*:} timeout "$1" python3 -m benchmarks.fid_speed --variants ${v%:*} --counts 5000 10000 \
      --root .data --out "$OUT/r/fid_speed_${v%:*}.json" > "$OUT/r/fid_speed_${v%:*}.log" 2>&1 &
  done
  wait
}
throughput_c_d() {  # rows c and d at batch 512 on GPU 0
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m benchmarks.throughput --batch-sizes 512 --rows c d --root .data \
    --out "$OUT/r/throughput_c_d.json" > "$OUT/r/throughput_c_d.log" 2>&1
}
ddp_scaling() {  # seconds allowed; DDP_DEVICES on otherwise idle GPUs
  timeout "$1" python3 -m benchmarks.ddp_scaling --devices $DDP_DEVICES --root .data --out "$OUT/r/ddp_scaling.json" > "$OUT/r/ddp.log" 2>&1
}
if [ "$PHASE" = hostgap ]; then  # OUTPUT_CODE=0 skips Inductor's code; THEN_CONV=1 gives the rest of the call to conv
  # No TORCH_LOGS=cudagraphs here: its debug message for the stale graph node that each profiled step checks first
  # (the profile phase's fresh modules reuse the compiled code of the windows' ones) costs more than 1 ms per step.
  timeout 420 python3 -m benchmarks.throughput --batch-sizes 128 --rows a b --repeats 5 --window 10 \
    --profile-steps 20 --root .data --out "$OUT/r/throughput_hostgap.json" > "$OUT/r/throughput_hostgap.log" 2>&1
  if [ "${OUTPUT_CODE:-1}" = 1 ]; then  # Inductor's code for the plain step (row a): the op behind the copy kernels
    TORCH_LOGS=output_code timeout 150 python3 -c "import torch; from benchmarks import throughput as t
dev = torch.device('cuda'); step = t.plain_step(t.seeded_backbone(False, dev), t.synthetic_images(4096, dev), 128, True,
                                                 channels_last=True)
[step() for _ in range(3)]" > "$OUT/r/output_code.log" 2>&1
    grep -c -E "copy_|as_strided|convolution_backward" "$OUT/r/output_code.log"
  fi
  grep -E "b_over_a|host_ms|skipping cudagraphs" "$OUT/r/throughput_hostgap.log" | cut -c1-300
  if [ "${THEN_CONV:-0}" != 1 ]; then
    tar czf "$OUT/results.tgz" -C "$OUT" r; rm -rf "$OUT/r"
    exit 0
  fi
  BUDGET=$(( ${CALL_SECONDS:-585} - SECONDS - 45 ))
fi
if [ "$PHASE" = measure ]; then  # about 8 minutes; results land in benchmarks/results/ (copied into the tarball)
  fid_timing 170
  ddp_scaling 200
  throughput_c_d
  cp benchmarks/results/summary.json "$OUT/r/summary.json"
  tar czf "$OUT/results.tgz" -C "$OUT" r; tail -n 4 "$OUT"/r/*.log; rm -rf "$OUT/r"
  exit 0
fi
if [ "$PHASE" = ddp ]; then  # all GPUs idle while DDP is timed; convergence gets the rest of the call
  ddp_scaling 300
  tail -n 6 "$OUT/r/ddp.log"
  BUDGET=$(( ${CALL_SECONDS:-585} - SECONDS - 45 ))
fi
if [ "$PHASE" = single ]; then  # FID timing and throughput first, on the idle GPU; convergence gets the rest of the call
  GPUS=0
  timeout 200 python3 -m benchmarks.fid_speed --counts 5000 10000 --root .data --out "$OUT/r/fid_speed.json" > "$OUT/r/fid_speed.log" 2>&1
  throughput_c_d
  BUDGET=$(( ${CALL_SECONDS:-585} - SECONDS - 45 ))
  tail -n 3 "$OUT"/r/*.log
fi
timeout -k 5 ${LAUNCH_TIMEOUT:-$((BUDGET + 20))} python3 -m benchmarks.convergence launch --base "$BASE" --gpus $GPUS --per-gpu "$PER_GPU" --time-limit "$BUDGET" --jobs $JOBS \
  --eval-every "$EVERY" --final-samples "$FINAL" --root .data --out "$CONV" $LAUNCH_ARGS > "$OUT/r/conv.log" 2>&1
[ "$PHASE" = timing ] && fid_timing 150
python3 -m benchmarks.convergence report --out "$CONV" > "$OUT/r/report.log" 2>&1
cp benchmarks/results/summary.json "$OUT/r/summary.json"
tar czf "$OUT/results.tgz" -C "$OUT" r -C "$CONV" --exclude='*.ckpt' --exclude='hparams.yaml' . 2>/dev/null
grep -E "started|finished|failed" "$OUT/r/conv.log"; tail -n 2 "$CONV"/logs/*.log; cat "$OUT"/r/fid_speed_*.log 2>/dev/null | tail -8
rm -rf "$OUT/r"
python3 - "$CONV" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/result.json")):
    r = json.loads(p.read_text())
    print(p.parent.name, r["steps_done"], [(s, round(f, 2)) for s, f in r["fid_history"]], r.get("final"), r["parts"][-1])
PY
