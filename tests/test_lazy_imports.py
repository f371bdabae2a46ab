"""Training with one framework never imports another; --help, --version and task=summary import none of them, nor
anything else they do not use."""

import importlib.util
import json
import subprocess
import sys

import pytest

from cnnrun.backends import BACKENDS

FRAMEWORK_PACKAGES = {info.package for info in BACKENDS.values()} | {"cupy", "jax"}
# What each framework may load (its registry entry says: Keras 3 on its default TensorFlow backend needs TensorFlow).
ALLOWED = {name: set(info.imports) for name, info in BACKENDS.items()}

SNIPPET = """
import json, sys
sys.argv = ["cnnrun"] + json.loads(sys.argv[1])
from cnnrun.cli import main
try:
    main()
except SystemExit as exit:
    if exit.code:
        raise
print("LOADED", json.dumps(sorted(m for m in {packages} if m in sys.modules)))
"""


def loaded_after(args, cwd, packages=FRAMEWORK_PACKAGES):
    code = SNIPPET.replace("{packages}", repr(set(packages)))
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("LOADED ")][-1]
    return set(json.loads(line[len("LOADED "):]))


# Start-up time (benchmarks/bench_startup.py): what each quick command must not import. Each entry is true today;
# --help and --version need no framework, no NumPy, no MLflow and no pydantic (the config's schemas), --version not
# even Hydra; a summary infers shapes in plain Python and draws nothing.
NOT_AT_START_UP = {
    "--help": FRAMEWORK_PACKAGES | {"mlflow", "numpy", "pydantic"},
    "--version": FRAMEWORK_PACKAGES | {"mlflow", "numpy", "pydantic", "hydra", "omegaconf"},
    "task=summary": FRAMEWORK_PACKAGES | {"mlflow", "numpy", "PIL", "matplotlib", "safetensors"},
}


@pytest.mark.parametrize("command", sorted(NOT_AT_START_UP))
def test_start_up_imports_only_what_the_command_uses(command, tmp_path):
    args = [command, "model=resnet_lite"] if command.startswith("task=") else [command]
    assert loaded_after(args, tmp_path, NOT_AT_START_UP[command]) == set()


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(BACKENDS))
def test_training_imports_only_its_framework(framework, tmp_path):
    if importlib.util.find_spec(BACKENDS[framework].module) is None:
        pytest.skip(f"no {framework} backend module")
    args = [f"framework={framework}", "trainer.epochs=1", "trainer.progress=false", "model.layers.5.units=16",
            "dataset.val_fraction=0.02", "dataset.test_fraction=0.02", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    loaded = loaded_after(args, tmp_path)
    assert framework in loaded or BACKENDS[framework].package in loaded
    assert loaded <= ALLOWED[framework], f"framework={framework} also imported {loaded - ALLOWED[framework]}"


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "chainer"])
def test_predict_imports_only_the_checkpoints_framework(framework, tmp_path):
    """task=predict without framework= runs in the framework that trained the checkpoint, and imports no other."""
    import numpy as np
    from PIL import Image

    from cnnrun import checkpoint as ckpt_io
    from cnnrun.spec import compile_model
    from cnnrun.spec.init import initial_weights
    from tests.helpers import shipped_model

    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    ckpt_io.save(tmp_path / "model.safetensors", ckpt_io.Checkpoint(
        weights=initial_weights(model, 0), spec=model.spec, input_shape=model.input_shape,
        class_names=tuple(str(d) for d in range(10)), mean=(33.5,), std=(78.7,), origin={"framework": framework}))
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    loaded = loaded_after(["task=predict", "checkpoint=model.safetensors", "inputs=a.png"], tmp_path)
    assert loaded == {framework}
