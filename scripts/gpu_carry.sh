#!/usr/bin/env bash
# Builds .gpu_carry/ (ignored by git): what a GPU machine with no network needs to run scripts/gpu_run.sh.
#
#   scripts/gpu_carry.sh        # from anywhere; writes <repo>/.gpu_carry, replacing an earlier one
#
# The GPU image already has Python 3.12, torch, CuPy, NumPy, pytest, matplotlib, h5py, ml-dtypes, absl-py,
# filelock, six and protobuf; it lacks Hydra, pydantic, Keras, Chainer and mlxtend. So the carry holds, at the
# versions requirements.lock pins:
#   wheels/    py3.12 manylinux wheels of the packages below (no dependencies fetched: the list is the closure,
#              found by tracing which modules the CLI, the GPU tests and bench_gpu import), plus wheels built here
#              of the two that PyPI has only as source (antlr4-python3-runtime, chainer; both pure Python);
#   datasets/fashion_mnist/   Debian's Fashion-MNIST files, when this machine has them (no download there).
# The device tool carries at most 64 MiB with the working tree: the total is printed and checked.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$REPO/.gpu_carry
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64
# Packages the GPU image lacks or has at another version; the others cnnrun needs are on the image.
PACKAGES=(hydra-core omegaconf pydantic pydantic_core annotated-types typing-inspection typing_extensions mlxtend
          keras namex optree rich markdown-it-py mdurl Pygments PyYAML safetensors pillow)
BUILT=(antlr4-python3-runtime chainer)  # sdists only on PyPI: built here into pure-Python wheels
FASHION_MNIST=/usr/share/datasets/fashion-mnist

pinned() {  # "name==version" as requirements.lock pins it (names compared as pip normalises them)
  local wanted
  wanted=$(echo "$1" | tr '[:upper:]_.' '[:lower:]--')
  awk -F'==' -v want="$wanted" '{name = tolower($1); gsub(/[_.]/, "-", name)} name == want {print; exit}' \
    "$REPO/requirements.lock" | grep . || { echo "$1 is not pinned in requirements.lock" >&2; return 1; }
}

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"
requirements=()
for package in "${PACKAGES[@]}"; do requirements+=("$(pinned "$package")"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${requirements[@]}"
built=()
for package in "${BUILT[@]}"; do built+=("$(pinned "$package")"); done
"$PYTHON" -m pip wheel -q --no-deps -w "$CARRY/wheels" "${built[@]}"
for wheel in "$CARRY"/wheels/*.whl; do  # built here: must run on any Python 3
  case $(basename "$wheel") in
    antlr4*|chainer*) [[ $wheel == *-py3-none-any.whl ]] || { echo "not pure Python: $wheel" >&2; exit 1; } ;;
  esac
done

if [ -d "$FASHION_MNIST" ]; then
  mkdir -p "$CARRY/datasets/fashion_mnist"
  cp "$FASHION_MNIST"/*-ubyte.gz "$CARRY/datasets/fashion_mnist/"
else
  echo "note: $FASHION_MNIST not found (Debian's dataset-fashion-mnist): bench_gpu will use mnist_5k" >&2
fi

printf '%s\n' "$CARRY"/wheels/*.whl
tree_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null |
  tail -1 | cut -f1)
carry_bytes=$(du -sb "$CARRY" | cut -f1)
total=$((tree_bytes + carry_bytes))
wheels=("$CARRY"/wheels/*.whl)
echo "carry: $((carry_bytes / 1024 / 1024)) MiB (${#wheels[@]} wheels); with the working tree:" \
  "$((total / 1024 / 1024)) MiB of the ${LIMIT_MIB} MiB a device call takes"
[ "$total" -lt $((LIMIT_MIB * 1024 * 1024)) ] || { echo "too large to carry" >&2; exit 1; }
