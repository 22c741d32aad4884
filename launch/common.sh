# shellcheck shell=bash
# Sourced by the launch scripts: strict mode, argument helpers, and the settings every node shares.
# Not meant to be run on its own.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"
PYTHON="${PYTHON:-python}"
# Another entry point may be launched the same way (the tests launch a small probe script).
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$REPO_DIR/train.py}"
# TORCH_EXTENSIONS_DIR (DeepSpeed's JIT-built ops) is left as the user set it, and handed on to
# remote ranks as it is: a rank that sees another directory, or another ninja on PATH, rebuilds.
# Giving it a default here would move torch's own default (~/.cache/torch_extensions/py311_cpu).

die() {
  echo "error: $*" >&2
  exit 2
}

# usage: value_of OPTION "$@" -- prints the option's value or dies when it is missing. A value
# that looks like one of our options (`--hostfile --master_addr A`) means the value was left out.
value_of() {
  [[ $# -ge 2 && -n "$2" && "$2" != "--" && ! "$2" =~ ^--[a-z_]+$ ]] || die "$1 needs a value (see --help)"
  printf '%s' "$2"
}

# The same for options whose value may itself be an option string (--launcher_args "--bind-to none").
raw_value_of() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
  printf '%s' "$2"
}

# usage: parse_options SPEC... -- "$@"
# The one argument loop of the launch scripts. Each SPEC declares an option the script accepts:
#   --name=variable        takes a value (value_of's checks), stored in $variable
#   --name=variable:raw    takes a value that may itself look like options (raw_value_of)
#   --name=variable:flag   takes none, sets $variable to 1
# -h/--help prints the script's usage() and exits 0; an unknown option stops with one line.
# What follows the arguments' own -- (train.py's arguments) is left in the array TRAIN_ARGS.
# shellcheck disable=SC2034  # TRAIN_ARGS is for the sourcing script to read
parse_options() {
  local -A variable_of=() kind_of=()
  local spec name target value
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    spec="$1"
    name="${spec%%=*}"
    target="${spec#*=}"
    variable_of[$name]="${target%%:*}"
    kind_of[$name]="value"
    [[ "$target" == *:* ]] && kind_of[$name]="${target#*:}"
    shift
  done
  shift  # the -- between the declarations and the arguments
  TRAIN_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --) shift; TRAIN_ARGS=("$@"); return 0 ;;
    esac
    [[ -n "$1" && -n "${variable_of[$1]:-}" ]] || die "unknown option $1 (train.py arguments go after --)"
    case "${kind_of[$1]}" in
      flag) printf -v "${variable_of[$1]}" '%s' 1; shift; continue ;;
      raw) value="$(raw_value_of "$@")" ;;
      *) value="$(value_of "$@")" ;;
    esac
    printf -v "${variable_of[$1]}" '%s' "$value"
    shift 2
  done
}

require() {
  [[ -n "$2" ]] || die "$1 is required (see --help)"
}

# Run one of this repository's Python modules whether or not the package is installed.
marjara_module() {
  PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m "$@"
}

# Quote words for a launcher option that DeepSpeed splits with shlex (--launcher_args).
shell_join() {
  "$PYTHON" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"
}

# Run a command as a child and pass TERM/INT on to it, so that the caller's EXIT trap still runs
# and DeepSpeed's runner gets the signal it needs to stop the ranks on the other nodes.
run_child() {
  local child status=0
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
  wait "$child" || status=$?
  while kill -0 "$child" 2>/dev/null; do  # wait returned early for a trapped signal
    status=0
    wait "$child" || status=$?
  done
  trap - TERM INT
  return "$status"
}

# DeepSpeed's ssh-based launchers give remote ranks only PYTHON* variables and those listed in
# .deepspeed_env. Write one env file for this job into directory $1: first the variables every
# node must share, then the user's own ~/.deepspeed_env and ./.deepspeed_env (or DS_ENV_FILE),
# whose lines win. Prints the file's path; the caller exports DS_ENV_FILE with it.
write_job_env() {
  local out="$1/deepspeed_env" name="${DS_ENV_FILE:-.deepspeed_env}" var file
  local -a user_files=("$HOME/$name" "./$name")
  if [[ "$name" == /* ]]; then
    user_files=("$name")
  fi
  : >"$out"
  for var in PATH TORCH_EXTENSIONS_DIR DS_ACCELERATOR DEEPSPEED_TIMEOUT; do
    if [[ -n "${!var:-}" ]]; then
      printf '%s=%s\n' "$var" "${!var}" >>"$out"
    fi
  done
  for file in "${user_files[@]}"; do
    if [[ -f "$file" ]]; then
      # DeepSpeed's reader takes every line as KEY=VALUE: drop comments and blank lines.
      grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$file" >>"$out" || true
    fi
  done
  printf '%s' "$out"
}
