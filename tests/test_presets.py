"""The model presets: parameter counts at 224×224×3 with 1,000 classes equal the reference implementations', and
task=summary shows them (and repeat's per-repetition overrides) from the command line, without data.

References: Keras applications' VGG16 and MobileNet (alpha 1, include_top), built here in a subprocess with
weights=None (no download); torchvision's resnet18, built where torchvision imports, else its documented count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cnnrun.spec import compile_model
from tests.helpers import composed_config, run_cli, shipped_model

IMAGENET = (3, 224, 224)
SUMMARY_224 = ["task=summary", "dataset.image_size=224", "dataset.channels=3", "dataset.num_classes=1000",
               "summary.format=json"]

# torchvision documents resnet18's trainable count as ResNet18_Weights.IMAGENET1K_V1.meta["num_params"]
# (https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.resnet18.html). It documents no
# batchnorm-statistic count: 9,600 (its 20 batchnorms' running means and variances over 4,800 channels) was read from
# torchvision 0.28.0's resnet18(weights=None) and is checked against the real model wherever torchvision imports.
# (torchvision 0.28.0 installs beside the locked torch 2.13.0 without changing a pin, but its compiled operators do
# not load with the CPU build of torch, so `import torchvision` fails there and it is not in the lock file.)
TORCHVISION_RESNET18 = (11_689_512, 9_600)

KERAS_REFERENCE = """
import json, keras, numpy as np
count = lambda weights: int(sum(np.prod(w.shape) for w in weights))
out = {}
for name, build in (("vgg16", lambda: keras.applications.VGG16(weights=None)),
                    ("mobilenet_v1", lambda: keras.applications.MobileNet(weights=None, alpha=1.0))):
    model = build()
    out[name] = [count(model.trainable_weights), count(model.non_trainable_weights), int(model.count_params())]
    keras.backend.clear_session()
print(json.dumps(out))
"""


def _counts(name: str):
    model = compile_model(shipped_model(name, num_classes=1000), IMAGENET, 1000)
    return model.params, model.statistics


def _torchvision_resnet18():
    """(trainable, batchnorm statistics) of torchvision's resnet18, or None where torchvision does not import."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torch  # noqa: F401  (torchvision needs it first)
        import torchvision
    except Exception:  # absent, or present but built for another torch (its operators fail to register)
        return None
    model = torchvision.models.resnet18(weights=None)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in model.parameters()), stats


def test_resnet18_has_torchvisions_parameter_counts():
    built = _torchvision_resnet18()
    assert _counts("resnet18") == (built or TORCHVISION_RESNET18)


def test_resnet18_cifar_is_resnet18_with_a_3x3_stem_and_no_max_pooling():
    cifar = compile_model(shipped_model("resnet18_cifar"), (3, 32, 32), 10)
    full = compile_model(shipped_model("resnet18"), IMAGENET, 10)
    assert cifar.params == full.params - 64 * 3 * (7 * 7 - 3 * 3)  # the stem's kernel only
    assert cifar.statistics == full.statistics == 9_600
    assert [layer.type for layer in cifar.layers].count("maxpool") == 0
    assert cifar.layers[-3].out_shape == (512,) and cifar.layers[-4].out_shape == (512, 4, 4)


@pytest.mark.slow
def test_vgg16_and_mobilenet_v1_have_keras_applications_parameter_counts(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch", "KERAS_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", KERAS_REFERENCE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("vgg16", "mobilenet_v1"):
        trainable, statistics, total = reference[name]
        assert _counts(name) == (trainable, statistics), name
        assert trainable + statistics == total  # Keras's count_params: batchnorm statistics as non-trainable


def test_summary_of_resnet18_at_224_needs_no_data(workdir):
    result = run_cli(SUMMARY_224 + ["model=resnet18"], workdir)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["total_params"], data["batchnorm_statistics"]) == TORCHVISION_RESNET18
    assert data["input_shape"] == [3, 224, 224] and data["layers"][-1]["output_shape"] == [1000]
    assert not (workdir / "data").exists()


def test_a_repetition_is_changed_from_the_command_line(workdir):
    """Stage 2 of resnet18 is one repeat (model.layers[5]): its shipped override for repetition 0 is edited in place
    (no '+'), and a change for repetition 1 is added ('+'); repetition 1 otherwise stays as written."""
    result = run_cli(SUMMARY_224 + [
        "model=resnet18",
        "model.layers.5.overrides.0.0.layers.0.stride=1",  # stage 2 keeps 56×56: its first conv …
        "model.layers.5.overrides.0.0.shortcut.0.stride=1",  # … and the projection shortcut
        "+model.layers.5.overrides.1.0.layers.0.filters=64",  # repetition 1's first conv only: 64 filters
    ], workdir)
    assert result.returncode == 0, result.stderr
    shapes = {row["name"]: row["output_shape"] for row in json.loads(result.stdout)["layers"]}
    assert shapes["stage2_0/residual_0"] == [128, 56, 56]
    assert shapes["stage2_0/residual_0/conv2d_0"] == [128, 56, 56]
    assert shapes["stage2_1/residual_0/conv2d_0"] == [64, 56, 56]
    assert shapes["stage2_1/residual_0/conv2d_3"] == [128, 56, 56]


def test_a_bad_repetition_override_names_its_key_and_the_command_line(workdir):
    result = run_cli(["task=summary", "model=resnet18_cifar", "dataset=cifar10",
                      "+model.layers.4.overrides.1.0.layers.0.filtres=3", "+model.layers.4.overrides.2.0.activation=relu"],
                     workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].endswith("resnet18_cifar.yaml has 2 problems")
    assert lines[1].strip() == ("model.layers[4].overrides[2]: there is no repetition 2: times is 2 (repetitions 0–1)"
                                "  [command line: +model.layers.4.overrides.2.0.activation=relu]")
    assert lines[2].strip().startswith("model.layers[4].overrides[1][0].layers[0].filtres: unknown key 'filtres' "
                                       "(did you mean 'filters'?)")
    assert lines[2].endswith("[command line: +model.layers.4.overrides.1.0.layers.0.filtres=3]")


def test_a_resnet18_run_logs_a_few_dozen_params():
    """Residual and repeat bodies, shortcuts and overrides are logged as one JSON param each."""
    from cnnrun.config import flatten_for_logging
    from cnnrun.tasks.train import _loggable

    params = flatten_for_logging(_loggable(composed_config(["model=resnet18"])))
    assert not [key for key in params if ".overrides." in key or ".shortcut." in key]
    assert json.loads(params["model.layers.5.overrides"])["0"]["0"]["layers"]["0"] == {"stride": 2}
    assert json.loads(params["model.layers.5.layers"])[0]["shortcut"] == []
