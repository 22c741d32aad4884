#!/usr/bin/env bash
# Multi-node without DeepSpeed's launcher: torchrun --nnodes N --node_rank R --rdzv_* train.py ...
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: launch/torchrun.sh --nnodes N --nproc_per_node G --master_addr ADDR [--node_rank R]
                          [--master_port P] [--rdzv_backend static|c10d] [--rdzv_id ID]
                          [-- TRAIN_ARGS...]

Run once on every node. With the static rendezvous (default) node R gets global ranks
R*G .. R*G+G-1 and needs --node_rank; with c10d, torchrun assigns node ranks itself (elastic).
All nodes meet at ADDR:P. Example, on the second of two 8-GPU nodes:
  launch/torchrun.sh --nnodes 2 --nproc_per_node 8 --node_rank 1 --master_addr 10.0.0.1 \\
      -- --deepspeed_config ds_configs/zero2.json --model_size tiny

  --nnodes N          number of nodes
  --nproc_per_node G  ranks per node
  --node_rank R       this node's rank, from 0 (static rendezvous only)
  --master_addr A     address of node 0 (the rendezvous endpoint)
  --master_port P     rendezvous port (default \$MASTER_PORT or 29500)
  --rdzv_backend B    static (default) or c10d
  --rdzv_id ID        job id shared by all nodes (c10d; default \$SLURM_JOB_ID or marjara)
Environment: PYTHON, TRAIN_SCRIPT (default train.py), TORCH_EXTENSIONS_DIR.
USAGE
}

# Defaults of the options below; parse_options sets those given.
nnodes="" nproc="" node_rank="" master_addr="" backend="static" rdzv_id="${SLURM_JOB_ID:-marjara}" \
  master_port="${MASTER_PORT:-29500}"
parse_options --nnodes=nnodes --nproc_per_node=nproc --node_rank=node_rank \
  --master_addr=master_addr --master_port=master_port --rdzv_backend=backend --rdzv_id=rdzv_id -- \
  "$@"
set -- "${TRAIN_ARGS[@]}"
require --nnodes "$nnodes"
require --nproc_per_node "$nproc"
require --master_addr "$master_addr"

cmd=(torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend "$backend"
  --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "$rdzv_id")
case "$backend" in
  static)
    require --node_rank "$node_rank"
    cmd+=(--node_rank "$node_rank") ;;
  c10d) ;;
  *) die "--rdzv_backend must be static or c10d, not '$backend'" ;;
esac
exec "${cmd[@]}" "$TRAIN_SCRIPT" "$@"
