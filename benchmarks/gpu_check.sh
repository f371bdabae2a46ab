#!/usr/bin/env bash
# cnnrun's device=cuda paths on a GPU machine, in one go:
#   1. tests/backends/test_gpu.py: each framework's GPU runner against its CPU runner (logits, losses, weights),
#      and bf16/fp16 (trainer.precision) against float32 on the GPU;
#   2. the real CLI on device=cuda (and device=cpu, for the images/s ratio) for every framework installed there,
#      with bf16-vs-fp32 images/s for resnet_lite and a wider network at batch 256.
#
#   benchmarks/gpu_check.sh            # from the repository root, with cnnrun importable (installed or on PYTHONPATH)
#
# Logs go to $OUT (default ./gpu_check): gpu_check.log has every command and its epoch table (images/s per epoch).
# Frameworks that are not installed or see no GPU are reported and skipped, never counted as passed.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$PWD/gpu_check}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 COLUMNS=150 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "$@" | tee -a "$LOG"; }

say "== $(date -u +%FT%TZ) $(nvidia-smi -L 2>&1 | head -1)"
for package in numpy torch cupy keras tensorflow; do  # one process each: TensorFlow and torch together can clash; Keras on torch, which needs no TensorFlow
  say "$package: $(KERAS_BACKEND=torch python3 -c "import $package; print($package.__version__)" 2>&1 | tail -1)"
done
say "chainer: $(python3 -c 'from cnnrun.backends.chainer_env import import_chainer, cupy_status
c = import_chainer(); cupy, why = cupy_status(); print(c.__version__, "cupy ok" if cupy else why)' 2>&1 | tail -1)"

say "== GPU tests"
(cd "$REPO" && KERAS_BACKEND=torch python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/backends/test_gpu.py) \
  2>&1 | tee -a "$LOG"

WORK=$(mktemp -d)
cd "$WORK" || exit 1
cli() {
  say "== cnnrun $*"
  local start=$SECONDS
  timeout "${RUN_LIMIT:-150}" python3 -m cnnrun tracking=none "$@" 2>&1 | tee -a "$LOG"
  say "-- exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
say "== checkpoints written on the GPU, evaluated on the CPU by both frameworks (same test accuracy expected)"
for framework in torch chainer; do
  cli model=resnet_lite framework=$framework device=cuda trainer.epochs=2
  checkpoint=$(ls -td outputs/*/*-resnet_lite-$framework | head -1)/model.safetensors
  for evaluator in torch chainer; do
    cli task=eval model=resnet_lite checkpoint="$checkpoint" framework=$evaluator device=cpu
  done
done
say "== data-parallel training on NCCL: one rank under torchrun, then one process per GPU (trainer.devices)"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
say "== torchrun --standalone --nproc-per-node=1 -m cnnrun model=resnet_lite framework=torch device=cuda"
timeout "${RUN_LIMIT:-150}" python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m cnnrun tracking=none \
  model=resnet_lite framework=torch device=cuda trainer.epochs=2 trainer.sync_batchnorm=true 2>&1 | tee -a "$LOG"
say "-- exit ${PIPESTATUS[0]}"
cli model=resnet_lite framework=torch device=cuda trainer.devices="$GPUS" trainer.sync_batchnorm=true trainer.epochs=2
cli model=resnet_lite framework=keras framework.backend=torch device=cuda trainer.devices="$GPUS" trainer.epochs=2

# Mixed precision: bf16 against fp32 at batch 256, for resnet_lite and a wider network (classic_cnn with 4x the
# filters and units), each pair run back to back; epoch 1 (kernel selection, autotuning) is left out of the
# figures. Chainer's mixed16 (fp16) once, and its checkpoint evaluated in float32 on the CPU.
WIDE="model=classic_cnn model.layers.0.filters=128 model.layers.2.filters=256 model.layers.5.units=4096"
for net in "model=resnet_lite" "$WIDE"; do
  for precision in fp32 bf16; do
    # shellcheck disable=SC2086  # $net holds several overrides
    cli $net framework=torch device=cuda trainer.batch_size=256 trainer.epochs="$EPOCHS" trainer.precision=$precision
  done
done
cli model=resnet_lite framework=chainer device=cuda trainer.batch_size=256 trainer.epochs="$EPOCHS" trainer.precision=fp16
checkpoint=$(ls -td outputs/*/*-resnet_lite-chainer | head -1)/model.safetensors
cli task=eval model=resnet_lite checkpoint="$checkpoint" framework=torch device=cpu
[ -n "${SKIP_GRID:-}" ] && { say "== SKIP_GRID set: the training grid is not run"; exit 0; }

# The command as a user types it (the trainer's default epochs), then the grid.
cli model=resnet_lite framework=chainer device=cuda
for model in classic_cnn resnet_lite; do
  cli model=$model framework=torch device=cuda trainer.epochs="$EPOCHS"
  cli model=$model framework=chainer device=cuda trainer.epochs="$EPOCHS"
  cli model=$model framework=chainer device=cpu trainer.epochs="$EPOCHS"  # the CPU baseline for Chainer's ratio
  cli model=$model framework=keras framework.backend=torch device=cuda trainer.epochs="$EPOCHS"
  if python3 -c 'import tensorflow' 2>/dev/null; then
    cli model=$model framework=tensorflow device=cuda trainer.epochs="$EPOCHS"
    cli model=$model framework=keras device=cuda trainer.epochs="$EPOCHS"
  else
    say "== tensorflow not installed here: framework=tensorflow and Keras's tensorflow backend not run"
  fi
done
tar czf "$OUT/outputs.tgz" --exclude="*.safetensors" -C "$WORK" outputs  # plots, summaries, configs
say "== done $(date -u +%FT%TZ)"
