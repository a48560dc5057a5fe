#!/usr/bin/env bash
# Train (QAT from PRETRAINED_CKPT_PATH by default) on one or more devices, launched with msrun.
# Outputs: ./train/checkpoint/ (written by rank 0), per-rank logs ./train/log/worker_<rank>.log
# (./train/train.log for a single process). Options after the positional arguments go to train.py,
# e.g. bash run_train.sh CPU 2 ~/data/train ~/float.ckpt --epoch_size 10 --batch_size 64
set -euo pipefail

usage() {
  cat <<USAGE
Usage:
  bash run_train.sh [Ascend] [RANK_TABLE_FILE] [DATASET_PATH] [PRETRAINED_CKPT_PATH](optional) [train.py options]
  bash run_train.sh [GPU] [DEVICE_ID_LIST] [DATASET_PATH] [PRETRAINED_CKPT_PATH](optional) [train.py options]
  bash run_train.sh [CPU] [WORKER_NUM](optional) [DATASET_PATH] [PRETRAINED_CKPT_PATH](optional) [train.py options]
e.g.
  bash run_train.sh Ascend ~/hccl_8p.json ~/imagenet/train/ ~/mobilenetV2_float.ckpt
  bash run_train.sh GPU 0,1,2,3 ~/imagenet/train/ ~/mobilenetV2_float.ckpt
  bash run_train.sh CPU 2 ~/imagenet/train/ ~/mobilenetV2_float.ckpt
Several machines (nodes): run the same command on each, with NODE_NUM (nodes), NODE_RANK (this node, 0 to
NODE_NUM - 1), MASTER_ADDR (node 0's address) and MASTER_PORT (default 8118) set, and CLUSTER_TIMEOUT (seconds
the nodes wait for each other, default 600) if need be; DEVICE_ID_LIST and WORKER_NUM are this node's, an Ascend
RANK_TABLE_FILE spans all servers (this node runs its share of its devices):
  NODE_NUM=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_train.sh GPU 0,1,2,3,4,5,6,7 ~/imagenet/train/ ~/float.ckpt
  NODE_NUM=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash run_train.sh GPU 0,1,2,3,4,5,6,7 ~/imagenet/train/ ~/float.ckpt
A failed rank ends the whole job (the others are stopped); the same command with --resume latest continues from
the newest checkpoint.
USAGE
  exit 1
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || usage
TARGET=$1; shift
case "$TARGET" in
  Ascend)
    [ $# -ge 2 ] || usage
    RANK_TABLE=$(realpath "$1"); shift
    [ -f "$RANK_TABLE" ] || { echo "error: rank table not found: $RANK_TABLE"; usage; }
    WORKERS=$(( $(grep -c '"device_id"' "$RANK_TABLE") / ${NODE_NUM:-1} ))  # the table lists every server's
    LAUNCH_EXTRA=(--rank_table_file "$RANK_TABLE")
    ;;
  GPU)
    [ $# -ge 2 ] || usage
    [[ "$1" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: DEVICE_ID_LIST must look like 0,1,2,3, got '$1'"; usage; }
    export CUDA_VISIBLE_DEVICES=$1; shift
    WORKERS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | wc -l)
    LAUNCH_EXTRA=()
    ;;
  CPU)
    WORKERS=1
    if [[ "$1" =~ ^[0-9]+$ ]]; then WORKERS=$1; shift; fi
    [ "$WORKERS" -ge 1 ] || { echo "error: WORKER_NUM must be at least 1"; usage; }
    LAUNCH_EXTRA=()
    ;;
  *)
    echo "error: the first argument must be Ascend, GPU or CPU, got '$TARGET'"; usage ;;
esac
[ $# -ge 1 ] || usage
DATASET=$(realpath "$1"); shift
[ -d "$DATASET" ] || { echo "error: dataset folder not found: $DATASET"; usage; }
ARGS=(--device_target "$TARGET" --dataset_path "$DATASET" --save_checkpoint_path "$PWD/train/checkpoint")
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
  CKPT=$(realpath "$1"); shift
  [ -f "$CKPT" ] || { echo "error: pre-trained checkpoint not found: $CKPT"; usage; }
  ARGS+=(--pre_trained "$CKPT")
fi

mkdir -p train
NODE_NUM=${NODE_NUM:-1}
[[ "$NODE_NUM" =~ ^[1-9][0-9]*$ ]] || { echo "error: NODE_NUM must be a positive number, got '$NODE_NUM'"; usage; }
if [ "$NODE_NUM" -gt 1 ]; then
  [ -n "${NODE_RANK:-}" ] && [ -n "${MASTER_ADDR:-}" ] || { echo "error: NODE_NUM=$NODE_NUM needs NODE_RANK and MASTER_ADDR"; usage; }
  LAUNCH_EXTRA+=(--local_worker_num "$WORKERS" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
LAUNCH_EXTRA+=(--master_port "${MASTER_PORT:-8118}")
[ -z "${CLUSTER_TIMEOUT:-}" ] || LAUNCH_EXTRA+=(--cluster_timeout "$CLUSTER_TIMEOUT")
failed() {  # src/launch.py's account of the failed ranks (from its first "error:" line), else the log's end
  echo "training failed; the end of $1:"
  if grep -q "^error: " "$1"; then sed -n '/^error: /,$p' "$1"; else tail -n 4 "$1"; fi
  exit 1
}
if [ "$WORKERS" -eq 1 ] && [ "$NODE_NUM" -eq 1 ]; then
  echo "training on 1 $TARGET process; log: $PWD/train/train.log"
  python "$ROOT/train.py" "${ARGS[@]}" "$@" > train/train.log 2>&1 || failed "$PWD/train/train.log"
else
  echo "training on $WORKERS $TARGET processes of $((WORKERS * NODE_NUM)); logs: $PWD/train/log/worker_<rank>.log"
  python "$ROOT/src/launch.py" --worker_num "$((WORKERS * NODE_NUM))" --log_dir "$PWD/train/log" "${LAUNCH_EXTRA[@]}" \
    "$ROOT/train.py" --run_distribute True "${ARGS[@]}" "$@" > train/launch.log 2>&1 || failed "$PWD/train/launch.log"
fi
echo "checkpoints: $PWD/train/checkpoint"
