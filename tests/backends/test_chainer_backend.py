"""The Chainer backend against the compiler's shapes, the NumPy reference and the PyTorch backend."""

import dataclasses
import importlib.util
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if importlib.util.find_spec("chainer") is None:  # not importorskip: a bare `import chainer` fails (see chainer_env)
    pytest.skip("chainer is not installed", allow_module_level=True)

from cnnrun.backends import BACKENDS, ChainerOptions, TorchOptions, create_runner, framework_version
from cnnrun.backends.chainer import Network, Noise
from cnnrun.config import DeviceConfig, OptimizerConfig
from cnnrun.errors import UserError
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from tests.helpers import ROOT, shipped_model
from tests.reference import random_weights, reference_logits
from tests.specs import (
    MOBILE, MOBILE_INPUT, POOLING, POOLING_INPUT, STRESS, STRESS_INPUT, refused, without_dropout,
)

ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=1e-4)
SGD = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
CPU = DeviceConfig(name="cpu")


def runner_for(model, framework="chainer", optimizer=ADAM, seed=0, device=CPU):
    c = model.input_shape[0]
    options = ChainerOptions() if framework == "chainer" else TorchOptions()
    return create_runner(framework, model, optimizer, options, device, seed, (33.0,) * c, (78.0,) * c)


def random_images(input_shape, n=4, seed=0):
    c, h, w = input_shape
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


GRID = list(itertools.product([(1, 9, 9), (2, 10, 7)], [1, 2, 3, 4], [1, 2, 3], ["same", "valid", 1]))


def grid_spec(kernel, stride, padding):
    pool_padding = padding if padding != 1 or kernel > 1 else 0  # a 1-cell window over padding alone is refused
    return {"name": "grid", "layers": [
        {"type": "conv2d", "filters": 3, "kernel": kernel, "stride": stride, "padding": padding},
        {"type": "avgpool", "size": kernel, "stride": 1, "padding": pool_padding},
        {"type": "maxpool", "size": kernel, "stride": stride, "padding": pool_padding},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
    ]}


