#!/usr/bin/env bash
# Many nodes through MPI: deepspeed --launcher openmpi|mpich --hostfile H ...
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: launch/mpi.sh --launcher openmpi|mpich --master_addr ADDR [--hostfile H] [--master_port P]
                     [--ssh_port S] [--world_size W] [--launcher_args "ARGS"] [--skip_ssh_check]
                     [-- TRAIN_ARGS...]

Run on one node; DeepSpeed hands the job to mpirun, which starts the ranks on every node.
Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set explicitly
(launch/mpi_env.sh for Open MPI, DeepSpeed's launcher_helper for MPICH) instead of relying on
mpi4py discovery, which guesses the master address from \`hostname -I\`. Example:
  launch/mpi.sh --launcher openmpi --hostfile launch/hostfile --master_addr 10.0.0.1 \\
      --launcher_args "--mca btl_tcp_if_include eth0" -- --deepspeed_config ds_configs/zero2.json

  --launcher L       openmpi or mpich (MPICH's mpirun must come first on PATH)
  --hostfile H       DeepSpeed hostfile (default launch/hostfile); mpich needs equal slots
  --master_addr A    address of the hostfile's first host as the other nodes reach it
  --master_port P    rendezvous port (default \$MASTER_PORT or 29500)
  --ssh_port S       sshd port on the nodes (Open MPI: added to plm_rsh_args)
  --world_size W     fail early unless the hostfile's slots add up to W
  --launcher_args A  extra mpirun options, one string (Open MPI default: --bind-to none)
  --skip_ssh_check   do not ssh to every host before launching
Remote ranks get PATH, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR, DEEPSPEED_TIMEOUT from this node,
then the lines of ~/.deepspeed_env and ./.deepspeed_env. Open MPI's ssh also gets the options in
PDSH_SSH_ARGS_APPEND. Running as root needs --allow-run-as-root in --launcher_args.
Environment: PYTHON, TRAIN_SCRIPT (default train.py).
USAGE
}

# Defaults of the options below; parse_options sets those given.
launcher="" hostfile="$LAUNCH_DIR/hostfile" master_addr="" ssh_port="" world_size="" \
  user_launcher_args="" skip_ssh_check="" master_port="${MASTER_PORT:-29500}"
parse_options --launcher=launcher --hostfile=hostfile --master_addr=master_addr \
  --master_port=master_port --ssh_port=ssh_port --world_size=world_size \
  --launcher_args=user_launcher_args:raw --skip_ssh_check=skip_ssh_check:flag -- "$@"
set -- "${TRAIN_ARGS[@]}"
require --launcher "$launcher"
require --master_addr "$master_addr"
[[ "$launcher" == openmpi || "$launcher" == mpich ]] || die "--launcher must be openmpi or mpich, not '$launcher'"

job_dir="$(mktemp -d "${TMPDIR:-/tmp}/marjara-launch.XXXXXX")"
trap 'rm -rf "$job_dir"' EXIT
DS_ENV_FILE="$(write_job_env "$job_dir")"
export DS_ENV_FILE

checks=(--launcher "$launcher" --hostfile "$hostfile" --env_file "$DS_ENV_FILE" --master_addr "$master_addr")
[[ -n "$ssh_port" ]] && checks+=(--ssh_port "$ssh_port")
[[ -n "$world_size" ]] && checks+=(--world_size "$world_size")
[[ -n "$skip_ssh_check" ]] && checks+=(--skip_ssh)
marjara_module marjara.preflight "${checks[@]}"

# --force_multi: with a one-host hostfile DeepSpeed would otherwise drop --launcher and start the
# ranks itself, without mpirun, and mpi_env.sh would find no MPI rank variables.
cmd=(deepspeed --launcher "$launcher" --hostfile "$hostfile" --force_multi
  --master_addr "$master_addr" --master_port "$master_port" --no_ssh_check)
if [[ "$launcher" == openmpi ]]; then
  # DeepSpeed's Open MPI runner sets no rank variables: mpi_env.sh maps Open MPI's own.
  mpi_args=(-x "MASTER_ADDR=$master_addr" -x "MASTER_PORT=$master_port")
  rsh_args="${PDSH_SSH_ARGS_APPEND:-}${ssh_port:+ -p $ssh_port}"
  [[ -n "$rsh_args" ]] && mpi_args+=(--mca plm_rsh_args "$rsh_args")
  [[ "$user_launcher_args" == *--bind-to* ]] || mpi_args+=(--bind-to none)  # one core per rank starves torch's threads
  # The = form: argparse would take a value starting with '-' for an option.
  cmd+=("--launcher_args=$(shell_join "${mpi_args[@]}") $user_launcher_args")
  python_path="$(command -v "$PYTHON")" || die "$PYTHON not found on PATH"
  cmd+=(--no_python "$LAUNCH_DIR/mpi_env.sh" "$python_path")
else
  # DeepSpeed's MPICH runner passes MASTER_*/WORLD_SIZE and maps PMI ranks itself.
  [[ -n "$user_launcher_args" ]] && cmd+=("--launcher_args=$user_launcher_args")
fi
run_child "${cmd[@]}" "$TRAIN_SCRIPT" "$@"
