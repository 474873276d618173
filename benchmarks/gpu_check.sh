#!/usr/bin/env bash
# The GPU check: one command for a session that is lent a GPU machine.
#
#   make gpu-wheels                          # here, once: wheels the machine lacks -> .whl/
#   benchmarks/gpu_check.sh                  # there: the whole check, at most 8 minutes
#   benchmarks/gpu_check.sh --quick          # there: the same, shorter (about 4 minutes)
#   benchmarks/gpu_check.sh --device cpu --quick   # anywhere: the CPU dry run (the suite runs it)
#
# It installs the carried wheels listed in .whl/MANIFEST.json (each checked against its
# sha256; any other wheel there stops it) into a fresh scratch folder on PYTHONPATH,
# then runs benchmarks/gpu_check.py, which runs each measurement and writes
# $OUT/gpu_check.json (or --out DIR). docs/BENCHMARKS.md says what it measures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
shopt -s nullglob
carried=${PEBR_GPU_WHEELS:-.whl}  # what `make gpu-wheels` filled
wheels=("$carried"/*.whl)
here=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
target=$(cat "$carried/PYTHON_VERSION" 2>/dev/null || echo "$here")
site=""
owned=""  # a scratch folder made here, removed at the end
cleanup() { if [[ -n "$owned" ]]; then rm -rf "$owned"; fi; }
trap cleanup EXIT
if ((${#wheels[@]})) && [[ "$target" != "$here" ]]; then
    echo "the carried wheels are for Python $target and this is $here: not installed"
elif ((${#wheels[@]})); then
    # only the wheels gpu_wheels.py recorded, unchanged since (exit 1 names any other)
    listed=$("$python" benchmarks/gpu_wheels.py --verify "$carried")
    mapfile -t verified <<<"$listed"
    if [[ -n "${PEBR_GPU_SITE:-}" ]]; then  # a folder of the caller's: it must be empty
        site=$PEBR_GPU_SITE
        if [[ -e "$site" && -n "$(ls -A "$site")" ]]; then
            echo "error: PEBR_GPU_SITE $site is not empty; give a new folder" >&2
            exit 1
        fi
        mkdir -p "$site"
    else  # a fresh folder each run: nothing left from an earlier one is imported
        site=$(mktemp -d "${TMPDIR:-/tmp}/pebr-gpu-site.XXXXXX")
        owned=$site
    fi
    echo "installing ${#verified[@]} carried wheels into $site"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "${verified[@]}"
    # Python runs these from any folder on its path at every start: no wheel of ours
    # has one, so one here was planted
    for hook in "$site"/sitecustomize.py "$site"/usercustomize.py "$site"/*.pth; do
        if [[ -e "$hook" ]]; then
            echo "error: a carried wheel installs $(basename "$hook"), which Python would run at start: refused" >&2
            exit 1
        fi
    done
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
    export PEBR_GPU_SITE="$site"
fi
"$python" benchmarks/gpu_check.py "$@"
