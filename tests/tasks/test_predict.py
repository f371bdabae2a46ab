"""task=predict through the real CLI: image files in, the same predictions as task=eval out, in every framework.

A tiny classic_cnn is trained for one epoch on mnist_5k with torch and evaluated with task=eval (which writes every
test image's probabilities); the test split is then written to PNG files and predicted from the files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnrun import checkpoint as ckpt_io
from cnnrun.config import DatasetConfig
from cnnrun.data import load_dataset
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from tests.helpers import framework_params, run_cli, shipped_model
from tests.tiny import TINY

SPLIT = ["dataset.val_fraction=0.3", "dataset.test_fraction=0.6"]  # TINY's split: 3,000 test images
CROSS_FRAMEWORK_ATOL = 1e-4  # as the equivalence tests' logits


def _test_split():
    cfg = DatasetConfig(name="mnist_5k", num_classes=10, channels=1, image_size=(28, 28), download=False,
                        val_fraction=0.3, test_fraction=0.6)
    return load_dataset(cfg).test


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, checkpoint, eval's test_predictions.csv rows, folder of the test images as PNG files)."""
    workdir = tmp_path_factory.mktemp("predict")
    result = run_cli(TINY + ["tracking.enabled=false"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = workdir.glob("outputs/*/*/model.safetensors")
    result = run_cli(["task=eval", f"checkpoint={checkpoint}", "tracking.enabled=false", "trainer.progress=false",
                      *SPLIT], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_csv,) = workdir.glob("outputs/*/*/test_predictions.csv")
    with open(eval_csv) as fh:
        rows = list(csv.DictReader(fh))
    folder = workdir / "test_images"
    for index, image in enumerate(_test_split().images):  # half in a sub-folder: folders are searched recursively
        path = folder / ("odd" if index % 2 else "") / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0], "L").save(path)
    return workdir, checkpoint, rows, folder


def _predict(workdir, args):
    return run_cli(["task=predict", "predict.progress=false", *args], workdir)


def _by_index(output: Path):
    """{test index: (predicted class, {class: probability})} from a task=predict JSON file."""
    found = {}
    for entry in json.loads(output.read_text())["predictions"]:
        top = entry["top"]
        found[int(Path(entry["file"]).stem)] = (top[0]["class"], {t["class"]: t["probability"] for t in top})
    return found


def _eval_row(row):
    return row["predicted"], {key[len("probability_"):]: float(v) for key, v in row.items()
                              if key.startswith("probability_")}


@pytest.mark.slow
def test_predictions_on_image_files_equal_evals_image_for_image(trained):
    workdir, checkpoint, eval_rows, folder = trained
    output = workdir / "all.json"
    result = _predict(workdir, [f"checkpoint={checkpoint}", f"inputs={folder}", "predict.top_k=10",
                                f"predict.output={output}"])
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = _by_index(output)
    assert sorted(predicted) == list(range(len(eval_rows))) == list(range(3000))
    for index, row in enumerate(eval_rows):
        eval_class, eval_probs = _eval_row(row)
        predict_class, predict_probs = predicted[index]
        assert predict_class == eval_class, index
        assert predict_probs.keys() == eval_probs.keys()
        np.testing.assert_allclose([predict_probs[c] for c in eval_probs], list(eval_probs.values()),
                                   rtol=0, atol=1e-6, err_msg=f"image {index}")


@pytest.mark.slow
@pytest.mark.parametrize("framework_args", framework_params())
def test_every_framework_predicts_the_files_like_eval(trained, framework_args, tmp_path):
    workdir, checkpoint, eval_rows, folder = trained
    output = tmp_path / "preds.json"
    result = _predict(workdir, [f"checkpoint={checkpoint}", f"inputs={folder}/0000*.png", "predict.top_k=10",
                                f"predict.output={output}", *framework_args])
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["framework"] == framework_args[0].split("=")[1]
    predicted = _by_index(output)
    assert sorted(predicted) == [0, 2, 4, 6, 8]  # the glob matched the top folder's files only
    for index, (predict_class, probs) in predicted.items():
        eval_class, eval_probs = _eval_row(eval_rows[index])
        np.testing.assert_allclose([probs[c] for c in eval_probs], list(eval_probs.values()),
                                   rtol=0, atol=CROSS_FRAMEWORK_ATOL, err_msg=f"image {index}")
        runner_up = sorted(eval_probs.values())[-2]
        if eval_probs[eval_class] - runner_up > 2 * CROSS_FRAMEWORK_ATOL:  # not a near-tie rounding could flip
            assert predict_class == eval_class, f"image {index}"


def _save_checkpoint(path: Path, framework: str = "torch") -> Path:
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=initial_weights(model, 0), spec=model.spec, input_shape=model.input_shape,
        class_names=tuple(f"digit{d}" for d in range(10)), mean=(33.5,), std=(78.7,), origin={"framework": framework},
    ))
    return path