@pytest.mark.parametrize("input_shape,kernel,stride,padding", GRID)
def test_shapes_params_and_logits_on_a_grid(input_shape, kernel, stride, padding):
    spec = grid_spec(kernel, stride, padding)
    if refused(spec, input_shape):
        return
    model = compile_model(spec, input_shape, 10)
    net = Network(model, Noise(0))
    x = np.zeros((2, *input_shape), np.float32)
    for layer, link in zip(model.layers, net):
        x = link(x)
        assert tuple(x.shape[1:]) == layer.out_shape, layer.name
    assert sum(p.size for p in net.params()) == model.params
    # Same numbers as the reference, padding and partial windows included.
    runner = runner_for(model)
    weights = random_weights(model, seed=kernel * 10 + stride)
    runner.set_weights(weights)
    images = random_images(input_shape)
    expected = reference_logits(model, weights, (images.transpose(0, 3, 1, 2) - 33.0) / 78.0)
    np.testing.assert_allclose(runner.predict_logits(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["classic_cnn", "resnet_lite"])
def test_shipped_models_param_counts(name):
    model = compile_model(shipped_model(name), (1, 28, 28), 10)
    assert sum(p.size for p in Network(model, Noise(0)).params()) == model.params


LOGIT_CASES = [(STRESS, STRESS_INPUT), (POOLING, POOLING_INPUT), (MOBILE, MOBILE_INPUT),
               (shipped_model("resnet_lite"), (1, 28, 28))]


@pytest.mark.parametrize("spec,input_shape", LOGIT_CASES, ids=["stress", "pooling", "mobile", "resnet_lite"])
def test_logits_equal_reference_and_torch(spec, input_shape):
    model = compile_model(spec, input_shape, 10)
    weights = random_weights(model, seed=3)
    runner = runner_for(model)
    runner.set_weights(weights)
    images = random_images(input_shape)
    got = runner.predict_logits(images)
    assert got.dtype == np.float32 and got.shape == (4, 10)
    expected = reference_logits(model, weights, (images.transpose(0, 3, 1, 2) - 33.0) / 78.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    pytest.importorskip("torch")
    torch_runner = runner_for(model, "torch")
    torch_runner.set_weights(weights)
    np.testing.assert_allclose(got, torch_runner.predict_logits(images), rtol=1e-4, atol=1e-4)


def train_losses(framework, model, optimizer, images, labels, steps):
    runner = runner_for(model, framework, optimizer)
    losses = []
    for _ in range(steps):
        runner.train_step(images, labels)
        losses.append(runner.train_metrics()[0])
    return np.array(losses), runner.get_weights()


@pytest.mark.parametrize("optimizer", [ADAM, SGD], ids=["adam", "sgd-nesterov"])
def test_training_steps_match_torch(optimizer):
    pytest.importorskip("torch")
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    images, labels = random_images((1, 28, 28), 32), np.random.default_rng(1).integers(0, 10, 32)
    ours, ours_w = train_losses("chainer", model, optimizer, images, labels, 5)
    theirs, theirs_w = train_losses("torch", model, optimizer, images, labels, 5)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    for name in ours_w:
        np.testing.assert_allclose(ours_w[name], theirs_w[name], atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [ADAM, SGD.model_copy(update={"lr": 0.01})], ids=["adam", "sgd-nesterov"])
def test_batchnorm_resnet_steps_match_torch(optimizer):
    """Batchnorm in training mode (batch statistics, unbiased running variance, Keras momentum) and the
    projection shortcuts. Few steps at a moderate rate: in a deep ReLU net, float32 rounding flips the odd
    activation across zero, and each flip changes a gradient visibly. Measured for the SGD case: PyTorch float32
    is 1.8e-3 off PyTorch float64 at step 3, Chainer float32 2e-5; hence 1e-3 for two steps, 3e-3 for three."""
    pytest.importorskip("torch")
    model = compile_model(shipped_model("resnet_lite"), (1, 28, 28), 10)
    images, labels = random_images((1, 28, 28), 16), np.random.default_rng(1).integers(0, 10, 16)
    ours, ours_w = train_losses("chainer", model, optimizer, images, labels, 3)
    theirs, theirs_w = train_losses("torch", model, optimizer, images, labels, 3)
    np.testing.assert_allclose(ours[:2], theirs[:2], atol=1e-3)
    np.testing.assert_allclose(ours[2], theirs[2], atol=3e-3)
    for name in [n for n in ours_w if n.endswith(("moving_mean", "moving_variance"))]:
        np.testing.assert_allclose(ours_w[name], theirs_w[name], rtol=1e-3, atol=1e-3, err_msg=name)


def test_weights_round_trip():
    model = compile_model(STRESS, STRESS_INPUT, 10)
    runner = runner_for(model)
    weights = random_weights(model, seed=1)
    runner.set_weights(weights)
    back = runner.get_weights()
    assert set(back) == set(model.weight_shapes())
    for k in weights:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], weights[k])
    runner.train_step(random_images(STRESS_INPUT, 8), np.arange(8) % 10)
    assert not np.array_equal(runner.get_weights()["dense_12/kernel"], back["dense_12/kernel"])  # a copy, not live


