"""One spec, one set of canonical weights → the same numbers in every framework.

Every framework in ``cnnrun.backends.BACKENDS`` (once per engine: Keras once per Keras backend, and once per
fast path) runs the same cases in its own subprocess (tests/backends/equivalence_worker.py); PyTorch is the
reference, and each framework's registry entry gives its tolerances. A new framework joins by being in
``BACKENDS``; one whose backend module or package is missing is skipped, not failed.

Checked per framework and spec: (a) output shape, per-layer shapes and parameter counts against the compiler,
(b) inference logits within 1e-4 of PyTorch's, (c) per-step losses of a few Adam and SGD steps (Nesterov,
classical momentum, none) within 1e-3, and the updated weights and batchnorm running statistics close enough that
a 10% learning-rate error fails, (d) ``get_weights(set_weights(w)) == w`` exactly, (e) dropout in training mode
scales the kept units by 1/(1 − rate) (statistically), (f) each framework's fast path (PyTorch channels_last and
fused optimizers, XLA) gives the numbers of its plain path, and that a framework imports no other framework.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest

from cnnrun.backends import BACKENDS, Tolerances
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from cnnrun.summary import summary_dict
from tests.helpers import framework_engines, shipped_model
from tests.specs import MOBILE, MOBILE_INPUT, without_dropout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("equivalence_worker.py")
REFERENCE = "torch"
# The default logits tolerance (each framework's registry entry gives its own); also what exported models keep.
LOGITS_ATOL = Tolerances().logits
# Adam: weights whose root-mean-square gradient (from the reference's second-moment slot) is below this move by
# rounding noise; see _assert_weights_close.
ADAM_NOISE_RMS = 1e-4
BATCH, STEPS = 16, 4


# --------------------------------------------------------------------------------------------------- frameworks


@dataclass(frozen=True)
class Variant:
    id: str  # "torch", "keras-torch", …
    framework: str  # framework=…
    options: Dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def tolerances(self):
        return BACKENDS[self.framework].tolerances

    def missing(self) -> Optional[str]:
        """Why this framework cannot run here (its backend module or package is absent), or None."""
        info = BACKENDS[self.framework]
        if importlib.util.find_spec(info.module) is None:
            return f"{info.module} does not exist yet"
        for package in info.engine_packages(self.options):
            if importlib.util.find_spec(package) is None:
                return f"the {package} package is not installed"
        return None


ENGINES = [Variant(label, name, options) for label, name, options in framework_engines()]


def _fast_paths() -> Dict[Variant, str]:
    """Each framework's optional fast paths (its registry entry's ``fast_paths``), as variants of their own → the
    engine variant each must equal. The reference runs PyTorch's defaults (channels_last memory, fused optimizer
    kernels), so there the extra variant is the plain path."""
    paths = {}
    for name, info in BACKENDS.items():
        for label, options in info.fast_paths.items():
            engine = next(v for v in ENGINES if v.framework == name and v.options.items() <= options.items())
            paths[Variant(f"{engine.id}-{label}", name, options)] = engine.id
    return paths


FAST_PATHS = _fast_paths()
VARIANTS = ENGINES + list(FAST_PATHS)
OTHERS = [v for v in VARIANTS if v.id != REFERENCE]


def _param(variant: Variant):
    reason = variant.missing()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(variant, id=variant.id, marks=marks)


# --------------------------------------------------------------------------------------------------- specs


# Odd sizes, even and odd kernels, stride-2 'same' (uneven pads), 'same' pooling with strides 1–3 (3×3 stride 2
# on an even size pads (0, 1)), int and [h, w] padding, residual with projection, batchnorm on maps and on a
# flattened vector, dropout, flatten → dense.
STRESS_RGB = {
    "name": "stress_rgb",
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel": 3, "padding": "same", "activation": "leaky_relu"},
        {"type": "conv2d", "filters": 8, "kernel": 4, "stride": 2, "padding": "same", "activation": "tanh"},
        {"type": "maxpool", "size": 3, "stride": 2, "padding": "same"},
        {"type": "avgpool", "size": 3, "stride": 1, "padding": "same"},
        {"type": "conv2d", "filters": 8, "kernel": [3, 5], "padding": [1, 2], "activation": "elu"},
        {
            "type": "residual",
            "activation": "relu",
            "layers": [
                {"type": "conv2d", "filters": 12, "kernel": 3, "stride": 2, "padding": "same", "bias": False},
                {"type": "batchnorm", "momentum": 0.9},
                {"type": "activation", "fn": "sigmoid"},
                {"type": "conv2d", "filters": 12, "kernel": 2, "padding": "same"},
                {"type": "dropout", "rate": 0.25},
            ],
        },
        {"type": "avgpool", "size": 3, "stride": 2, "padding": 1},
        {"type": "maxpool", "size": 2, "stride": 1, "padding": [1, 0]},
        {"type": "flatten"},
        {"type": "batchnorm", "momentum": 0.8, "epsilon": 1e-5},
        {"type": "dense", "units": 20, "activation": "relu"},
        {"type": "dropout", "rate": 0.5},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}

# 1×27×27: stride-2 'same' 5×5, 3×3 stride-2 'same' average pooling on 14×14 (pads (0, 1)), an identity
# residual with batchnorm, 2×2 stride-3 'same' average pooling, int-padded max pooling, a [2, 3] kernel with
# [2, 1] stride, global average pooling, no softmax.
STRESS_GRAY = {
    "name": "stress_gray",
    "layers": [
        {"type": "conv2d", "filters": 8, "kernel": 5, "stride": 2, "padding": "same", "activation": "relu"},
        {"type": "avgpool", "size": 3, "stride": 2, "padding": "same"},
        {
            "type": "residual",
            "activation": "relu",
            "layers": [
                {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "bias": False},
                {"type": "batchnorm"},
                {"type": "activation", "fn": "relu"},
                {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "bias": False},
                {"type": "batchnorm"},
            ],
        },
        {"type": "avgpool", "size": 2, "stride": 3, "padding": "same"},
        {"type": "maxpool", "size": 3, "stride": 1, "padding": 1},
        {"type": "conv2d", "filters": 16, "kernel": [2, 3], "stride": [2, 1], "padding": "same",
         "activation": "sigmoid"},
        {"type": "global_avgpool"},
        {"type": "dense", "units": 10},
    ],
}

# A flattened 5×1×2 map IS the output (no dense after the flatten): channels-last frameworks must reorder it.
# Its batchnorm sees 16 samples per feature with momentum 0.5, so a running variance updated with the biased
# batch variance instead of PyTorch's unbiased one would be off by ~1/30 of the batch variance per step.
FLAT_OUT = {
    "name": "flat_out",
    "layers": [
        {"type": "conv2d", "filters": 5, "kernel": [8, 4], "stride": [1, 4]},
        {"type": "flatten"},
        {"type": "batchnorm", "momentum": 0.5},
        {"type": "softmax"},
    ],
}

# Dense layers without bias, on a map flattened from a bias-free convolution.
NO_BIAS = {
    "name": "no_bias",
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel": 3, "stride": 2, "bias": False, "activation": "relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 12, "bias": False, "activation": "tanh"},
        {"type": "dense", "units": 10, "bias": False},
    ],
}

# The activations straight to the logits, their inputs spread over [-4, 4] where each curve bends: the tanh form of
# GELU, or hard swish with another slope, moves these logits by more than LOGITS_ATOL.
ACTIVATIONS = {
    "name": "activations",
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 16, "activation": "gelu"},
        {"type": "dense", "units": 10, "activation": "hard_swish"},
    ],
}

CASES = {
    "classic_cnn": (shipped_model("classic_cnn"), (1, 28, 28)),
    "resnet_lite": (shipped_model("resnet_lite"), (1, 28, 28)),
    "stress_rgb": (STRESS_RGB, (3, 31, 29)),
    "stress_gray": (STRESS_GRAY, (1, 27, 27)),
    "flat_out": (FLAT_OUT, (1, 8, 8)),
    "no_bias": (NO_BIAS, (1, 9, 9)),
    "mobile": (MOBILE, MOBILE_INPUT),  # the newer layer types, options and activations
    "activations": (ACTIVATIONS, (1, 1, 12)),
}
OPTIMIZERS = {
    "adam": {"name": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-7, "weight_decay": 0.0},
    # lr 0.005: from lr 0.01 up, resnet_lite's 4th batch-16 step is ill-conditioned (in torch alone, a 1e-6
    # relative nudge of the weights moves that loss by 1e-3), so only rounding would be tested there.
    # weight_decay 0.05: large enough that a missing or decoupled L2 term shows in the updated weights.
    "sgd": {"name": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    # The shipped SGD (classical momentum), and plain gradient descent (no momentum slot at all).
    "sgd_momentum": {"name": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05},
    "sgd_plain": {"name": "sgd", "lr": 0.005, "momentum": 0.0, "nesterov": False, "weight_decay": 0.05},
}

# Dropout in training mode, checked statistically: ten pixel values through flatten → dropout → an identity dense
# layer without bias, trained with a vanishing learning rate so the weights stay put. The mean training loss over
# DROPOUT_STEPS × BATCH independent masks must be the expectation over masks (computed below by Monte Carlo) within
# 5 standard errors; dropping units without scaling the kept ones by 1/(1 − rate) lands about 25 away.
DROPOUT = {
    "name": "dropout_scaling",
    "layers": [{"type": "flatten"}, {"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 10, "bias": False}],
}
DROPOUT_INPUT, DROPOUT_STEPS = (1, 1, 10), 64
VANISHING_SGD = {"name": "sgd", "lr": 1e-9, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def make_weights(model, seed: int) -> Dict[str, np.ndarray]:
    """Initial weights with every bias and batchnorm tensor made non-trivial, so each one matters."""
    rng = np.random.default_rng(seed)
    weights = initial_weights(model, seed)
    for name, value in weights.items():
        param = name.rsplit("/", 1)[1]
        if param in ("bias", "beta", "moving_mean"):
            weights[name] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
        elif param in ("gamma", "moving_variance"):
            weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return weights


def channel_stats(channels: int):
    if channels == 1:
        return (33.3,), (78.6,)
    return (120.0, 110.0, 100.0)[:channels], (60.0, 65.0, 70.0)[:channels]


def write_cases(folder: Path, commands_for: Callable[[str, Dict], List[Dict]]) -> List[Dict]:
    """Each case's canonical weights and images in ``folder/<case>.npz``; the cases as the worker reads them,
    each running ``commands_for(name, spec)`` (other test modules reuse this with their own commands)."""
    cases = []
    for i, (name, (spec, input_shape)) in enumerate(CASES.items()):
        model = compile_model(spec, input_shape, 10)
        rng = np.random.default_rng(100 + i)
        c, h, w = input_shape
        data = {f"weights/{k}": v for k, v in make_weights(model, i).items()}
        data["images"] = rng.integers(0, 256, (8, h, w, c), dtype=np.uint8)
        data["batch_images"] = rng.integers(0, 256, (STEPS, BATCH, h, w, c), dtype=np.uint8)
        data["batch_labels"] = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int64)
        np.savez(folder / f"{name}.npz", **data)
        mean, std = channel_stats(c)
        cases.append({
            "name": name, "spec": spec, "input_shape": list(input_shape), "num_classes": 10,
            "mean": list(mean), "std": list(std), "data": str(folder / f"{name}.npz"),
            "commands": commands_for(name, spec),
        })
    return cases


def _commands(name: str, spec: Dict) -> List[Dict]:
    train_spec = without_dropout(spec)
    commands = [{"kind": "info"}, {"kind": "forward"}, {"kind": "roundtrip"}] + [
        {"kind": "train", "id": f"train_{opt}", "optimizer": cfg, "spec": train_spec}
        for opt, cfg in OPTIMIZERS.items()
    ]
    if name == "stress_rgb":  # dropout on: the random-generator state must carry over too
        commands.append({"kind": "resume", "optimizer": OPTIMIZERS["adam"]})
    return commands


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Dict:
    """The cases as the worker reads them, with their data written to .npz files."""
    folder = tmp_path_factory.mktemp("equivalence")
    return {"folder": folder, "cases": write_cases(folder, _commands) + [_dropout_case(folder)]}


def _dropout_case(folder: Path) -> Dict:
    model = compile_model(DROPOUT, DROPOUT_INPUT, 10)
    (kernel,) = model.weight_shapes()
    rng = np.random.default_rng(7)
    np.savez(folder / "dropout_scaling.npz", **{
        f"weights/{kernel}": np.eye(10, dtype=np.float32),
        "batch_images": rng.integers(0, 4, (DROPOUT_STEPS, BATCH, 1, 10, 1), dtype=np.uint8),
        "batch_labels": rng.integers(0, 10, (DROPOUT_STEPS, BATCH)).astype(np.int64),
    })
    return {"name": "dropout_scaling", "spec": DROPOUT, "input_shape": list(DROPOUT_INPUT), "num_classes": 10,
            "mean": [0.0], "std": [1.0], "data": str(folder / "dropout_scaling.npz"),
            "commands": [{"kind": "train", "id": "dropout", "optimizer": VANISHING_SGD}]}


class Results:
    """Runs the worker once per framework, on first use, and keeps what it wrote."""

    def __init__(self, job: Dict):
        self.job = job
        self.cache: Dict[str, object] = {}  # variant id → its arrays, or the worker's error

    def __call__(self, variant: Variant) -> Dict[str, np.ndarray]:
        if variant.id not in self.cache:
            self.cache[variant.id] = self._run(variant)
        result = self.cache[variant.id]
        if isinstance(result, str):  # the worker failed once: every test of this framework reports it
            pytest.fail(result, pytrace=False)
        return result

    def _run(self, variant: Variant):
        folder = self.job["folder"]
        job_file, out_file = folder / f"{variant.id}.json", folder / f"{variant.id}.out.npz"
        job_file.write_text(json.dumps({
            "framework": variant.framework, "options": variant.options, "cases": self.job["cases"],
        }))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(job_file), str(out_file)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            return f"{variant.id} worker failed:\n{proc.stderr[-6000:]}"
        return dict(np.load(out_file))


@pytest.fixture(scope="module")
def results(job) -> Results:
    return Results(job)


def _model(case: str):
    spec, input_shape = CASES[case]
    return compile_model(spec, input_shape, 10)


def _prefixed(result: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_shapes_and_parameter_counts_match_the_compiler(results, variant, case):
    model = _model(case)
    result = results(variant)
    logits = result[f"{case}/forward/logits"]
    assert logits.shape == (8, *model.output_shape)
    assert logits.dtype == np.float32
    counts = json.loads(result[f"{case}/info/json"].tobytes())
    assert counts, f"tests/backends/equivalence_worker.py: NATIVE_COUNTS has no probe for {variant.framework}"
    assert counts["trainable"] == model.params
    states = sum(int(np.prod(s)) for layer in model.walk() for s in layer.states.values())
    if "count_params" in counts:  # Keras counts batchnorm running statistics as (non-trainable) parameters
        assert counts["count_params"] == model.params + states
    expected = {layer.name: [*layer.out_shape[1:], layer.out_shape[0]] if len(layer.out_shape) == 3
                else list(layer.out_shape) for layer in model.walk()}
    shapes = counts.get("layer_shapes", {})
    for name, shape in shapes.items():
        if name in expected:
            assert shape == expected[name], name
    if counts.get("shapes_of") == "top_level":  # one block per top-level layer, each measured (torch, Chainer)
        assert set(shapes) == {layer.name for layer in model.layers}
    elif shapes:  # every layer with weights is named after its canonical layer
        assert {n.rsplit("/", 1)[0] for n in model.weight_shapes()} <= set(shapes)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in OTHERS])
def test_logits_match_the_reference(results, variant, case):
    expected = results(Variant(REFERENCE, REFERENCE))[f"{case}/forward/logits"]
    actual = results(variant)[f"{case}/forward/logits"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=variant.tolerances.logits)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in OTHERS])
def test_training_steps_match_the_reference(results, variant, case, optimizer):
    key = f"{case}/train_{optimizer}"
    reference, result = results(Variant(REFERENCE, REFERENCE)), results(variant)
    np.testing.assert_allclose(result[f"{key}/losses"], reference[f"{key}/losses"], rtol=0,
                               atol=variant.tolerances.losses)
    _assert_weights_close(reference, result, key, optimizer, case)


def _assert_weights_close(reference, result, key: str, optimizer: str, case: str) -> None:
    """The weights after STEPS steps under ``key`` agree with the reference's, tensor by tensor.

    SGD moves each weight in proportion to its gradient, so float-level gradient differences stay float-level,
    and the batchnorm running statistics (PyTorch's rule: unbiased variance, everywhere) are compared tightly
    too; a biased running variance would be off by 1/15 of a batch-16 vector batchnorm's update. Adam moves a
    weight by about lr per step whatever the gradient's size, so where the true gradient is ~0 (a dead ReLU
    channel) rounding noise decides the sign of each step. Those weights are told apart by the reference's own
    second-moment slot: where the root-mean-square gradient is below ADAM_NOISE_RMS the step is noise and may be
    up to 2·lr per step apart; everywhere else the weights agree to _atol's bound, which a 10% error in the
    learning rate exceeds (the weights that move most move by about lr·STEPS = 4e-3; TensorFlow agrees with
    PyTorch to 2e-6 there, and Chainer with lr × 1.1 is 4e-4 to 5e-3 off in every case). The running statistics
    follow the weights' drift under Adam, so they are compared under SGD.
    """
    expected, actual = _prefixed(reference, f"{key}/weights/"), _prefixed(result, f"{key}/weights/")
    assert set(actual) == set(expected)
    settled, slotted = 0, 0
    for name in expected:
        atol = np.full(expected[name].shape, _atol(case, optimizer))
        if optimizer == "adam":
            second_moment = reference.get(f"{key}/state/{name}/exp_avg_sq")
            if second_moment is None:  # a running statistic
                atol[...] = 2 * OPTIMIZERS["adam"]["lr"] * STEPS
            else:
                rms = np.sqrt(second_moment / (1 - OPTIMIZERS["adam"]["beta2"] ** STEPS))
                atol[rms < ADAM_NOISE_RMS] = 2 * OPTIMIZERS["adam"]["lr"] * STEPS
                settled, slotted = settled + int((rms >= ADAM_NOISE_RMS).sum()), slotted + rms.size
        off = np.abs(actual[name] - expected[name]) > atol
        assert not off.any(), (f"{name}: {int(off.sum())} of {off.size} weights off, the worst by "
                               f"{np.abs(actual[name] - expected[name])[off].max():.3g}")
    assert settled >= 0.5 * slotted  # most Adam-trained weights are held to the tight bound, or it says little


def _atol(case: str, optimizer: str) -> float:
    if case == "resnet_lite":  # ill-conditioned (see OPTIMIZERS): step-1 gradients agree to 2e-5, 4 steps later
        return 3e-3 if optimizer == "adam" else 2e-3  # up to 1.3e-3 apart under SGD, 2.3e-3 under Adam (XLA)
    return 1e-4 if optimizer == "adam" else 2e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in FAST_PATHS])
def test_fast_paths_equal_the_plain_path(results, variant, case):
    """channels_last with fused optimizer kernels (PyTorch), XLA (TensorFlow, Keras): the same numbers with and
    without, at the tolerances used across frameworks."""
    counterpart = results(next(v for v in VARIANTS if v.id == FAST_PATHS[variant]))
    result = results(variant)
    np.testing.assert_allclose(result[f"{case}/forward/logits"], counterpart[f"{case}/forward/logits"], rtol=0,
                               atol=variant.tolerances.logits)
    for optimizer in OPTIMIZERS:
        key = f"{case}/train_{optimizer}"
        np.testing.assert_allclose(result[f"{key}/losses"], counterpart[f"{key}/losses"], rtol=0,
                                   atol=variant.tolerances.losses)
        _assert_weights_close(counterpart, result, key, optimizer, case)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_training_state_is_canonical(results, variant, case, optimizer):
    """Optimizer slots come back under PyTorch's names, in canonical layout, for trainable tensors only."""
    model = _model(case)
    trainable = {f"{layer.name}/{w}": s for layer in model.walk() for w, s in layer.weights.items()}
    reference = _slots(_prefixed(results(Variant(REFERENCE, REFERENCE)), f"{case}/train_{optimizer}/state/"))
    state = _slots(_prefixed(results(variant), f"{case}/train_{optimizer}/state/"))
    if OPTIMIZERS[optimizer].get("momentum") == 0.0:  # plain gradient descent keeps no slot
        assert state == {} == reference
        return
    assert state, "no optimizer slots"
    for key, value in state.items():
        name, slot = key.rsplit("/", 1)
        assert name in trainable, key
        if slot != "step":
            assert value.shape == trainable[name], key
    def named(keys):
        return {key for key in keys if not key.endswith("/step")}

    assert named(state) == named(reference)  # PyTorch's slot names (Chainer also counts steps where torch does not)
    if variant.framework in ("tensorflow", "keras"):  # written to match PyTorch's slots exactly, step counts too
        assert set(state) == set(reference)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_resuming_from_the_training_state_continues_exactly(results, variant):
    """Two steps, get_training_state, a new runner, set it, two more steps == four steps in one runner."""
    result = results(variant)
    np.testing.assert_allclose(result["stress_rgb/resume/resumed"], result["stress_rgb/resume/straight"],
                               rtol=0, atol=1e-6)


