#!/usr/bin/env bash
# What a GPU machine with no network runs, from the repository root with .gpu_carry/ (scripts/gpu_carry.sh) beside
# it: installs the carried wheels next to the image's torch and CuPy, then runs benchmarks/bench_gpu.py (cnnrun
# against hand-written loops, bf16 vs fp32) and benchmarks/gpu_check.sh without its training grid, each under a
# time limit so that the whole ends within about 9 minutes.
#
#   bash scripts/gpu_run.sh
#
# Logs and figures go to $OUT (default ./gpu_out): gpu_run.log (this script), bench_gpu.log, bench_gpu.json,
# gpu_check.log. For a dry run elsewhere: PYTHON (the interpreter holding torch), EXTRA_WHEELS (another folder of
# wheels, e.g. the same versions for another Python), BENCH_ARGS (e.g. "--device cpu --images 300 --rounds 1"),
# SKIP_GPU_CHECK=1.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/gpu_out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/cnnrun_site}
DATA=${DATA:-/tmp/cnnrun_data}
BENCH_LIMIT=${BENCH_LIMIT:-285}  # seconds: bench_gpu needs about 4 minutes on an H200
CHECK_LIMIT=${CHECK_LIMIT:-230}
CARRY=$REPO/.gpu_carry
mkdir -p "$OUT"
LOG=$OUT/gpu_run.log
export PYTHONUNBUFFERED=1 COLUMNS=150
say() { echo "$@" | tee -a "$LOG"; }

say "== $(date -u +%FT%TZ) $(nvidia-smi -L 2>&1 | head -1); $("$PYTHON" --version 2>&1)"
[ -d "$CARRY/wheels" ] || { say "no $CARRY/wheels: run scripts/gpu_carry.sh first and carry .gpu_carry"; exit 1; }
# Distribution names from the wheel files (name-version-...whl): pip picks each one's wheel for this Python.
wheels=("$CARRY"/wheels/*.whl)
mapfile -t names < <(printf '%s\n' "${wheels[@]##*/}" | sed 's/-.*//' | sort -u)
extra=()
[ -n "${EXTRA_WHEELS:-}" ] && extra=(--find-links "$EXTRA_WHEELS")
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  --find-links "$CARRY/wheels" "${extra[@]}" "${names[@]}" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { say "installing the carried wheels failed"; exit 1; }
export PYTHONPATH="$SITE:$REPO"
say "installed into $SITE: ${names[*]}"

# cnnrun finds dataset=fashion_mnist's files under $CNNRUN_DATA_DIR/fashion_mnist (and caches the decoded arrays
# beside them): a writable copy outside the tree.
if [ -d "$CARRY/datasets/fashion_mnist" ]; then
  mkdir -p "$DATA/fashion_mnist" && cp "$CARRY"/datasets/fashion_mnist/* "$DATA/fashion_mnist/"
  export CNNRUN_DATA_DIR=$DATA
else
  say "no Fashion-MNIST in the carry: bench_gpu uses mnist_5k"
fi

say "== bench_gpu (limit ${BENCH_LIMIT} s)"
# shellcheck disable=SC2086  # BENCH_ARGS holds several arguments
timeout -k 10 "$BENCH_LIMIT" "$PYTHON" -m benchmarks.bench_gpu --device cuda --budget $((BENCH_LIMIT - 15)) \
  --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
say "-- bench_gpu exit ${PIPESTATUS[0]}"

if [ -z "${SKIP_GPU_CHECK:-}" ]; then
  say "== gpu_check.sh, SKIP_GRID=1 (limit ${CHECK_LIMIT} s; its log: $OUT/gpu_check.log)"
  SKIP_GRID=1 OUT=$OUT timeout -k 10 "$CHECK_LIMIT" bash benchmarks/gpu_check.sh > "$OUT/gpu_check.stdout" 2>&1  # mostly what gpu_check.log has
  say "-- gpu_check exit $?"
  grep -E "^[= ]*[0-9]+ (passed|failed|skipped|errors?)" "$OUT/gpu_check.log" | tail -1 | tee -a "$LOG"
  say "gpu_check's cnnrun commands: $(grep -c '^-- exit 0' "$OUT/gpu_check.log") exited 0," \
    "$(grep -c '^-- exit [1-9]' "$OUT/gpu_check.log") did not"
fi

say "== $(date -u +%FT%TZ) done"
sed -n '/^=== summary/,$p' "$OUT/bench_gpu.log"  # the figures, at the end of the output
