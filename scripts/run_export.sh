#!/usr/bin/env bash
# Export a checkpoint: bash run_export.sh [CHECKPOINT_PATH] [MINDIR|AIR|ONNX] [FILE_NAME](optional) [export.py options]
set -euo pipefail
usage() {
  echo "Usage: bash run_export.sh [CHECKPOINT_PATH] [MINDIR|AIR|ONNX] [FILE_NAME](optional) [export.py options]"
  exit 1
}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || usage
[ -f "$1" ] || { echo "error: checkpoint not found: $1"; usage; }
case "$2" in MINDIR|AIR|ONNX) ;; *) echo "error: the format must be MINDIR, AIR or ONNX, got '$2'"; usage ;; esac
CKPT=$1 FORMAT=$2; shift 2
NAME=mobilenetv2_quant
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then NAME=$1; shift; fi
python "$ROOT/export.py" --ckpt_file "$CKPT" --file_format "$FORMAT" --file_name "$NAME" "$@"
