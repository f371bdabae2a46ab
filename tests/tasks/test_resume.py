"""Interrupt and resume: the resumed run is the uninterrupted run, epoch by epoch, in every framework.

Each case trains three epochs straight through, and again with a SIGINT sent as soon as epoch 1's
checkpoints/last.safetensors exists, then ``trainer.resume=last``. With many steps per epoch the interrupt lands
inside epoch 2 (checked from the saved progress); with one step per epoch it lands at the end of epoch 2, so the
resume starts at an epoch boundary. Compared with the straight run: the whole per-epoch metric history in MLflow
(every step once), every other metric, the history stored in the final checkpoint, and the tensors of the best and
final checkpoints. In the "held" case the interrupted and resumed runs gather their batches from the framework's
own arrays (``dataset.on_device=true``) and are compared with a straight run on host batches.

Tolerances: torch and chainer on the CPU resume bit for bit (weights, optimizer slots, dropout RNG and data order
are all restored), so everything is compared exactly except the per-epoch train loss, which is summed in float64
in another grouping after a mid-epoch resume (1e-9). TensorFlow and Keras restore the same state; their kernels
may pick other summation orders between processes, so losses and weights get 1e-5 and accuracies one image.
"""

import importlib.util
import signal
import subprocess
import time

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun.backends import BACKENDS
from tests.helpers import CNNRUN, mlflow_runs, run_cli

# Dropout is in the model so that the RNG state has to be carried across the interruption.
DROPNET = """\
name: dropnet
layers:
  - {type: conv2d, filters: 4, kernel: 5, padding: same, activation: relu}
  - {type: maxpool, size: 2}
  - {type: conv2d, filters: 6, kernel: 3, padding: same, activation: relu}
  - {type: maxpool, size: 2}
  - {type: flatten}
  - {type: dropout, rate: 0.3}
  - {type: dense, units: 16, activation: relu}
  - {type: dense, units: "${dataset.num_classes}"}
  - {type: softmax}
"""
TRAIN_IMAGES = 500  # mnist_5k with these fractions: 500 train, 1,500 validation, 3,000 test images
# batch size → where the interrupt lands: 100 steps per epoch (inside epoch 2) or 1 (at the end of epoch 2);
# "held": the images held by the framework (dataset.on_device=true), batches gathered from its arrays
WHERE = {"mid-epoch": 5, "epoch-boundary": TRAIN_IMAGES, "mid-epoch-held": 5}
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc")
TIMINGS = ("epoch_seconds", "images_per_s", "seconds")


def _args(workdir, framework: str, batch_size: int):
    return ["--config-dir", str(workdir / "conf"), "model=dropnet", f"framework={framework}", "device=cpu",
            "dataset.val_fraction=0.3", "dataset.test_fraction=0.6", f"trainer.batch_size={batch_size}",
            "trainer.epochs=3", "trainer.patience=null", "trainer.progress=false", "trainer.log_every=7",
            "tracking.log_model=false"]


