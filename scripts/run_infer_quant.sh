#!/usr/bin/env bash
# Evaluate a checkpoint (or an exported .onnx / .mindir model); the result line goes to ./val/infer.log.
# Options after the positional arguments go to eval.py (e.g. --parity_with model.onnx).
set -euo pipefail
usage() {
  cat <<USAGE
Usage: bash run_infer_quant.sh [Ascend|GPU|CPU] [DATASET_PATH] [CHECKPOINT_PATH] [eval.py options]
e.g.   bash run_infer_quant.sh CPU ~/imagenet/val/ ~/train/checkpoint/mobilenetV2_quant-60_1601.ckpt
USAGE
  exit 1
}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 3 ] || usage
case "$1" in Ascend|GPU|CPU) ;; *) echo "error: the first argument must be Ascend, GPU or CPU, got '$1'"; usage ;; esac
[ -d "$2" ] || { echo "error: dataset folder not found: $2"; usage; }
[ -f "$3" ] || { echo "error: checkpoint not found: $3"; usage; }
TARGET=$1 DATASET=$2 CKPT=$3; shift 3
mkdir -p val
python "$ROOT/eval.py" --device_target "$TARGET" --dataset_path "$DATASET" --checkpoint_path "$CKPT" "$@" \
  > val/infer.log 2>&1 || { tail -5 val/infer.log; exit 1; }
grep -E "^result:|^parity|agreement" val/infer.log