def _slots(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Optimizer slots only (``rng/...`` entries hold random-generator states, framework-specific)."""
    return {k: v for k, v in state.items() if not k.startswith("rng/")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_weights_round_trip_exactly(results, variant, case):
    expected = {k[len("weights/"):]: v for k, v in np.load(results.job["folder"] / f"{case}.npz").items()
                if k.startswith("weights/")}
    actual = _prefixed(results(variant), f"{case}/roundtrip/")
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == np.float32
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_a_framework_imports_no_other_framework(results, variant):
    result = results(variant)
    packages = [info.package for info in BACKENDS.values()]
    imported = {p for p in packages if int(result[f"modules/{p}"])}
    info = BACKENDS[variant.framework]
    assert info.package in imported and imported <= set(info.engine_packages(variant.options))


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS if v.framework == "keras"])
def test_summary_totals_equal_keras_count_params(results, variant):
    """task=summary's total is the trainable count Keras reports; count_params adds batchnorm statistics."""
    for case in ("classic_cnn", "resnet_lite"):
        model = _model(case)
        counts = json.loads(results(variant)[f"{case}/info/json"].tobytes())
        total = summary_dict(model)["total_params"]
        states = sum(int(np.prod(s)) for layer in model.walk() for s in layer.states.values())
        assert counts["trainable"] == total
        assert counts["count_params"] == total + states
        if states == 0:
            assert counts["count_params"] == total


def _dropout_loss(x: np.ndarray, labels: np.ndarray, rate: float, scale: float):
    """Mean over samples of the expected cross-entropy over dropout masks of ``x`` (kept units times ``scale``),
    and the root mean per-sample variance of a single mask's loss (Monte Carlo, 400 masks per sample)."""
    rng = np.random.default_rng(0)
    kept = rng.random((400, *x.shape)) >= rate
    logits = x * kept * scale
    logits -= logits.max(axis=-1, keepdims=True)
    losses = np.log(np.exp(logits).sum(axis=-1)) - np.take_along_axis(logits, labels[None, :, None], -1)[..., 0]
    return losses.mean(), np.sqrt(losses.var(axis=0).mean())


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_dropout_in_training_scales_the_kept_units(results, job, variant):
    data = np.load(job["folder"] / "dropout_scaling.npz")
    x, labels = data["batch_images"].reshape(-1, 10).astype(np.float64), data["batch_labels"].reshape(-1)
    rate = DROPOUT["layers"][1]["rate"]
    expected, spread = _dropout_loss(x, labels, rate, 1 / (1 - rate))
    unscaled, _ = _dropout_loss(x, labels, rate, 1.0)
    standard_error = spread / np.sqrt(len(labels))
    assert abs(expected - unscaled) > 15 * standard_error  # the test can tell the two apart
    mean = results(variant)["dropout_scaling/dropout/losses"].mean()
    assert abs(mean - expected) < 5 * standard_error, (mean, expected, standard_error)
