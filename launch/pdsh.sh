#!/usr/bin/env bash
# Many nodes over ssh with DeepSpeed's default pdsh launcher: deepspeed --hostfile H ...
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: launch/pdsh.sh --master_addr ADDR [--hostfile H] [--master_port P] [--ssh_port S]
                      [--world_size W] [--skip_ssh_check] [-- TRAIN_ARGS...]

Run on one node; DeepSpeed starts every node's ranks through pdsh over passwordless ssh.
Example:
  launch/pdsh.sh --hostfile launch/hostfile --master_addr 10.0.0.1 --world_size 16 \\
      -- --deepspeed_config ds_configs/zero2.json --model_size tiny

  --hostfile H      DeepSpeed hostfile (default launch/hostfile)
  --master_addr A   address of the hostfile's first host as the other nodes reach it
  --master_port P   rendezvous port (default \$MASTER_PORT or 29500)
  --ssh_port S      sshd port on the nodes (default: ssh's own default)
  --world_size W    fail early unless the hostfile's slots add up to W
  --skip_ssh_check  do not ssh to every host before launching
Remote nodes get PATH, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR, DEEPSPEED_TIMEOUT from this node,
then the lines of ~/.deepspeed_env and ./.deepspeed_env. Extra ssh options: PDSH_SSH_ARGS_APPEND.
Environment: PYTHON, TRAIN_SCRIPT (default train.py).
USAGE
}

# Defaults of the options below; parse_options sets those given.
hostfile="$LAUNCH_DIR/hostfile" master_addr="" ssh_port="" world_size="" skip_ssh_check="" \
  master_port="${MASTER_PORT:-29500}"
parse_options --hostfile=hostfile --master_addr=master_addr --master_port=master_port \
  --ssh_port=ssh_port --world_size=world_size --skip_ssh_check=skip_ssh_check:flag -- "$@"
set -- "${TRAIN_ARGS[@]}"
require --master_addr "$master_addr"

# DeepSpeed pastes the working directory, the script path and the arguments into the remote
# shell command (arguments with spaces in double quotes, others bare), and pdsh replaces %h, %n,
# %u in it: refuse anything that would be re-interpreted on the way.
for word in "$PWD" "$TRAIN_SCRIPT"; do
  [[ "$word" =~ ^[A-Za-z0-9_@+=:,./-]+$ ]] || die "path '$word' has characters pdsh's remote shell would re-interpret; use a plain path"
done
for arg in "$@"; do
  [[ "$arg" =~ ^[A-Za-z0-9_@+=:,./\ -]*$ ]] || die "argument '$arg' has characters pdsh's remote shell would re-interpret"
done

job_dir="$(mktemp -d "${TMPDIR:-/tmp}/marjara-launch.XXXXXX")"
trap 'rm -rf "$job_dir"' EXIT
DS_ENV_FILE="$(write_job_env "$job_dir")"
export DS_ENV_FILE

checks=(--launcher pdsh --hostfile "$hostfile" --env_file "$DS_ENV_FILE" --master_addr "$master_addr")
[[ -n "$ssh_port" ]] && checks+=(--ssh_port "$ssh_port")
[[ -n "$world_size" ]] && checks+=(--world_size "$world_size")
[[ -n "$skip_ssh_check" ]] && checks+=(--skip_ssh)
marjara_module marjara.preflight "${checks[@]}"

# The pre-flight check above already tried ssh with PDSH_SSH_ARGS_APPEND, which DeepSpeed's
# own check ignores.
cmd=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port" --no_ssh_check)
[[ -n "$ssh_port" ]] && cmd+=(--ssh_port "$ssh_port")
run_child "${cmd[@]}" "$TRAIN_SCRIPT" "$@"
