"""Training with one framework never imports another; task=summary imports none."""

import importlib.util
import json
import subprocess
import sys

import pytest

from cnnrun.backends import BACKENDS

FRAMEWORK_PACKAGES = {"torch", "tensorflow", "keras", "chainer", "cupy", "jax"}
# What each framework may load: Keras 3 on its default TensorFlow backend needs TensorFlow. (`import tensorflow`
# would import keras by itself; the tensorflow backend hides it while TF loads, which also halves start-up.)
ALLOWED = {
    "torch": {"torch"},
    "tensorflow": {"tensorflow"},
    "keras": {"keras", "tensorflow"},
    "chainer": {"chainer"},
}

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


def test_summary_imports_no_framework(tmp_path):
    assert loaded_after(["task=summary", "model=resnet_lite"], tmp_path) == set()


def test_start_up_imports_only_what_the_command_uses(tmp_path):
    """Start-up time (benchmarks/bench_startup.py): --version needs no Hydra, a summary no NumPy or MLflow."""
    assert loaded_after(["--version"], tmp_path, {"hydra", "omegaconf", "pydantic", "numpy"}) == set()
    assert loaded_after(["task=summary"], tmp_path, {"numpy", "mlflow", "PIL", "matplotlib", "safetensors"}) == set()


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