def _images_of_every_kind(folder: Path) -> list:
    """Good files in several modes and sizes, and two that cannot be read; returns the good ones' names."""
    folder.mkdir(parents=True)
    digit = _test_split().images[0][..., 0]
    Image.fromarray(digit, "L").save(folder / "gray.png")
    Image.fromarray(digit, "L").convert("RGBA").resize((90, 70)).save(folder / "rgba.png")
    Image.fromarray(digit, "L").convert("RGB").resize((300, 200)).save(folder / "big.jpg", quality=90)
    Image.fromarray(digit, "L").convert("P").save(folder / "palette.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(folder / "sixteen.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.jpg").write_text("not an image")
    return ["big.jpg", "gray.png", "palette.png", "rgba.png", "sixteen.png"]


@pytest.mark.slow
def test_unreadable_files_are_named_and_the_others_predicted(tmp_path):
    checkpoint = _save_checkpoint(tmp_path / "model.safetensors")
    good = _images_of_every_kind(tmp_path / "photos")
    output = tmp_path / "out" / "preds.csv"
    result = run_cli(["task=predict", f"checkpoint={checkpoint}", "inputs=photos", "predict.batch_size=2",
                      "predict.top_k=3", f"predict.output={output}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "2 of 7 file(s) could not be read" in result.stderr
    assert "photos/broken.png" in result.stderr and "photos/notes.jpg" in result.stderr
    assert "predicting 2/7" in result.stderr and "predicting 7/7" in result.stderr  # plain lines: not a terminal
    with open(output) as fh:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(fh)}
    assert sorted(rows) == sorted(good + ["broken.png", "notes.jpg"])
    for name in good:
        assert rows[name]["error"] == "" and rows[name]["class_1"].startswith("digit"), name
        probs = [float(rows[name][f"probability_{rank}"]) for rank in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert rows["broken.png"]["error"] and rows["broken.png"]["class_1"] == ""
    for name in good:  # the table on stdout names every file
        assert name in result.stdout


@pytest.mark.slow
def test_a_list_of_inputs_mixes_files_folders_and_globs_and_predicts_each_file_once(tmp_path):
    checkpoint = _save_checkpoint(tmp_path / "model.safetensors")
    for name in ("photos/a.png", "photos/deep/b.jpg", "shots/c.png", "shots/d.png", "e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).convert("RGB").save(tmp_path / name)
    output = tmp_path / "preds.json"
    result = _predict(tmp_path, [f"checkpoint={checkpoint}", "inputs=[e.png,photos,shots/*.png,photos/a.png]",
                                 "predict.top_k=1", f"predict.output={output}"])
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert [p["file"] for p in data["predictions"]] == ["e.png", "photos/a.png", "photos/deep/b.jpg", "shots/c.png",
                                                        "shots/d.png"]
    assert data["framework"] == "torch" and data["top_k"] == 1
    assert all(len(p["top"]) == 1 and p["top"][0]["class"].startswith("digit") for p in data["predictions"])


@pytest.mark.parametrize("args,fragments", [
    (["inputs=photos"], ["checkpoint: task=predict needs a model"]),
    (["checkpoint=model.safetensors"], ["inputs: task=predict needs the images"]),
    (["checkpoint=nope.safetensors", "inputs=nowhere"], ["checkpoint: nope.safetensors: no such file",
                                                         "inputs: nowhere: no such file or folder"]),
    (["checkpoint=model.safetensors", "inputs=photos/*.gif"], ["inputs: photos/*.gif: the pattern matches no file"]),
    (["checkpoint=model.safetensors", "inputs=empty"], ["inputs: empty: a folder with no PNG/JPG/JPEG files"]),
    (["checkpoint=model.safetensors", "inputs=photos", "predict.top_k=0"], ["predict.top_k"]),
    (["checkpoint=model.safetensors", "inputs=photos", "predict.top_k=11"],
     ["predict.top_k: expected 1 to 10 (the model has 10 classes); received 11"]),
    (["checkpoint=model.safetensors", "inputs=photos", "predict.output=preds.txt"],
     ["predict.output", "expected a file name ending in .csv or .json"]),
    (["checkpoint=model.safetensors", "inputs=photos", "framework=onnx"],
     ["framework=onnx runs exported .onnx models", "task=export"]),
    (["checkpoint=model.onnx", "inputs=photos", "framework=torch"],
     ["checkpoint=model.onnx is an exported ONNX model: predict with framework=onnx"]),
], ids=["no-checkpoint", "no-inputs", "nothing-exists", "glob-matches-nothing", "empty-folder", "top-k-zero",
        "top-k-above-classes", "output-format", "onnx-for-a-checkpoint", "a-framework-for-an-onnx-model"])
def test_mistakes_exit_2_with_a_clear_message(tmp_path, args, fragments):
    _save_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"not read: the framework is wrong")
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "empty").mkdir()
    result = _predict(tmp_path, args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
    assert not (tmp_path / "preds.txt").exists()


def test_training_with_onnx_says_which_frameworks_train(tmp_path):
    result = run_cli(["framework=onnx", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "framework=onnx runs exported models and only predicts (task=predict); task=train needs one of " \
           "'torch', 'tensorflow', 'keras' or 'chainer'" in result.stderr
