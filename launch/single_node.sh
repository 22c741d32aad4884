#!/usr/bin/env bash
# One node, N ranks: deepspeed --num_gpus N train.py ...
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: launch/single_node.sh [--gpus N] [--master_port P] [-- TRAIN_ARGS...]

Starts N ranks on this machine with DeepSpeed's launcher (all GPUs when --gpus is not given).
Everything after -- goes to train.py unchanged, e.g.
  launch/single_node.sh --gpus 8 -- --deepspeed_config ds_configs/zero2.json --model_size tiny

  --gpus N          ranks to start (DeepSpeed's --num_gpus)
  --master_port P   rendezvous port on 127.0.0.1 (default \$MASTER_PORT or 29500)
Environment: PYTHON, TRAIN_SCRIPT (default train.py), TORCH_EXTENSIONS_DIR.
USAGE
}

# Defaults of the options below; parse_options sets those given.
gpus="" master_port="${MASTER_PORT:-29500}"
parse_options --gpus=gpus --master_port=master_port -- "$@"
set -- "${TRAIN_ARGS[@]}"

cmd=(deepspeed --master_port "$master_port")
if [[ -n "$gpus" ]]; then
  cmd+=(--num_gpus "$gpus")
fi
exec "${cmd[@]}" "$TRAIN_SCRIPT" "$@"
