#!/usr/bin/env bash
# An int8 .tflite model on an emulated ARM CPU (qemu-aarch64) against the same model on this x86 machine, both in
# LiteRT on XNNPACK, on a dataset's evaluation images: prints how many logits differ.
# The first run builds an arm64 Python in ARM_ROOT (default ~/.cache/mobilenetv2_quant/arm64) from Debian's own
# arm64 packages (it adds the arm64 architecture to apt: run as root, or with sudo) and PyPI's aarch64 wheels.
set -euo pipefail
usage() {
  cat <<USAGE
Usage: bash run_litert_arm.sh MODEL.tflite DATASET_PATH [OUT_DIR]
e.g.   bash run_litert_arm.sh demo_run/mobilenetv2_demo_int8.tflite demo_run/data/val arm_parity
USAGE
  exit 1
}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || usage
[ -f "$1" ] || { echo "error: model not found: $1"; usage; }
[ -d "$2" ] || { echo "error: dataset folder not found: $2"; usage; }
MODEL=$(realpath "$1") DATASET=$(realpath "$2") OUT=$(realpath -m "${3:-arm_parity}")
ARM=${ARM_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mobilenetv2_quant/arm64}
command -v qemu-aarch64 >/dev/null || { echo "error: qemu-aarch64 not found: install Debian's qemu-user (apt-get install qemu-user)"; exit 1; }

if [ ! -x "$ARM/root/usr/bin/python3.11" ] || [ ! -d "$ARM/site/ai_edge_litert" ]; then
  echo "building an arm64 Python 3.11 with LiteRT in $ARM"
  mkdir -p "$ARM/debs" "$ARM/root" "$ARM/wheels" "$ARM/site"
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -qq; }
  (cd "$ARM/debs" && apt-get download -qq libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 python3.11-minimal:arm64 \
    libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 \
    libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libcrypt1:arm64 libuuid1:arm64 2>/dev/null)
  for deb in "$ARM"/debs/*.deb; do dpkg -x "$deb" "$ARM/root"; done
  # LiteRT 1.4.0: its 2.x aarch64 wheels crash under qemu-user 7.2 (segmentation fault on the first inference).
  python -m pip download -q -d "$ARM/wheels" --python-version 3.11 --only-binary=:all: \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 "numpy<2" "ai-edge-litert==1.4.0"
  for wheel in "$ARM"/wheels/*.whl; do python -m zipfile -e "$wheel" "$ARM/site"; done
fi

cd "$ROOT"
python -m src.targets.arm_parity prepare "$MODEL" "$DATASET" "$OUT"
PYTHONPATH="$ARM/site" qemu-aarch64 -L "$ARM/root" "$ARM/root/usr/bin/python3.11" src/targets/litert_run.py \
  "$MODEL" "$OUT/inputs.npy" "$OUT/arm.npy"
python -m src.targets.arm_parity compare "$OUT"
