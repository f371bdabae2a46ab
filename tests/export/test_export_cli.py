"""task=export through the CLI: where files go, what a bad request says, and that nothing is half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnrun.export import write_atomically
from cnnrun.export.onnx_runtime import load_onnx_predictor
from tests.export.test_onnx_export import CLASS_NAMES, checkpoint_for
from tests.helpers import run_cli
from tests.test_lazy_imports import loaded_after


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return checkpoint_for("classic_cnn", tmp_path_factory.mktemp("export_cli") / "run" / "model.safetensors")


def test_onnx_export_writes_where_asked_and_imports_no_framework(checkpoint, tmp_path):
    target = tmp_path / "served" / "digits.onnx"
    args = ["task=export", f"checkpoint={checkpoint}", "export.format=onnx", f"export.output={target}"]
    assert loaded_after(args, tmp_path) == set()  # no torch, tensorflow, keras or chainer
    predictor = load_onnx_predictor(target)
    assert predictor.class_names == list(CLASS_NAMES) and predictor.input_shape == (1, 28, 28)
    assert predictor.predict_logits(np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 10)


def test_onnx_export_defaults_to_beside_the_checkpoint_and_replaces_an_earlier_one(checkpoint, tmp_path):
    target = checkpoint.with_suffix(".onnx")
    target.write_bytes(b"an earlier export")
    result = run_cli(["task=export", f"checkpoint={checkpoint}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opset 17" in result.stderr and "logits (N, 10)" in result.stderr  # rich's console writes to stderr
    assert load_onnx_predictor(target).input_shape == (1, 28, 28)


BAD = [
    ("unknown-format", ["export.format=onxx"], ["export.format", "'onnx', 'torchscript', 'saved_model' or 'keras'",
                                                "did you mean 'onnx'"]),
    ("no-checkpoint", [], ["task=export needs the checkpoint", "checkpoint=PATH"]),
    ("missing-checkpoint", ["checkpoint={dir}/missing.safetensors"], ["missing.safetensors does not exist"]),
    ("not-a-checkpoint", ["checkpoint={dir}/garbage.safetensors"], ["not a cnnrun checkpoint"]),
    ("chainer-native", ["checkpoint={ckpt}", "framework=chainer", "export.format=torchscript"],
     ["framework=chainer", "no native serving format", "Formats for framework=chainer: 'onnx'"]),
    ("torch-savedmodel", ["checkpoint={ckpt}", "framework=torch", "export.format=saved_model"],
     ["written by framework=tensorflow", "its native format 'torchscript'", "'onnx' or 'torchscript'"]),
    ("output-is-a-folder", ["checkpoint={ckpt}", "export.output={dir}"], ["is a folder; name the file to write"]),
    ("savedmodel-over-a-folder", ["checkpoint={ckpt}", "export.format=saved_model", "export.output={dir}"],
     ["is not a saved_model export (no saved_model.pb)", "will not replace it"]),
    ("keras-suffix", ["checkpoint={ckpt}", "export.format=keras", "export.output={dir}/model.h5"],
     ["export.output=", "*.keras"]),
]


@pytest.mark.parametrize("case_id,args,fragments", BAD, ids=[b[0] for b in BAD])
def test_a_bad_export_request_is_one_clear_error_and_writes_nothing(checkpoint, case_id, args, fragments, tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    args = [a.replace("{dir}", str(tmp_path)).replace("{ckpt}", str(checkpoint)) for a in args]
    before, here = sorted(checkpoint.parent.iterdir()), sorted(tmp_path.iterdir())
    result = run_cli(["task=export", *args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert sorted(checkpoint.parent.iterdir()) == before
    assert sorted(p for p in tmp_path.iterdir() if p.name != "outputs") == here  # outputs/: Hydra's log


def test_a_failed_write_keeps_the_previous_export_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_folder_export_replaces_the_previous_folder_whole(tmp_path):
    target = tmp_path / "model.savedmodel"

    def folder_with(name: str):
        def make(path: Path) -> None:
            path.mkdir()
            (path / name).write_text(name)
        return make

    write_atomically(target, folder_with("first"))
    write_atomically(target, folder_with("second"))
    assert sorted(p.name for p in target.iterdir()) == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.savedmodel"]


WITHOUT = """
import sys
for package in sys.argv[2].split(","):
    sys.modules[package] = None  # as if not installed: importing it raises ModuleNotFoundError
sys.argv = ["cnnrun", "task=export", "checkpoint=" + sys.argv[1]]
from cnnrun.cli import main
main()
"""


def test_exporting_without_the_onnx_package_says_what_to_install(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT, str(checkpoint), "onnx"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "export.format=onnx needs the onnx package" in proc.stderr and "cnnrun[onnx]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predicting_without_onnxruntime_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from cnnrun.export.onnx_runtime import load_onnx_predictor\n"
            "load_onnx_predictor(sys.argv[1])")
    (tmp_path / "model.onnx").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.onnx")], capture_output=True,
                          text=True, timeout=120)
    assert "needs the onnxruntime package" in proc.stderr and "pip install 'cnnrun[onnx]'" in proc.stderr


@pytest.mark.slow
def test_predict_with_the_onnx_export_matches_the_checkpoint(checkpoint, tmp_path):
    """task=predict framework=onnx on the exported file gives the safetensors checkpoint's predictions."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(photos / f"{i}.png")
    model = tmp_path / "model.onnx"
    exported = run_cli(["task=export", f"checkpoint={checkpoint}", f"export.output={model}"], cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    predictions = {}
    for name, args in {"checkpoint": [f"checkpoint={checkpoint}", "framework=torch"],
                       "onnx": [f"checkpoint={model}", "framework=onnx"]}.items():
        out = tmp_path / f"{name}.json"
        result = run_cli(["task=predict", *args, f"inputs={photos}", "predict.top_k=3", f"predict.output={out}"],
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        predictions[name] = {Path(p["file"]).name: p["top"] for p in json.loads(out.read_text())["predictions"]}
    assert sorted(predictions["onnx"]) == [f"{i}.png" for i in range(6)]
    for file, top in predictions["checkpoint"].items():
        onnx_top = predictions["onnx"][file]
        assert [t["class"] for t in onnx_top] == [t["class"] for t in top], file
        np.testing.assert_allclose([t["probability"] for t in onnx_top], [t["probability"] for t in top],
                                   rtol=0, atol=1e-5)
