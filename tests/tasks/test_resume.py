"""Interrupt and resume: the final metrics equal an uninterrupted run's, in every framework.

Tolerances: torch and chainer on the CPU resume bit for bit (weights, optimizer slots, dropout RNG and data order
are all restored), so their test metrics are compared exactly; the per-epoch train loss is summed in float64
in another grouping, so it is compared to 1e-9. TensorFlow and Keras restore the same state; their kernels may
pick other summation orders between processes, so they get 1e-5 on losses and at most one image on accuracy.
"""

import importlib.util

import pytest

from cnnrun.backends import BACKENDS
from tests.helpers import mlflow_runs, run_cli

# Dropout is in the model so that the RNG state has to be carried across the interruption.
DROPNET = """\
name: dropnet
layers:
  - {type: conv2d, filters: 16, kernel: 5, padding: same, activation: relu}
  - {type: maxpool, size: 2}
  - {type: conv2d, filters: 16, kernel: 3, padding: same, activation: relu}
  - {type: maxpool, size: 2}
  - {type: flatten}
  - {type: dropout, rate: 0.3}
  - {type: dense, units: 64, activation: relu}
  - {type: dense, units: "${dataset.num_classes}"}
  - {type: softmax}
"""
LOSS_TOLERANCE = {"torch": 0.0, "chainer": 0.0, "tensorflow": 1e-5, "keras": 1e-5}


def _final(uri):
    _, runs = mlflow_runs(uri)
    (run,) = runs
    return run


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(BACKENDS))
def test_resume_equals_uninterrupted(framework, workdir):
    if importlib.util.find_spec(BACKENDS[framework].module) is None:
        pytest.skip(f"no {framework} backend module")
    (workdir / "conf" / "model").mkdir(parents=True)
    (workdir / "conf" / "model" / "dropnet.yaml").write_text(DROPNET)
    args = ["--config-dir", str(workdir / "conf"), "model=dropnet", f"framework={framework}", "trainer.epochs=3",
            "trainer.patience=null", "trainer.progress=false", "trainer.log_every=5"]
    straight = workdir / "straight"
    straight.mkdir()
    assert run_cli(args + [f"tracking.uri=sqlite:///{straight}/m.db"], straight).returncode == 0
    broken = workdir / "broken"
    broken.mkdir()
    uri = f"sqlite:///{broken}/m.db"
    first = run_cli(args + [f"tracking.uri={uri}", "trainer.max_time=0.6"], broken)
    assert first.returncode == 130, first.stderr[-2000:]
    assert _final(uri).info.status == "KILLED"
    second = run_cli(args + [f"tracking.uri={uri}", "trainer.resume=last"], broken)
    assert second.returncode == 0, second.stderr[-2000:]

    expected, resumed = _final(f"sqlite:///{straight}/m.db"), _final(uri)  # one run: the same one continued
    assert resumed.info.status == "FINISHED" and "cnnrun.resumed_from" in resumed.data.tags
    a, b = expected.data.metrics, resumed.data.metrics
    tol = LOSS_TOLERANCE[framework]
    assert abs(a["test_loss"] - b["test_loss"]) <= tol
    assert abs(a["test_acc"] - b["test_acc"]) <= (0 if tol == 0 else 1 / 1000)
    assert abs(a["val_loss"] - b["val_loss"]) <= tol
    assert abs(a["train_loss"] - b["train_loss"]) <= max(tol, 1e-9)
