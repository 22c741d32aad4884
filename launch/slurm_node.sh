#!/usr/bin/env bash
# One SLURM task per node (started by launch/slurm.sbatch): derive hostfile, master and node
# rank from SLURM's environment, then run launch/no_ssh.sh with TRAIN_ARGS.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  echo "usage: srun --ntasks-per-node=1 launch/slurm_node.sh [TRAIN_ARGS...]  (see launch/slurm.sbatch)"
  exit 0
fi
for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NODEID; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run this under srun inside a SLURM job"
done

# Every node writes the same hostfile locally, so no shared filesystem is needed for it.
hostfile="${TMPDIR:-/tmp}/marjara-hostfile.$SLURM_JOB_ID.$SLURM_NODEID"
slots=()
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  slots=(--slots "$GPUS_PER_NODE")
fi
master_addr="$(marjara_module marjara.launch.hostfile --from-slurm --out "$hostfile" "${slots[@]}")"
# The same port on every node, different for jobs that share a node.
master_port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

exec "$LAUNCH_DIR/no_ssh.sh" --hostfile "$hostfile" --node_rank "$SLURM_NODEID" \
  --master_addr "$master_addr" --master_port "$master_port" -- "$@"
