"""trainer.precision in every framework that runs it on the CPU: bf16 (and fp16) against float32 PyTorch.

Frameworks come from each BackendInfo's ``precisions`` (Keras once per Keras backend; Chainer runs mixed16 on CUDA
only, so it has no case here: its refusal is in tests/test_bad_inputs.py). Each runs the cases below in its own
worker process (tests/backends/equivalence_worker.py, as tests/backends/test_equivalence.py does).

Tolerances, and why they are looser than fp32's (1e-4 on logits, 1e-3 on losses):

- bf16 keeps 8 significant bits (a relative spacing of 2^-8 ≈ 0.4 %): every convolution and dense layer rounds its
  inputs and weights to that, so logits of size ~1 move by a few 1e-3 (measured up to 4.5e-3 on resnet_lite, the
  same in every framework). Logits within BF16_ATOL = 2e-2, losses within BF16_ATOL too.
- fp16 keeps 11 bits (2^-11 ≈ 0.05 %): FP16_ATOL = 5e-3.
- And both must differ from fp32 by more than fp32's own tolerance: a precision that silently ran in float32
  would pass any looser bound.
- Losses of four training steps: BF16_LOSS_ATOL = 5e-2 (losses of ~2.5-3 with logits a few 1e-3 off; measured
  up to 2e-2 on the stress spec).
- Float32 master weights: four plain SGD steps at lr 1e-4 change each weight by ~1e-5, far below bf16's spacing
  (~5e-4 near 0.1), so only float32 weights keep those changes. The change of all trained tensors together must
  be float32 training's within UPDATE_RTOL = 0.4 (relative L2): bf16 gradients are a few % off on classic_cnn
  (0.05 measured) and more on the stress spec (0.22 in PyTorch; its first conv's bias gradient, a sum of ~900
  rounded terms per image that largely cancel, is 0.6 off); weights held in bf16 were measured 5-190× the change
  off, per tensor.
- Still trains: a small learnable problem (a bright patch in one of four quadrants, with noise) trained for
  FIT_EPOCHS in each precision: the loss of the last epoch below half the first's, and the test accuracy within
  ACCURACY_MARGIN (5 points, 13 of 256 test images) of the same framework's float32 run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from cnnrun.backends import BACKENDS
from cnnrun.spec import compile_model
from tests.backends.test_equivalence import (
    ENGINES, LOGITS_ATOL, Results, Variant, _param, _prefixed, make_weights, write_cases,
)
from tests.specs import without_dropout

pytestmark = pytest.mark.slow

REFERENCE = Variant("torch", "torch")
BF16_ATOL, FP16_ATOL = 2e-2, 5e-3
ATOL = {"bf16": BF16_ATOL, "fp16": FP16_ATOL}
BF16_LOSS_ATOL = 5e-2
SMALL_SGD = {"name": "sgd", "lr": 1e-4, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
UPDATE_RTOL = 0.4
# A shipped model, every older layer type and padding rule, and the mobile layer types (depthwise and separable
# convolutions, upsampling, global max pooling, the newer activations).
STEP_CASES = ("classic_cnn", "stress_rgb", "mobile")
FIT_EPOCHS, FIT_BATCH, FIT_TRAIN, FIT_TEST = 5, 64, 384, 256
ACCURACY_MARGIN = 0.05
FIT_SPEC = {
    "name": "quadrants",
    "layers": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "activation": "relu"},
        {"type": "batchnorm"},
        {"type": "maxpool", "size": 2},
        {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "activation": "relu"},
        {"type": "global_avgpool"},
        {"type": "dense", "units": 4},
    ],
}
FIT_INPUT = (1, 12, 12)
FIT_ADAM = {"name": "adam", "lr": 2e-2}


def _low_precision_variants() -> List[Variant]:
    """Every framework (Keras per backend) whose CPU runs bf16."""
    return [v for v in ENGINES if "bf16" in BACKENDS[v.framework].precisions["cpu"]]


VARIANTS = _low_precision_variants()
FP16_VARIANTS = [v for v in VARIANTS if "fp16" in BACKENDS[v.framework].precisions["cpu"]]


def _step_commands(name: str, spec: Dict) -> List[Dict]:
    """Forward passes and four training steps in fp32 and bf16 (fp16 forward on the stress spec); no others."""
    if name not in STEP_CASES:
        return []
    train = {"kind": "train", "optimizer": SMALL_SGD, "spec": without_dropout(spec)}
    commands = [{"kind": "forward", "id": "forward_fp32"},
                {"kind": "forward", "id": "forward_bf16", "precision": "bf16"},
                {**train, "id": "train_fp32"}, {**train, "id": "train_bf16", "precision": "bf16"}]
    if name == "stress_rgb":
        commands.append({"kind": "forward", "id": "forward_fp16", "precision": "fp16"})
    return commands


def quadrant_images(rng, n: int):
    """(images, labels): noise with a bright 4×4 patch in the quadrant of the label (0-3)."""
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 120, (n, *FIT_INPUT[1:], 1))
    for i, label in enumerate(labels):
        top, left = 6 * (label // 2) + 1, 6 * (label % 2) + 1
        images[i, top:top + 4, left:left + 4] += 120
    return images.astype(np.uint8), labels.astype(np.int64)


def _fit_case(folder: Path) -> Dict:
    model = compile_model(FIT_SPEC, FIT_INPUT, 4)
    rng = np.random.default_rng(7)
    data = {f"weights/{k}": v for k, v in make_weights(model, 7).items()}
    data["fit_images"], data["fit_labels"] = quadrant_images(rng, FIT_TRAIN)
    data["fit_test_images"], data["fit_test_labels"] = quadrant_images(rng, FIT_TEST)
    np.savez(folder / "quadrants.npz", **data)
    fit = {"kind": "fit", "optimizer": FIT_ADAM, "epochs": FIT_EPOCHS, "batch": FIT_BATCH}
    return {"name": "quadrants", "spec": FIT_SPEC, "input_shape": list(FIT_INPUT), "num_classes": 4,
            "mean": [90.0], "std": [50.0], "data": str(folder / "quadrants.npz"),
            "commands": [{**fit, "id": f"fit_{p}", "precision": p} for p in ("fp32", "bf16", "fp16")]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Results:
    folder = tmp_path_factory.mktemp("precision")
    cases = [case for case in write_cases(folder, _step_commands) if case["commands"]] + [_fit_case(folder)]
    return Results({"folder": folder, "cases": cases})


def _max_off(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max())


@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_bf16_logits_match_float32_torch_at_the_bf16_tolerance(results, variant, case):
    result, reference = results(variant), results(REFERENCE)
    bf16 = result[f"{case}/forward_bf16/logits"]
    assert bf16.dtype == np.float32
    off = _max_off(bf16, reference[f"{case}/forward_fp32/logits"])
    assert off <= BF16_ATOL, f"bf16 logits {off:.3g} from float32 PyTorch's"
    own = _max_off(bf16, result[f"{case}/forward_fp32/logits"])
    assert own > LOGITS_ATOL, f"bf16 logits only {own:.3g} from float32: not computed in bf16"


@pytest.mark.parametrize("variant", [_param(v) for v in FP16_VARIANTS])
def test_fp16_logits_match_float32_torch_at_the_fp16_tolerance(results, variant):
    result, reference = results(variant), results(REFERENCE)
    fp16 = result["stress_rgb/forward_fp16/logits"]
    off = _max_off(fp16, reference["stress_rgb/forward_fp32/logits"])
    assert off <= FP16_ATOL, f"fp16 logits {off:.3g} from float32 PyTorch's"
    own = _max_off(fp16, result["stress_rgb/forward_fp32/logits"])
    assert own > LOGITS_ATOL, f"fp16 logits only {own:.3g} from float32: not computed in fp16"


@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_bf16_training_keeps_updates_smaller_than_bf16_can_hold(results, variant, case):
    """Four small SGD steps in bf16: the losses follow float32 PyTorch's at BF16_LOSS_ATOL, and the weights' change
    from their initial values is float32 training's change within UPDATE_RTOL (relative, all tensors). The
    changes (~1e-5) are far below bf16's spacing near the weights (~5e-4), so only float32 master weights keep
    them: weights held in bf16 were measured 5-190× the change off, per tensor."""
    result, reference = results(variant), results(REFERENCE)
    losses = result[f"{case}/train_bf16/losses"]
    np.testing.assert_allclose(losses, reference[f"{case}/train_fp32/losses"], rtol=0, atol=BF16_LOSS_ATOL)
    initial = _prefixed(dict(np.load(results.job["folder"] / f"{case}.npz")), "weights/")
    expected = _prefixed(reference, f"{case}/train_fp32/weights/")
    actual = _prefixed(result, f"{case}/train_bf16/weights/")
    assert set(actual) == set(expected)
    trained = [name for name in expected if "/moving_" not in name]  # running statistics follow the activations
    for name, value in actual.items():
        assert value.dtype == np.float32, name
    change = np.concatenate([(actual[n] - initial[n]).ravel() for n in trained])
    expected_change = np.concatenate([(expected[n] - initial[n]).ravel() for n in trained])
    off = np.linalg.norm(change - expected_change) / np.linalg.norm(expected_change)
    assert off <= UPDATE_RTOL, f"the weights' change is {off:.2f} of float32 training's change off"
    for name, value in _prefixed(result, f"{case}/train_bf16/state/").items():
        if np.issubdtype(value.dtype, np.floating) and not name.startswith("rng/"):
            assert value.dtype == np.float32, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_low_precision_still_trains(results, variant, precision):
    if precision not in BACKENDS[variant.framework].precisions["cpu"]:
        pytest.skip(f"{variant.framework} runs no {precision} on the CPU")
    result = results(variant)
    losses = result[f"quadrants/fit_{precision}/losses"]
    accuracy, fp32_accuracy = float(result[f"quadrants/fit_{precision}/test_acc"]), float(
        result["quadrants/fit_fp32/test_acc"])
    print(f"\n{variant.id} {precision}: epoch losses {np.round(losses, 3)}, test accuracy {accuracy:.3f} "
          f"(fp32 {fp32_accuracy:.3f})")
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
    assert fp32_accuracy > 0.8  # the problem is learnable in the epochs given, so the comparison means something
    assert abs(accuracy - fp32_accuracy) <= ACCURACY_MARGIN
    for name, value in _prefixed(result, f"quadrants/fit_{precision}/weights/").items():
        assert value.dtype == np.float32, name