@pytest.mark.parametrize("optimizer", [ADAM, SGD], ids=["adam", "sgd"])
def test_training_state_resumes_exactly(optimizer):
    model = compile_model(POOLING, POOLING_INPUT, 10)
    images, labels = random_images(POOLING_INPUT, 8), np.arange(8) % 10
    first = runner_for(model, optimizer=optimizer)
    first.train_step(images, labels)
    weights, state = first.get_weights(), first.get_training_state()
    slots = {k.rsplit("/", 1)[1] for k in state if not k.startswith("rng/")}
    assert slots == ({"exp_avg", "exp_avg_sq", "step"} if optimizer.name == "adam" else {"momentum_buffer", "step"})
    first.train_step(images, labels)

    resumed = runner_for(model, optimizer=optimizer, seed=5)  # other initial weights: everything must come back
    resumed.set_weights(weights)
    resumed.set_training_state(state)
    assert set(resumed.get_training_state()) == set(state)
    resumed.train_step(images, labels)
    for name, value in first.get_weights().items():
        np.testing.assert_array_equal(resumed.get_weights()[name], value, err_msg=name)


def test_dropout_masks_resume_exactly():
    """The dropout generator's counter travels in the training state: a resumed run draws the same masks."""
    model = compile_model(STRESS, STRESS_INPUT, 10)
    images, labels = random_images(STRESS_INPUT, 8), np.arange(8) % 10
    first = runner_for(model)
    first.train_step(images, labels)
    weights, state = first.get_weights(), first.get_training_state()
    assert state["rng/chainer_dropout"].tolist() == [1]
    first.train_step(images, labels)
    resumed = runner_for(model)
    resumed.set_weights(weights)
    resumed.set_training_state(state)
    resumed.train_step(images, labels)
    for name, value in first.get_weights().items():
        np.testing.assert_array_equal(resumed.get_weights()[name], value, err_msg=name)


def test_restored_training_state_is_a_copy():
    model = compile_model(POOLING, POOLING_INPUT, 10)
    runner = runner_for(model)
    runner.train_step(random_images(POOLING_INPUT, 8), np.arange(8) % 10)
    state = runner.get_training_state()
    other = runner_for(model)
    other.set_training_state(state)
    state["dense_4/bias/exp_avg"][:] = 7  # the caller's arrays are not the optimizer's
    assert not (other.get_training_state()["dense_4/bias/exp_avg"] == 7).any()
    assert other.get_training_state()["dense_4/bias/step"] == 1


def test_initial_weights_are_cnnruns_shared_ones():
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    got, expected = runner_for(model, seed=4).get_weights(), initial_weights(model, 4)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_training_reduces_loss_and_counts_samples():
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    runner = runner_for(model)
    images, labels = random_images((1, 28, 28), 32), np.random.default_rng(0).integers(0, 10, 32)
    runner.train_step(images, labels)
    runner.train_step(images, labels)
    first, _, count = runner.train_metrics()
    assert count == 64
    for _ in range(10):
        runner.train_step(images, labels)
    loss, acc, count = runner.train_metrics()
    assert count == 320 and loss < first and 0.0 <= acc <= 1.0
    assert runner.train_metrics()[2] == 0  # reset by the read


def test_dropout_is_seeded_and_off_at_inference():
    model = compile_model(STRESS, STRESS_INPUT, 10)
    images, labels = random_images(STRESS_INPUT, 8), np.arange(8) % 10
    a, b = runner_for(model, seed=2), runner_for(model, seed=2)
    for runner in (a, b):
        runner.train_step(images, labels)
    np.testing.assert_array_equal(a.get_weights()["dense_12/kernel"], b.get_weights()["dense_12/kernel"])
    np.testing.assert_array_equal(a.predict_logits(images), a.predict_logits(images))


def test_cuda_without_cupy_names_the_extra():
    from cnnrun.backends.chainer_env import cupy_status

    if cupy_status()[0] is not None:
        pytest.skip("CuPy is installed here")
    model = compile_model(POOLING, POOLING_INPUT, 10)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=r"pip install 'cnnrun\[cuda\]'.*cupy-cuda12x"):
            runner_for(model, device=DeviceConfig(name=name))
    assert runner_for(model, device=DeviceConfig(name="auto")).device_name == "cpu"