def _interrupt_after_epoch_1(args, cwd):
    """Start training and send SIGINT the moment epoch 1's last.safetensors appears; returns (code, stderr)."""
    proc = subprocess.Popen(CNNRUN + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(cwd.glob("outputs/*/*/checkpoints/last.safetensors")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _run(uri):
    client, runs = mlflow_runs(uri)
    (run,) = runs  # the resumed job continues its run: one run, not two
    return client, run


def _history(client, run, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _close(a, b, tol, what):
    assert abs(a - b) <= tol, f"{what}: {a} != {b} (tolerance {tol})"


def _metric_tolerance(key: str, tol: float, images: int) -> float:
    if key.endswith("_acc"):
        return 0.0 if tol == 0 else 1 / images
    if key == "train_loss":
        return max(tol, 1e-9)
    return tol


def _assert_same_tensors(a, b, tol, what):
    assert set(a) == set(b), what
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=tol, err_msg=f"{what}: {name}")


def _outputs(root):
    (final,) = root.glob("outputs/*/*/model.safetensors")  # only a job that completes writes it
    return ckpt_io.load(final), ckpt_io.load(final.parent / "checkpoints" / "best.safetensors")


# The held case once per runner class: Keras (on TensorFlow here) holds and gathers with TensorFlow's runner.
CASES = [(framework, where) for framework in sorted(BACKENDS) for where in WHERE
         if not (where.endswith("held") and framework == "keras")]


@pytest.mark.slow
@pytest.mark.parametrize("framework, where", CASES, ids=[f"{f}-{w}" for f, w in CASES])
def test_resume_equals_uninterrupted(framework, where, workdir):
    if importlib.util.find_spec(BACKENDS[framework].module) is None:
        pytest.skip(f"no {framework} backend module")
    (workdir / "conf" / "model").mkdir(parents=True)
    (workdir / "conf" / "model" / "dropnet.yaml").write_text(DROPNET)
    args = _args(workdir, framework, WHERE[where])
    straight, broken = workdir / "straight", workdir / "broken"
    straight.mkdir(), broken.mkdir()
    result = run_cli(args + [f"tracking.uri=sqlite:///{straight}/m.db"], straight)
    assert result.returncode == 0, result.stderr[-2000:]
    # held: the interrupted and resumed runs gather from held arrays, and still equal the straight run's host batches
    args += ["dataset.on_device=true"] if where.endswith("held") else []

    uri = f"sqlite:///{broken}/m.db"
    code, err = _interrupt_after_epoch_1(args + [f"tracking.uri={uri}"], broken)
    assert code == 130, err[-2000:]
    assert _run(uri)[1].info.status == "KILLED"
    (interrupted,) = broken.glob("outputs/*/*/checkpoints/last.safetensors")
    progress = ckpt_io.load(interrupted).progress
    if where.startswith("mid-epoch"):
        assert progress["epoch"] == 1 and 0 < progress["batch"] < TRAIN_IMAGES // WHERE[where], progress
    else:
        assert (progress["epoch"], progress["batch"]) == (2, 0), progress
    result = run_cli(args + [f"tracking.uri={uri}", "trainer.resume=last"], broken)
    assert result.returncode == 0, result.stderr[-2000:]

    tol = BACKENDS[framework].tolerances.resume
    (client_a, expected), (client_b, resumed) = _run(f"sqlite:///{straight}/m.db"), _run(uri)
    assert resumed.info.status == "FINISHED" and "cnnrun.resumed_from" in resumed.data.tags
    assert expected.data.tags["cnnrun.batches"] == "host"  # dataset.on_device=auto on a CPU
    assert resumed.data.tags["cnnrun.batches"] == ("device" if where.endswith("held") else "host")
    for key in PER_EPOCH:  # every epoch logged once, at its step, with the uninterrupted run's value
        a, b = _history(client_a, expected, key), _history(client_b, resumed, key)
        assert [step for step, _ in b] == [step for step, _ in a] == [1, 2, 3], key
        for (step, x), (_, y) in zip(a, b):
            _close(x, y, _metric_tolerance(key, tol, 1500 if key.startswith("val") else TRAIN_IMAGES),
                   f"{key} at epoch {step}")
    a, b = expected.data.metrics, resumed.data.metrics
    assert set(a) == set(b)
    for key in set(a) - set(TIMINGS):  # the final test metrics and the sweep objective too
        _close(a[key], b[key], _metric_tolerance(key, tol, 3000), key)

    (final_a, best_a), (final_b, best_b) = _outputs(straight), _outputs(broken)
    rows_a, rows_b = final_a.progress.pop("history"), final_b.progress.pop("history")
    assert len(rows_a) == len(rows_b) == 3
    for row_a, row_b in zip(rows_a, rows_b):
        for key in PER_EPOCH:
            _close(row_a[key], row_b[key], _metric_tolerance(key, tol, 1500), f"stored {key}, epoch {row_a['epoch']}")
    plain_a, plain_b = ({k: v for k, v in final.progress.items() if k not in TIMINGS} for final in (final_a, final_b))
    numbers = [k for k, v in plain_a.items() if isinstance(v, (int, float))]
    assert {k: plain_a[k] for k in numbers} == pytest.approx({k: plain_b[k] for k in numbers}, abs=tol, rel=0)
    assert {k: v for k, v in plain_a.items() if k not in numbers} == \
        {k: v for k, v in plain_b.items() if k not in numbers}  # e.g. the schedule's state (None: constant rate)
    assert best_a.progress["epoch"] == best_b.progress["epoch"]
    _assert_same_tensors(best_a.weights, best_b.weights, tol, "best checkpoint")
    _assert_same_tensors(final_a.weights, final_b.weights, tol, "tested model")
