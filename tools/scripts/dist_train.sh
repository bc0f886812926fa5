#!/usr/bin/env bash
# Multi-process training with torchrun (OpenPCDet's script uses torch.distributed.launch, which on
# torch 2.x passes --local-rank and ignores --tcp_port). Backend: nccl with CUDA, gloo on CPU.
#   bash scripts/dist_train.sh NUM_PROCS --cfg_file cfgs/... [train.py flags]
# Port: --tcp_port P (default 18888), or MASTER_PORT. Runs from any folder (cfgs/ paths resolve
# against this repository).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
    echo "usage: $0 NUM_PROCS --cfg_file CFG [train.py flags]" >&2
    exit 2
fi
NGPUS=$1
shift
PORT=${MASTER_PORT:-18888}
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    if [ "${ARGS[$i]}" = "--tcp_port" ] && [ $((i + 1)) -lt ${#ARGS[@]} ]; then
        PORT=${ARGS[$((i + 1))]}
    fi
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRAIN=${TRAIN_SCRIPT:-$HERE/../train.py}
# One process checks the config, dataset files and checkpoints first: a mistake is one line here,
# not one traceback per rank plus torchrun's ChildFailedError.
python "$TRAIN" --preflight_only "$@" || exit $?
exec torchrun --nproc_per_node="$NGPUS" --master_addr=127.0.0.1 --master_port="$PORT" \
    "$TRAIN" --launcher pytorch "$@"
