"""The bad-input matrix: each mistake goes through the real CLI and must end with a non-zero exit, a message that
names the key or file and what is allowed, exit code 2 (a user error), no traceback, and no MLflow run started.
Then the mistakes that show only once training is under way: exit 2, the run FAILED (never left RUNNING), and no
half-written checkpoint."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnrun import checkpoint as ckpt_io
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from tests.helpers import mlflow_runs, run_cli, shipped_model, torch_sees_a_gpu

MY_MODEL = "name: mine\nlayers:\n  - {type: flatten}\n  - {type: dense, units: 10}\n"
FILES = {
    "unquoted.yaml": "name: x\nlayers:\n  - {type: dense, units: ${dataset.num_classes}}\n",
    "indent.yaml": "name: x\nlayers:\n  - type: flatten\n   - type: dense\n",
    "tab.yaml": "name: x\nlayers:\n\t- {type: flatten}\n",
    "empty_layers.yaml": "name: x\nlayers: []\n",
    "no_name.yaml": "layers:\n  - {type: flatten}\n  - {type: dense, units: 10}\n",
    "duplicate_names.yaml": "name: x\nlayers:\n  - {type: flatten, name: a}\n  - {type: dense, units: 10, name: a}\n",
    "not_a_mapping.yaml": "name: x\nlayers:\n  - flatten\n  - {type: dense, units: 10}\n",
}

# (id, args, fragments that must appear in stderr); {dir} is the test's working directory.
CASES = [
    # YAML files the user wrote
    ("yaml-unquoted-interpolation", ["model=unquoted"], ["YAML syntax error", "unquoted.yaml, line 3", "quote"]),
    ("yaml-bad-indentation", ["model=indent"], ["YAML syntax error", "indent.yaml"]),
    ("yaml-tab", ["model=tab"], ["YAML syntax error", "tab.yaml"]),
    ("spec-empty-layers", ["model=empty_layers"], ["empty_layers.yaml", "model.layers"]),
    ("spec-no-name", ["model=no_name"], ["model.name"]),
    ("spec-duplicate-names", ["model=duplicate_names"], ["layer name 'a' is used more than once"]),
    ("spec-layer-not-mapping", ["model=not_a_mapping"], ["model.layers[0]"]),
    # every rule of the spec, from the command line
    ("layer-unknown-type", ["model.layers.0.type=conv"], ["model.layers[0].type: unknown layer type 'conv'", "conv2d"]),
    ("layer-misspelt-key", ["+model.layers.0.filter=3"], ["unknown key 'filter' (did you mean 'filters'?)"]),
    ("layer-missing-key", ["~model.layers.0.filters"], ["model.layers[0].filters: required key is missing"]),
    ("layer-zero-kernel", ["model.layers.0.kernel=0"], ["model.layers[0].kernel: expected an int >= 1"]),
    ("layer-negative-filters", ["model.layers.0.filters=-4"], ["model.layers[0].filters", "greater than 0"]),
    ("layer-string-filters", ["model.layers.0.filters=lots"], ["model.layers[0].filters: expected an integer"]),
    ("layer-triple-stride", ["model.layers.0.stride=[1,2,3]"], ["model.layers[0].stride", "[h, w]"]),
    ("layer-padding-typo", ["model.layers.0.padding=smae"], ["did you mean 'same'"]),
    ("layer-negative-padding", ["model.layers.0.padding=-1"], ["model.layers[0].padding", "'valid', 'same'"]),
    ("layer-unknown-activation", ["model.layers.0.activation=rleu"], ["did you mean 'relu'"]),
    ("layer-dropout-rate", ["model.layers.4.type=dropout", "+model.layers.4.rate=1.0"], ["model.layers[4].rate"]),
    ("layer-bias-not-bool", ["+model.layers.0.bias=maybe"], ["model.layers[0].bias: expected true or false"]),
    ("shape-empty-output", ["model.layers.1.size=64"], ["model.layers[1]: (maxpool) output would be", "shapes so far"]),
    ("shape-dense-needs-flatten", ["model.layers.4.type=dropout", "+model.layers.4.rate=0.1"],
     ["model.layers[5]: (dense) needs a vector", "flatten"]),
    ("shape-softmax-not-last", ["model.layers.5.type=softmax", "~model.layers.5.units", "~model.layers.5.activation"],
     ["model.layers[5]: softmax must be the last layer"]),
    ("shape-classes", ["model.layers.6.units=7"], ["the model outputs 7 values but the dataset has 10 classes"]),
    ("residual-flatten-inside", ["model=resnet_lite", "model.layers.3.layers.2.type=flatten",
                                 "~model.layers.3.layers.2.fn"], ["cannot stand inside a residual block"]),
    ("residual-unmatched", ["model=resnet_lite", "model.layers.3.layers.0.padding=valid"],
     ["model.layers[3]", "use padding: same"]),
    # wrong types and values for the other groups
    ("trainer-epochs-abc", ["trainer.epochs=abc"], ["trainer.epochs: expected an integer; received 'abc'"]),
    ("trainer-batch-zero", ["trainer.batch_size=0"], ["trainer.batch_size"]),
    ("trainer-patience-zero", ["trainer.patience=0"], ["trainer.patience"]),
    ("trainer-devices-zero", ["trainer.devices=0"], ["trainer.devices", "greater than 0"]),
    ("trainer-sync-batchnorm-chainer", ["framework=chainer", "trainer.devices=2", "trainer.sync_batchnorm=true"],
     ["trainer.sync_batchnorm: true: framework=chainer cannot synchronise batchnorm: ChainerMN's "
      "MultiNodeBatchNormalization"]),
    ("trainer-devices-batch", ["trainer.devices=3", "trainer.batch_size=2"],
     ["trainer.batch_size=2 on 3 processes", "fewer than one per process"]),
    ("optimizer-negative-lr", ["optimizer.lr=-1"], ["optimizer.lr"]),
    ("optimizer-unknown", ["optimizer.name=adamx"], ["optimizer.name", "'adamw'"]),
    ("dataset-fraction", ["dataset.val_fraction=1.5"], ["dataset.val_fraction"]),
    ("dataset-cache-off-without-files", ["dataset.cache=false"], ["dataset.cache", "only dataset=folder"]),
    ("dataset-on-device-unknown", ["dataset.on_device=gpu"], ["dataset.on_device: expected 'auto', True or False"]),
    ("dataset-on-device-augmented", ["dataset.on_device=true", "dataset.augment.horizontal_flip=true"],
     ["dataset.on_device: true gathers batches on the device, but dataset.augment runs on host batches"]),
    ("tracking-enabled-word", ["tracking.enabled=perhaps"], ["tracking.enabled: expected true or false"]),
    ("framework-option-unknown", ["+framework.fast=true"], ["framework.fast: unknown key"]),
    ("keras-backend-unknown", ["framework=keras", "framework.backend=jax"], ["framework.backend"]),
    ("precision-unknown", ["trainer.precision=fp8"], ["trainer.precision: expected 'fp32', 'bf16' or 'fp16'"]),
    # a precision the framework cannot run on the device: what can, and which frameworks can run it
    ("precision-chainer-cpu", ["framework=chainer", "device=cpu", "trainer.precision=bf16"],
     ["trainer.precision: framework=chainer on device=cpu trains in 'fp32' only, not bf16",
      "bf16 runs with framework='torch', 'tensorflow' or 'keras'"]),
    ("validate-precision-chainer-cpu", ["task=validate", "framework=chainer", "device=cpu", "trainer.precision=fp16"],
     ["trainer.precision: ", "chainer runs fp16 on device=cuda", "[command line: trainer.precision=fp16]"]),
    ("hydra-key-not-in-config", ["trainer.epoch=3"],
     ["cnnrun: trainer.epoch=3: trainer has no key 'epoch' (did you mean 'epochs'?); its keys: epochs, batch_size"]),
    ("nested-key-added", ["+trainer.epoch=3"],
     ["trainer.epoch: unknown key 'epoch' (did you mean 'epochs'?); allowed keys: epochs, batch_size"]),
    ("layer-key-not-in-config", ["model.layers.0.filter=3"],
     ["model.layers.0.filter=3: model.layers[0] has no key 'filter' (did you mean 'filters'?)"]),
    # unknown names
    ("framework-group-unknown", ["framework=jax"], ["cnnrun: framework=jax: config group 'framework' has no choice",
                                                    "'chainer', 'keras'", "'torch'"]),
    ("framework-name-unknown", ["framework.name=pytorch"],
     ["framework.name: unknown framework 'pytorch' (did you mean 'torch'?)"]),
    ("device-group-unknown", ["device=tpu"], ["device=tpu", "device/tpu.yaml", "'auto', 'cpu' or 'cuda'"]),
    ("device-name-unknown", ["device.name=gpu"], ["device.name", "'cpu', 'cuda', 'cuda:N' or 'auto'"]),
    ("dataset-group-unknown", ["dataset=imagenet"], ["dataset/imagenet", "mnist_5k"]),
    ("model-group-unknown", ["model=nope"], ["model=nope", "model/nope", "'classic_cnn'", "'resnet_lite'"]),
    ("hydra-group-unknown", ["hydra/launcher=nope"], ["hydra/launcher=nope", "'ray_local', 'submitit_local' or 'submitit_slurm'"]),
    ("dataset-name-unknown", ["dataset.name=mnsit"], ["dataset.name: unknown dataset 'mnsit' (did you mean 'mnist'?)"]),
    ("sweep-objective-unknown", ["sweep.objective=val_accuracy"], ["sweep.objective", "did you mean 'val_acc'"]),
    ("tracking-uri-scheme", ["tracking.uri=htp://127.0.0.1:5000"], ["tracking.uri: unknown scheme 'htp'"]),
    ("tracking-uri-sqlite-slashes", ["tracking.uri=sqlite://mlflow.db"], ["tracking.uri", "three slashes"]),
    # task=validate checks what a run would, and reports every problem with the schema's in one message
    ("validate-dataset-unknown", ["task=validate", "dataset.name=mnsit"], ["dataset.name", "did you mean 'mnist'"]),
    ("validate-every-problem", ["task=validate", "model.layers.0.padding=smae", "framework.name=tensorflw",
                                "trainer.epochs=abc", "dataset.name=mnsit", "trainer.resume={dir}/missing.safetensors",
                                "sweep.objective=val_accc", "tracking.uri=htp://x"],
     ["the config has 7 problems", "model.layers[0].padding", "framework.name: unknown framework 'tensorflw'",
      "trainer.epochs", "dataset.name", "trainer.resume: ", "sweep.objective", "tracking.uri"]),
    ("validate-folder-without-root", ["task=validate", "dataset=folder"], ["dataset.root: required"]),
    ("validate-missing-checkpoint", ["task=validate", "checkpoint={dir}/missing.safetensors"],
     ["checkpoint: ", "missing.safetensors does not exist"]),
    # the environment
    ("cuda-without-gpu", ["device=cuda"], ["device=cuda", "no usable CUDA GPU"]),
    ("precision-chainer-auto-without-gpu", ["framework=chainer", "trainer.precision=fp16"],
     ["trainer.precision: framework=chainer on device=cpu", "(device=auto resolved to cpu)"]),
    ("dataset-missing-offline", ["dataset=mnist", "dataset.download=false", "dataset.root={dir}/empty"],
     ["dataset.root", "dataset=mnist_5k"]),
    ("folder-without-root", ["dataset=folder"], ["dataset.root"]),
    ("folder-root-missing", ["dataset=folder", "dataset.root={dir}/nowhere"], ["nowhere"]),
    ("tracking-unreachable", ["tracking.uri=http://127.0.0.1:9"], ["tracking.uri=http://127.0.0.1:9 cannot be used"]),
    # checkpoints
    ("eval-without-checkpoint", ["task=eval"], ["checkpoint"]),
    ("eval-missing-checkpoint", ["task=eval", "checkpoint={dir}/missing.safetensors"],
     ["checkpoint: ", "missing.safetensors does not exist"]),
    ("eval-garbage-checkpoint", ["task=eval", "checkpoint={dir}/garbage.safetensors"],
     ["checkpoint=", "not a cnnrun checkpoint"]),
    ("resume-missing", ["trainer.resume={dir}/missing.safetensors"], ["trainer.resume: ", "does not exist"]),
    ("resume-garbage", ["trainer.resume={dir}/garbage.safetensors"], ["trainer.resume=", "not a cnnrun checkpoint"]),
    ("resume-last-nothing", ["trainer.resume=last"],
     ["trainer.resume: no checkpoints/last.safetensors", "trainer.resume=last"]),
    ("resume-other-model", ["trainer.resume={dir}/resnet_last.safetensors"],
     ["was trained with a different model", "model.layers[0]"]),
    ("resume-weights-only", ["trainer.resume={dir}/classic_weights_only.safetensors"], ["holds weights only"]),
]
# Mistakes only where PyTorch sees no GPU.
NEEDS_NO_GPU = {"cuda-without-gpu", "precision-chainer-auto-without-gpu"}


def _checkpoint(path: Path, model_name: str, with_state: bool) -> None:
    model = compile_model(shipped_model(model_name), (1, 28, 28), 10)
    ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=initial_weights(model, 0), spec=model.spec, input_shape=model.input_shape,
        class_names=tuple(str(d) for d in range(10)), mean=(33.5,), std=(78.7,),
        origin={"framework": "torch"}, progress={"epoch": 1, "batch": 0} if with_state else {},
        training_state={"rng/torch_cpu": np.zeros(4, "uint8")} if with_state else {},
    ))


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "my_configs" / "model").mkdir(parents=True)
    for name, text in FILES.items():
        (root / "my_configs" / "model" / name).write_text(text)
    (root / "empty").mkdir()
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    _checkpoint(root / "resnet_last.safetensors", "resnet_lite", with_state=True)
    _checkpoint(root / "classic_weights_only.safetensors", "classic_cnn", with_state=False)
    return root


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case_id,args,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(stage, case_id, args, fragments, tmp_path):
    if case_id in NEEDS_NO_GPU and torch_sees_a_gpu():
        pytest.skip("a CUDA GPU is visible to PyTorch here, so device=cuda is no mistake")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a.replace("{dir}", str(stage)) for a in args]
    result = run_cli(["--config-dir", str(stage / "my_configs"), f"tracking.uri={uri}", "trainer.progress=false",
                      *args], tmp_path, env={"CNNRUN_DATA_DIR": str(tmp_path / "data"),
                                             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 2, f"{case_id}: exit code {result.returncode}, not 2 (a user error):\n{output}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-4000:]
    for fragment in fragments:
        assert fragment in result.stderr, f"{case_id}: {fragment!r} not in:\n{result.stderr[-3000:]}"
    _, runs = mlflow_runs(uri)
    assert runs == []  # refused before a run was opened


# --------------------------------------------------------------------------------------------------- after start

TINY_RUN = ["model.layers.0.filters=4", "model.layers.2.filters=4", "model.layers.5.units=16", "device=cpu",
            "dataset.val_fraction=0.3", "dataset.test_fraction=0.6", "trainer.progress=false",
            "tracking.log_model=false"]


def _failed_after_start(result, uri, *fragments):
    """Exit 2, no traceback, the fragments in stderr, and the one MLflow run FAILED with the error recorded."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-4000:]
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr[-3000:]}"
    _, runs = mlflow_runs(uri)
    assert [run.info.status for run in runs] == ["FAILED"]
    return runs[0]


