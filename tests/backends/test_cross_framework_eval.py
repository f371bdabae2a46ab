"""task=eval: a model trained by one framework, evaluated by every framework, through the real CLI.

classic_cnn is trained for one epoch with framework=torch; its model.safetensors is then evaluated with each
framework in cnnrun.backends.BACKENDS (once per engine: Keras once per Keras backend). Every evaluation must report the
training run's test accuracy to within one test image, as a FINISHED MLflow run tagged with the checkpoint's
origin. A small network of the mobile layer types (grouped, dilated, depthwise and separable convolutions,
upsampling, global max pooling, the newer activations) is trained with channels-last TensorFlow and evaluated
the same way by the others. The user mistakes task=eval can meet are checked without training anything.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from tests.helpers import framework_params, mlflow_runs, run_cli
from tests.tiny import TINY

TEST_IMAGES = 1000  # mnist_5k's test split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, tracking uri, checkpoint path, training run) of one torch epoch of classic_cnn."""
    workdir = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = run_cli(["framework=torch", "trainer.epochs=1", "trainer.progress=false", f"tracking.uri={uri}"],
                     workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = workdir.glob("outputs/*/*/model.safetensors")
    _, (run,) = mlflow_runs(uri)
    return workdir, uri, checkpoint, run


@pytest.mark.slow
@pytest.mark.parametrize("framework_args", framework_params())
def test_every_framework_reproduces_the_test_accuracy(trained, framework_args):
    workdir, uri, checkpoint, train_run = trained
    name = "eval-" + "-".join(a.split("=")[1] for a in framework_args)
    result = run_cli(["task=eval", f"checkpoint={checkpoint}", *framework_args, "trainer.progress=false",
                      f"tracking.uri={uri}", f"tracking.run_name={name}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stderr + result.stdout
    _, runs = mlflow_runs(uri)
    (run,) = [r for r in runs if r.info.run_name == name]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["cnnrun.task"] == "eval"
    assert tags["cnnrun.checkpoint.origin.framework"] == "torch"
    assert tags["cnnrun.checkpoint.origin.run_id"] == train_run.info.run_id
    trained_acc, evaluated_acc = train_run.data.metrics["test_acc"], run.data.metrics["test_acc"]
    print(f"\n{name}: test_acc {evaluated_acc:.4f} (trained with torch: {trained_acc:.4f})")
    assert abs(evaluated_acc - trained_acc) * TEST_IMAGES <= 1 + 1e-9


MOBILE_MNIST = """\
name: mobile_mnist
layers:
  - {type: conv2d, filters: 8, kernel: 3, stride: 2, padding: same, bias: false, activation: relu6}
  - {type: depthwise_conv2d, kernel: 3, padding: same, depth_multiplier: 2, activation: hard_swish}
  - {type: separable_conv2d, filters: 32, kernel: 3, padding: same, dilation: 2, activation: silu}
  - {type: conv2d, filters: 32, kernel: 3, groups: 4, padding: same, activation: gelu}
  - {type: depthwise_conv2d, kernel: 3, stride: 2, padding: same, bias: false}
  - {type: upsample, size: 2, interpolation: bilinear}
  - {type: global_maxpool}
  - {type: dense, units: "${dataset.num_classes}"}
  - {type: softmax}
"""


@pytest.fixture(scope="module")
def trained_mobile(tmp_path_factory):
    """(workdir, tracking uri, checkpoint, training run) of one TensorFlow epoch of a network of the mobile layer
    types (task=eval reads the model from the checkpoint)."""
    workdir = tmp_path_factory.mktemp("trained_mobile")
    (workdir / "configs" / "model").mkdir(parents=True)
    (workdir / "configs" / "model" / "mobile_mnist.yaml").write_text(textwrap.dedent(MOBILE_MNIST))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    config = ["--config-dir", str(workdir / "configs"), "model=mobile_mnist"]
    result = run_cli([*config, "framework=tensorflow", "trainer.epochs=1", "optimizer.lr=0.01",
                      "trainer.progress=false", f"tracking.uri={uri}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = workdir.glob("outputs/*/*/model.safetensors")
    _, (run,) = mlflow_runs(uri)
    return workdir, uri, checkpoint, run


@pytest.mark.slow
@pytest.mark.parametrize("framework_args", [p for p in framework_params() if p.id != "tensorflow"])
def test_a_mobile_layer_network_trained_with_tensorflow_evaluates_the_same_everywhere(trained_mobile,
                                                                                      framework_args):
    workdir, uri, checkpoint, train_run = trained_mobile
    name = "eval-" + "-".join(a.split("=")[1] for a in framework_args)
    result = run_cli(["task=eval", f"checkpoint={checkpoint}", *framework_args, "trainer.progress=false",
                      f"tracking.uri={uri}", f"tracking.run_name={name}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = mlflow_runs(uri)
    (run,) = [r for r in runs if r.info.run_name == name]
    assert run.data.tags["cnnrun.checkpoint.origin.framework"] == "tensorflow"
    trained_acc, evaluated_acc = train_run.data.metrics["test_acc"], run.data.metrics["test_acc"]
    print(f"\n{name}: test_acc {evaluated_acc:.4f} (trained with tensorflow: {trained_acc:.4f})")
    assert trained_acc > 0.3  # it learned (chance 0.1, about 0.6 after this epoch): a scrambled layout would show
    assert abs(evaluated_acc - trained_acc) * TEST_IMAGES <= 1 + 1e-9


@pytest.mark.slow
def test_the_checkpoint_records_its_split_and_eval_refuses_another(trained):
    workdir, _, checkpoint, _ = trained
    assert ckpt_io.load(checkpoint).split == {"dataset": "mnist_5k", "split_seed": 0, "val_fraction": 0.1,
                                              "test_fraction": 0.2}
    result = _eval([f"checkpoint={checkpoint}", "dataset.split_seed=7"], workdir)
    assert result.returncode == 2 and "Evaluate with dataset.split_seed=0" in result.stderr, result.stderr


BF16_TEST_MARGIN = 5  # test images: bf16 and float32 inference may classify a few borderline images differently


@pytest.mark.slow
def test_a_bf16_trained_checkpoint_is_float32_and_evaluates_in_another_framework(tmp_path):
    """trainer.precision=bf16 (torch): logged as an MLflow param; the checkpoint holds float32 tensors, and Chainer
    (which has no bf16) evaluates it in float32 to the training run's test accuracy within BF16_TEST_MARGIN."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["framework=torch", "trainer.precision=bf16", *TINY, f"tracking.uri={uri}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/*/*/model.safetensors")
    assert {w.dtype for w in ckpt_io.load(checkpoint).weights.values()} == {np.dtype(np.float32)}
    split = [arg for arg in TINY if arg.startswith("dataset.")]  # evaluate on the training run's test split
    result = run_cli(["task=eval", f"checkpoint={checkpoint}", "framework=chainer", "device=cpu", *split,
                      "trainer.progress=false", f"tracking.uri={uri}", "tracking.run_name=eval"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = mlflow_runs(uri)
    (train,) = [r for r in runs if r.data.tags["cnnrun.task"] == "train"]
    (evaluation,) = [r for r in runs if r.info.run_name == "eval"]
    assert train.data.params["trainer.precision"] == "bf16"
    assert evaluation.data.params.get("trainer.precision", "fp32") == "fp32"
    test_images = round(TEST_IMAGES * 0.6 / 0.2)  # TINY's test_fraction 0.6 of mnist_5k's 5,000 images
    difference = abs(train.data.metrics["test_acc"] - evaluation.data.metrics["test_acc"]) * test_images
    assert difference <= BF16_TEST_MARGIN + 1e-9, (train.data.metrics, evaluation.data.metrics)


# --------------------------------------------------------------------------------------------------- mistakes


def _eval(args, workdir):
    return run_cli(["task=eval", "framework=torch", "tracking.enabled=false", *args], workdir)


def test_eval_without_a_checkpoint_says_how(workdir):
    result = _eval([], workdir)
    assert result.returncode == 2
    assert "task=eval needs the checkpoint to evaluate: add checkpoint=PATH" in result.stderr


def test_eval_of_a_missing_file(workdir):
    result = _eval([f"checkpoint={workdir / 'nope.safetensors'}"], workdir)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def _save_mnist_5k_checkpoint(path: Path, split) -> Path:
    model = compile_model({"name": "tiny", "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]},
                          (1, 28, 28), 10)
    ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=initial_weights(model, 0), spec=model.spec, input_shape=(1, 28, 28),
        class_names=tuple(str(d) for d in range(10)), mean=(33.0,), std=(78.0,),
        origin={"framework": "torch", "dataset": "mnist_5k"}, split=split,
    ))
    return path


def test_eval_on_another_carved_split_than_training_is_refused(workdir):
    trained_on = {"dataset": "mnist_5k", "split_seed": 3, "val_fraction": 0.1, "test_fraction": 0.25}
    path = _save_mnist_5k_checkpoint(workdir / "split.safetensors", trained_on)
    result = _eval([f"checkpoint={path}", "dataset.test_fraction=0.2"], workdir)  # split_seed: 0 by default
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "than dataset.split_seed=0, dataset.test_fraction=0.2 makes" in result.stderr
    assert "it would test on training images. Evaluate with dataset.split_seed=3 dataset.test_fraction=0.25" \
        in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("split", [{"dataset": "mnist_5k", "split_seed": 3, "val_fraction": 0.1,
                                    "test_fraction": 0.2}, {}], ids=["same-split", "older-checkpoint"])
def test_eval_with_the_training_split_or_of_an_older_checkpoint_runs(workdir, split):
    path = _save_mnist_5k_checkpoint(workdir / "split.safetensors", split)
    result = _eval([f"checkpoint={path}", "dataset.split_seed=3", "trainer.progress=false"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("does not record its dataset split" in result.stdout + result.stderr) == (not split)


def _save_cifar_like_checkpoint(path: Path, spec=None) -> Path:
    spec = spec or {"name": "tiny_rgb", "layers": [{"type": "conv2d", "filters": 4, "kernel": 3},
                                                    {"type": "global_avgpool"}, {"type": "dense", "units": 10}]}
    model = compile_model(spec, (3, 32, 32), 10)
    ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=initial_weights(model, 0), spec=model.spec, input_shape=(3, 32, 32),
        class_names=tuple(f"c{i}" for i in range(10)), mean=(120.0,) * 3, std=(60.0,) * 3,
        origin={"framework": "torch", "dataset": "cifar10"},
    ))
    return path


def test_eval_on_a_dataset_of_other_images_is_refused(workdir):
    path = _save_cifar_like_checkpoint(workdir / "rgb.safetensors")
    result = _eval([f"checkpoint={path}"], workdir)
    assert result.returncode == 2
    assert "expects 3×32×32 images (dataset=mnist_5k gives 1×28×28)" in result.stderr
    assert "dataset=cifar10" in result.stderr


def test_a_checkpoint_spec_is_validated_like_a_users(workdir):
    path = _save_cifar_like_checkpoint(workdir / "bad.safetensors")
    ckpt = ckpt_io.load(path)
    ckpt.spec["layers"][0]["kernel"] = 0  # tampered after saving
    ckpt_io.save(path, ckpt)
    result = _eval([f"checkpoint={path}", "dataset.channels=3", "dataset.image_size=[32,32]"], workdir)
    assert result.returncode == 2
    assert f"checkpoint {path}" in result.stderr
    assert "kernel" in result.stderr


def test_checkpoint_tensors_must_fit_its_spec(workdir):
    path = _save_cifar_like_checkpoint(workdir / "odd.safetensors")
    ckpt = ckpt_io.load(path)
    ckpt.weights["conv2d_0/kernel"] = np.zeros((5, 3, 3, 3), np.float32)
    ckpt_io.save(path, ckpt)
    result = _eval([f"checkpoint={path}"], workdir)
    assert result.returncode == 2
    assert "conv2d_0/kernel: checkpoint (5, 3, 3, 3), model (4, 3, 3, 3)" in result.stderr
