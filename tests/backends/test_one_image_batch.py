"""A training split that leaves a last batch of one image, with batchnorm on a 1×1 map and on a vector: every
framework trains it the same way (the image joins the batch before, see cnnrun.data.pipeline.batch_starts)."""

from __future__ import annotations

import math
import textwrap

import pytest

from tests.helpers import framework_params, mlflow_runs, run_cli
from tests.tiny import TINY

MODEL = textwrap.dedent("""\
    name: bn_one
    layers:
      - {type: conv2d, filters: 4, kernel: 28}
      - {type: batchnorm}
      - {type: flatten}
      - {type: dense, units: 6}
      - {type: batchnorm}
      - {type: dense, units: "${dataset.num_classes}"}
""")
TRAIN_IMAGES = 500  # TINY's split of mnist_5k; 499 = one full batch and one image left over


def _train(tmp_path, framework_args):
    configs = tmp_path / "configs" / "model"
    configs.mkdir(parents=True)
    (configs / "bn_one.yaml").write_text(MODEL)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data_args = [a for a in TINY if not a.startswith("model.")]
    result = run_cli(["--config-dir", str(tmp_path / "configs"), "model=bn_one", *framework_args, *data_args,
                      "trainer.batch_size=499", "tracking.log_model=false", f"tracking.uri={uri}"], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    _, (run,) = mlflow_runs(uri)
    return run.data.metrics


@pytest.fixture(scope="module")
def torch_metrics(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("torch"), ["framework=torch"])


@pytest.mark.slow
@pytest.mark.parametrize("framework_args", framework_params())
def test_a_last_batch_of_one_image_trains_alike_in_every_framework(tmp_path, torch_metrics, framework_args):
    metrics = torch_metrics if framework_args == ["framework=torch"] else _train(tmp_path, framework_args)
    # one step over all 500 images: the same first-step loss as torch's, from the same initial weights
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])
    assert abs(metrics["train_loss"] - torch_metrics["train_loss"]) < 1e-4, (metrics, torch_metrics)
    assert round(metrics["train_acc"] * TRAIN_IMAGES) == round(torch_metrics["train_acc"] * TRAIN_IMAGES)