def _no_partial_checkpoints(root: Path) -> None:
    assert not list(root.rglob("*.tmp")), list(root.rglob("*.tmp"))
    for path in root.rglob("*.safetensors"):
        ckpt_io.load(path)  # complete and verified by its checksum


def test_checkpoint_folder_that_cannot_be_created_fails_the_run(tmp_path):
    """A file stands where the run's checkpoints/ folder goes (chmod would not stop root, who runs CI)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("in the way")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(TINY_RUN + ["trainer.epochs=1", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    run = _failed_after_start(result, uri, f"cannot write checkpoint {run_dir / 'checkpoints'}")
    assert "cannot write checkpoint" in run.data.tags["cnnrun.error"]
    assert (run_dir / "checkpoints").read_text() == "in the way"
    _no_partial_checkpoints(run_dir)


def test_divergence_in_epoch_2_fails_the_run_and_keeps_epoch_1s_checkpoint(tmp_path):
    """Epoch 1 trains normally; the run continues into epoch 2 with a learning rate that blows it up."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = tmp_path / "first", tmp_path / "second"
    args = TINY_RUN + ["optimizer=sgd", f"tracking.uri={uri}"]
    result = run_cli(args + ["trainer.epochs=1", f"hydra.run.dir={first}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_1 = ckpt_io.load(first / "checkpoints" / "best.safetensors")
    result = run_cli(args + ["trainer.epochs=2", "optimizer.lr=1e12", "trainer.log_every=1",
                             f"trainer.resume={first / 'checkpoints' / 'last.safetensors'}",
                             f"hydra.run.dir={second}"], tmp_path)
    _failed_after_start(result, uri, "training diverged", "in epoch 2", "optimizer.lr")
    assert not (second / "checkpoints" / "last.safetensors").exists()  # nothing of the diverged epoch is saved
    kept = ckpt_io.load(second / "checkpoints" / "best.safetensors")
    assert kept.progress["epoch"] == 1 and kept.progress["best_epoch"] == 0
    for name, value in epoch_1.weights.items():
        np.testing.assert_array_equal(kept.weights[name], value, err_msg=name)
    _no_partial_checkpoints(tmp_path)


def test_unreadable_image_is_refused_before_any_run(tmp_path):
    """dataset=folder decodes every image before the run opens, so a corrupt file costs no run at all."""
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "two.yaml").write_text(
        "name: two\nlayers:\n  - {type: flatten}\n  - {type: dense, units: 2}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["--config-dir", str(tmp_path / "conf"), "model=two", "dataset=folder", f"dataset.root={root}",
                      "dataset.image_size=[8,8]", "dataset.channels=1", "dataset.num_classes=2",
                      "trainer.progress=false", f"tracking.uri={uri}"], tmp_path,
                     env={"CNNRUN_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{root / 'b' / '3.png'}" in result.stderr and "Traceback" not in result.stderr
    _, runs = mlflow_runs(uri)
    assert runs == []

