"""ONNX export: onnxruntime on the exported model gives every framework's logits for the same checkpoint.

The cases and the per-framework workers are tests/backends/test_equivalence.py's (forward passes only here);
the ONNX model is written by the export path itself from a checkpoint holding the cases' weights, and run by
the predictor that ``task=predict framework=onnx`` uses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun import export
from cnnrun.errors import UserError
from cnnrun.export.onnx import BUILDERS, OPSET
from cnnrun.export.onnx_runtime import load_onnx_predictor
from cnnrun.spec import LAYER_TYPES, compile_model
from tests.backends.test_equivalence import (
    CASES,
    LOGITS_ATOL,
    VARIANTS,
    Results,
    _param,
    channel_stats,
    make_weights,
    write_cases,
)

CLASS_NAMES = tuple(f"class {i}" for i in range(10))


def _model(case: str):
    spec, input_shape = CASES[case]
    return compile_model(spec, input_shape, 10)


def checkpoint_for(case: str, path: Path) -> Path:
    """The case's weights (as the equivalence workers get them) and normalisation, saved as a checkpoint."""
    model = _model(case)
    mean, std = channel_stats(model.input_shape[0])
    index = list(CASES).index(case)
    ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=make_weights(model, index), spec=model.spec, input_shape=model.input_shape, class_names=CLASS_NAMES,
        mean=mean, std=std, origin={"framework": "torch"},
    ))
    return path


def export_onnx(case: str, folder: Path) -> Path:
    path = checkpoint_for(case, folder / f"{case}.safetensors")
    ckpt = ckpt_io.load(path)
    return export.write("onnx", ckpt, _model(case), export.default_output(path, "onnx"), None)


@pytest.fixture(scope="module")
def forward_job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_equivalence")
    return {"folder": folder, "cases": write_cases(folder, lambda name, spec: [{"kind": "forward"}])}


@pytest.fixture(scope="module")
def results(forward_job) -> Results:
    return Results(forward_job)


@pytest.fixture(scope="module")
def onnx_logits(forward_job):
    """case → onnxruntime's logits for the case's images, from the exported file."""
    out = {}
    for case in CASES:
        predictor = load_onnx_predictor(export_onnx(case, forward_job["folder"]))
        images = np.load(forward_job["folder"] / f"{case}.npz")["images"]
        out[case] = predictor.predict_logits(images)
    return out


def test_every_layer_type_has_an_onnx_builder_and_is_in_a_case():
    """A new layer type fails here until ONNX builds it and an equivalence case below exercises it."""
    assert set(BUILDERS) == set(LAYER_TYPES)
    covered = {layer.type for case in CASES for layer in _model(case).walk()}
    assert set(LAYER_TYPES) <= covered, f"no case uses {sorted(set(LAYER_TYPES) - covered)}"


def test_asymmetric_same_padding_and_padded_average_pooling_are_in_the_cases():
    layers = [layer for case in CASES for layer in _model(case).walk()]
    assert any(layer.type == "conv2d" and not layer.same_padding_symmetric for layer in layers)
    assert any(layer.type == "avgpool" and not layer.same_padding_symmetric for layer in layers)
    assert any(layer.type == "residual" and layer.shortcut is not None for layer in layers)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_onnx_logits_match_every_framework(results, onnx_logits, variant, case):
    expected = results(variant)[f"{case}/forward/logits"]
    np.testing.assert_allclose(onnx_logits[case], expected, rtol=0, atol=LOGITS_ATOL)


def test_the_model_states_its_opset_contract_and_metadata(tmp_path):
    path = export_onnx("stress_gray", tmp_path)
    proto = onnx.load(str(path))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    (image_input,) = proto.graph.input
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in image_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 27, 27, 1]  # (N, H, W, C)
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["cnnrun.class_names"]) == list(CLASS_NAMES)
    assert json.loads(props["cnnrun.input_shape"]) == [1, 27, 27]
    assert json.loads(props["cnnrun.mean"]) == list(channel_stats(1)[0])
    predictor = load_onnx_predictor(path)
    assert predictor.class_names == list(CLASS_NAMES) and predictor.input_shape == (1, 27, 27)


def test_probabilities_are_the_softmax_of_the_logits(tmp_path):
    import onnxruntime

    path = export_onnx("classic_cnn", tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    logits, probabilities = onnxruntime.InferenceSession(str(path)).run(None, {"images": images})
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, shifted / shifted.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert logits.shape == (5, 10) and logits.dtype == np.float32


def test_the_predictor_refuses_wrong_images_and_foreign_files(tmp_path):
    predictor = load_onnx_predictor(export_onnx("classic_cnn", tmp_path))
    for bad in (np.zeros((2, 28, 28, 1), np.float32), np.zeros((2, 1, 28, 28), np.uint8)):
        with pytest.raises(UserError, match=r"takes uint8 images of shape \(N, 28, 28, 1\)"):
            predictor.predict_logits(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_onnx_predictor(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not onnx" * 10)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_onnx_predictor(tmp_path / "garbage.onnx")
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    ), opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="not one cnnrun exported"):
        load_onnx_predictor(tmp_path / "foreign.onnx")


PREDICT_ONLY = """
import sys, numpy as np
from cnnrun.export.onnx_runtime import load_onnx_predictor
predictor = load_onnx_predictor(sys.argv[1])
print(predictor.predict_logits(np.zeros((3, 28, 28, 1), np.uint8)).shape)
from cnnrun.backends import BACKENDS
heavy = {info.package for info in BACKENDS.values()} | {"onnx", "jax"}
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_the_predictor_needs_onnxruntime_alone(tmp_path):
    path = export_onnx("classic_cnn", tmp_path)
    proc = subprocess.run([sys.executable, "-c", PREDICT_ONLY, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["(3, 10)", "[]"]
