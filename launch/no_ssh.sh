#!/usr/bin/env bash
# One launcher per node, no ssh: deepspeed --hostfile H --no_ssh --node_rank R ...
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: launch/no_ssh.sh --node_rank R --master_addr ADDR [--hostfile H] [--master_port P]
                        [-- TRAIN_ARGS...]

Run this once on every node (by hand, or from a scheduler that starts one process per node).
Node R starts the hostfile's slots for its line R; all nodes meet at ADDR:P, the address of
node 0 as the other nodes reach it. Nothing is done over ssh. Example, on the second node:
  launch/no_ssh.sh --hostfile launch/hostfile --node_rank 1 --master_addr 10.0.0.1 \\
      -- --deepspeed_config ds_configs/zero2.json --model_size tiny

  --hostfile H      DeepSpeed hostfile (default launch/hostfile), the same on every node
  --node_rank R     this node's line in the hostfile, from 0
  --master_addr A   address of node 0
  --master_port P   rendezvous port (default \$MASTER_PORT or 29500), the same on every node
Environment: PYTHON, TRAIN_SCRIPT (default train.py), TORCH_EXTENSIONS_DIR.
USAGE
}

# Defaults of the options below; parse_options sets those given.
hostfile="$LAUNCH_DIR/hostfile" node_rank="" master_addr="" master_port="${MASTER_PORT:-29500}"
parse_options --hostfile=hostfile --node_rank=node_rank --master_addr=master_addr \
  --master_port=master_port -- "$@"
set -- "${TRAIN_ARGS[@]}"
require --node_rank "$node_rank"
require --master_addr "$master_addr"

marjara_module marjara.preflight --launcher no_ssh --hostfile "$hostfile" \
  --node_rank "$node_rank" --master_addr "$master_addr"
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
  --master_addr "$master_addr" --master_port "$master_port" "$TRAIN_SCRIPT" "$@"