def test_cupy_without_a_usable_gpu_or_index_is_a_clear_error(monkeypatch):
    import cnnrun.backends.chainer as backend

    fake_cupy = type("FakeCuPy", (), {"__version__": "13.6.0"})
    monkeypatch.setattr(backend, "cupy_status", lambda: (fake_cupy, ""))
    monkeypatch.setattr(backend, "gpu_count", lambda cupy: (0, "CUDARuntimeError: no CUDA-capable device"))
    with pytest.raises(UserError, match="CuPy 13.6.0 sees no usable CUDA GPU.*no CUDA-capable device"):
        backend.resolve_device(DeviceConfig(name="cuda"))
    assert backend.resolve_device(DeviceConfig(name="auto")).xp is np
    monkeypatch.setattr(backend, "gpu_count", lambda cupy: (2, ""))
    with pytest.raises(UserError, match="device=cuda:3: only 2 GPU"):
        backend.resolve_device(DeviceConfig(name="cuda", index=3))


def test_framework_version_is_chainers():
    assert framework_version("chainer").startswith("7.8.1")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_training_with_chainer_imports_no_other_framework_and_prints_nothing():
    result = run_python("""
        import sys
        import numpy as np
        from cnnrun.backends import ChainerOptions, create_runner
        from cnnrun.config import DeviceConfig, OptimizerConfig
        from cnnrun.spec import compile_model
        from tests.specs import POOLING, POOLING_INPUT
        model = compile_model(POOLING, POOLING_INPUT, 10)
        runner = create_runner("chainer", model, OptimizerConfig(name="adam", lr=1e-3), ChainerOptions(),
                               DeviceConfig(name="auto", threads=1), 0, (0.0, 0.0), (1.0, 1.0))
        runner.train_step(np.zeros((4, 8, 10, 2), np.uint8), np.arange(4))
        runner.train_metrics()
        runner.predict_logits(np.zeros((2, 8, 10, 2), np.uint8))
        print(sorted(m for m in ("torch", "tensorflow", "keras", "jax", "cupy") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""  # no pkg_resources / numpy.distutils / CuPy warnings reach the user


def test_chainer_imports_even_when_setuptools_distutils_came_first():
    """The fallback path: numpy.distutils cannot load under setuptools' distutils, so a stand-in is used for the
    import only; afterwards setuptools and numpy.distutils are as they were."""
    result = run_python("""
        import sys, warnings
        warnings.simplefilter("error")
        import setuptools, distutils
        before = distutils
        from cnnrun.backends.chainer_env import import_chainer
        chainer = import_chainer()
        assert sys.modules["distutils"] is before
        assert "numpy.distutils.system_info" not in sys.modules or hasattr(
            sys.modules["numpy.distutils.system_info"], "system_info")  # the real one, never the stand-in
        print(chainer.__version__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7.8.1"


def test_the_distutils_shim_is_restored_after_the_import():
    result = run_python("""
        import sys, warnings
        import _distutils_hack
        warnings.simplefilter("error")
        from cnnrun.backends.chainer_env import import_chainer
        import_chainer()
        assert _distutils_hack.DISTUTILS_FINDER in sys.meta_path
        import setuptools  # would warn "Setuptools is replacing distutils" if the stdlib one were left loaded
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_chainer_imports_without_pkg_resources():
    """setuptools >= 81 has no pkg_resources: Chainer's version check then finds no optional package."""
    result = run_python("""
        import sys, warnings
        warnings.simplefilter("error")

        class NoPkgResources:  # what an environment without it looks like to the import system
            def find_spec(self, name, path=None, target=None):
                if name == "pkg_resources":
                    raise ModuleNotFoundError("No module named 'pkg_resources'", name=name)

        sys.meta_path.insert(0, NoPkgResources())
        from cnnrun.backends.chainer_env import import_chainer
        print(import_chainer().__version__, "pkg_resources" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7.8.1 False"


def test_chainer_imports_on_numpy_2_without_sctypes():
    """NumPy 2 removed np.sctypes, which Chainer reads at import: cnnrun supplies it for the import only.
    (Checked for real on NumPy 2.4 here and 2.5 with CuPy 14 on a GPU; this stands NumPy 2 in by removing it.)"""
    result = run_python("""
        import warnings
        warnings.simplefilter("error")
        import numpy
        del numpy.sctypes  # what NumPy 2 looks like to Chainer
        from cnnrun.backends.chainer_env import import_chainer
        chainer = import_chainer()
        print(chainer.__version__, hasattr(numpy, "sctypes"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7.8.1 False"


def test_cupy_cudnn_alias_shim_with_a_stand_in_cupy(tmp_path):
    """Where CuPy has cupyx.cudnn but no cupy.cudnn, Chainer's `import cupy.cudnn` is served from cupyx.cudnn."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("__version__ = '13.6.0'\n")
    (tmp_path / "cupyx").mkdir()
    (tmp_path / "cupyx" / "__init__.py").write_text("")
    (tmp_path / "cupyx" / "cudnn.py").write_text("MARK = 'cupyx.cudnn'\n")
    result = run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from cnnrun.backends.chainer_env import _alias_cupy_cudnn
        _alias_cupy_cudnn()
        import cupy, cupy.cudnn
        print(cupy.cudnn.MARK, sys.modules["cupy.cudnn"].MARK)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cupyx.cudnn cupyx.cudnn"


def test_mixed16_keeps_float32_master_weights_and_resumes_its_loss_scale(monkeypatch):
    """trainer.precision=fp16 (Chainer's mixed16) is CUDA-only in cnnrun, but its bookkeeping is the same on NumPy:
    allowed on the CPU here, it must report float32 weights (the optimizer's master copies), compute in float16
    (logits off float32's by more than float32 rounding, within fp16's 5e-3), carry its loss scale through the
    training state, and set_weights must reach the master copies the next update reads."""
    chainer_info = BACKENDS["chainer"]
    cpu_fp16 = {**chainer_info.precisions, "cpu": ("fp32", "fp16")}
    monkeypatch.setitem(BACKENDS, "chainer", dataclasses.replace(chainer_info, precisions=cpu_fp16))
    model = compile_model(without_dropout(STRESS), STRESS_INPUT, 10)
    weights = random_weights(model, seed=2)
    images, labels = random_images(STRESS_INPUT, n=8), np.arange(8) % 10
    fp32 = runner_for(model)
    c = model.input_shape[0]
    mixed = create_runner("chainer", model, ADAM, ChainerOptions(), CPU, 0, (33.0,) * c, (78.0,) * c, precision="fp16")
    for runner in (fp32, mixed):
        runner.set_weights(weights)
    off = np.abs(mixed.predict_logits(images) - fp32.predict_logits(images)).max()
    assert 1e-4 < off <= 5e-3
    for _ in range(3):
        mixed.train_step(images, labels)
    assert {w.dtype for w in mixed.get_weights().values()} == {np.dtype(np.float32)}
    state = mixed.get_training_state()
    assert float(state["loss_scale/scale"]) == 8.0  # Chainer's dynamic scale: 1, doubled after each finite step
    shifted = {name: value + 0.5 for name, value in weights.items()}
    mixed.set_weights(shifted)  # the master copies too: the next step starts from these weights
    mixed.train_step(images, labels)
    moved = {n: np.abs(w - shifted[n]).max() for n, w in mixed.get_weights().items() if "moving" not in n}
    assert max(moved.values()) < 3 * ADAM.lr  # one Adam step from `shifted` (stale masters: 0.5 away)
    resumed = create_runner("chainer", model, ADAM, ChainerOptions(), CPU, 0, (33.0,) * c, (78.0,) * c,
                            precision="fp16")
    resumed.set_training_state(state)
    assert float(resumed.get_training_state()["loss_scale/scale"]) == 8.0
