#!/usr/bin/env bash
# The GPU check: one command for a session that is lent a GPU machine.
#
#   make gpu-wheels                          # here, once: wheels the machine lacks -> .whl/
#   benchmarks/gpu_check.sh                  # there: the whole check, at most 8 minutes
#   benchmarks/gpu_check.sh --quick          # there: the same, shorter (about 4 minutes)
#   benchmarks/gpu_check.sh --device cpu --quick   # anywhere: the CPU dry run (the suite runs it)
#
# It installs the carried wheels (if .whl/ holds any) into a scratch folder on
# PYTHONPATH, then runs benchmarks/gpu_check.py, which runs each measurement and
# writes $OUT/gpu_check.json (or --out DIR). docs/BENCHMARKS.md says what it measures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
site=${PEBR_GPU_SITE:-/tmp/pebr-gpu-site}
shopt -s nullglob
carried=${PEBR_GPU_WHEELS:-.whl}  # what `make gpu-wheels` filled
wheels=("$carried"/*.whl)
here=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
target=$(cat "$carried/PYTHON_VERSION" 2>/dev/null || echo "$here")
if ((${#wheels[@]})) && [[ "$target" != "$here" ]]; then
    echo "the carried wheels are for Python $target and this is $here: not installed"
elif ((${#wheels[@]})); then
    echo "installing ${#wheels[@]} carried wheels into $site"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
    export PEBR_GPU_SITE="$site"
fi
exec "$python" benchmarks/gpu_check.py "$@"
