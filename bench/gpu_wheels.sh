#!/usr/bin/env bash
# Fetch the wheels bench/gpu_run.sh installs on the lent GPU machine (bench/gpu_wheels.txt) into
# .whl/ (git-ignored; name it in the run tool's `carry`). Run here, where pip reaches a registry:
#     bash bench/gpu_wheels.sh
# DeepSpeed is published as source only: it is built here into a pure-Python wheel with no ops
# compiled (DeepSpeed compiles an op on first use if it ever needs one; MARJARA's runs need none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIST=bench/gpu_wheels.txt
mkdir -p .whl
pins=$(grep -v '^\s*#' "$LIST" | grep -v '^\s*$')
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
for pin in $pins; do
    if [ "${pin%%==*}" = deepspeed ]; then
        DS_BUILD_OPS=0 DS_ACCELERATOR=cpu timeout 600 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$pin"
    else
        # shellcheck disable=SC2086
        timeout 300 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            $platforms -d .whl "$pin"
    fi
done
# One version of each: two stop the install there.
names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
dupes=$(echo "$names" | uniq -d)
if [ -n "$dupes" ]; then
    echo "error: .whl/ holds more than one version of: $dupes; remove the extra ones (rm .whl/NAME-VERSION*.whl)" >&2
    exit 2
fi
echo "$(ls .whl/*.whl | wc -l) wheels in .whl/, $(du -sh .whl | cut -f1) (the call carries at most 64 MiB with the tree):"
ls -1 .whl
