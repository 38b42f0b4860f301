#!/usr/bin/env bash
# GPU check of the MuDeNet paths, bounded to about 8 minutes on one modern GPU (H100/H200 class):
#   1. throughput (benchmarks/throughput.py), paper profile at 256 px: fp32 and fp16 autocast, inference at
#      batch 1 / 16 and stage-2 training steps, plus torch.compile'd inference (--compile);
#   2. 200 paper-profile stage-2 training steps on a generated `plate` category, with the loss curve;
#   3. a table of everything measured.
# Without a GPU it runs the same steps on the CPU at tiny sizes (smoke profile, 64 px, a few steps), so the
# script itself is exercised anywhere:   bash benchmarks/gpu_check.sh [--cpu] [--dry-run]
# Rows are appended to results/benchmarks/{throughput,loss_curve}_<device>.csv (not with --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DRY=""
FORCE_CPU=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY="--dry-run" ;;
    --cpu) FORCE_CPU=1 ;;
    *) echo "usage: $0 [--cpu] [--dry-run]" >&2; exit 2 ;;
  esac
done
if [ "$FORCE_CPU" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda; CONFIG=paper; SIZE=256; REPEATS=20; TRAIN_STEPS=10; CURVE_STEPS=200; COMPILE="--compile"
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
else
  DEVICE=cpu; CONFIG=smoke; SIZE=64; REPEATS=1; TRAIN_STEPS=1; CURVE_STEPS=5; COMPILE=""
  echo "no GPU (or --cpu): CPU fallback at tiny sizes (smoke profile, ${SIZE} px)"
fi
START=$(date +%s)
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

echo "== 1/2 throughput: ${CONFIG} profile, ${SIZE} px, ${DEVICE}"
timeout 300 "$PY" benchmarks/throughput.py --devices "$DEVICE" --configs "$CONFIG" --image-size "$SIZE" \
  --dtypes fp32 amp --repeats "$REPEATS" --train-steps "$TRAIN_STEPS" $COMPILE $DRY | tee "$LOG/throughput.txt"

echo "== 2/2 ${CURVE_STEPS} stage-2 training steps, ${CONFIG} profile, generated plate category, ${DEVICE}"
timeout 180 "$PY" benchmarks/throughput.py --devices "$DEVICE" --configs "$CONFIG" --image-size "$SIZE" \
  --loss-curve "$CURVE_STEPS" $DRY | tee "$LOG/curve.txt"

echo "== summary (${DEVICE}, $(( $(date +%s) - START )) s)"
grep -E "^ *${CONFIG} +${DEVICE} " "$LOG/throughput.txt" | sed 's/^ */  /' || true
grep -E "steps in" "$LOG/curve.txt" | sed 's/^/  /'
