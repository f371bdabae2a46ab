"""Native formats through the real CLI: each file reloaded in its own framework gives the checkpoint's logits,
and writing it imports no other framework.

The checkpoint holds a case of tests/backends/test_equivalence.py (uneven 'same' padding, padded max and
average pooling, a residual block with its projection, batchnorm on maps and on a flattened vector); the
reference is PyTorch's runner on the same weights, computed by the equivalence worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnrun.export import FORMATS
from tests.backends.test_equivalence import LOGITS_ATOL, REFERENCE, Results, Variant, write_cases
from tests.export.test_onnx_export import checkpoint_for
from tests.helpers import ROOT
from tests.test_lazy_imports import ALLOWED, loaded_after

pytestmark = pytest.mark.slow

CASE = "stress_rgb"
WORKER = Path(__file__).with_name("reload_worker.py")
NATIVE = [name for name, fmt in FORMATS.items() if fmt.framework is not None]


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The case's checkpoint and images, and the reference framework's logits for them."""
    folder = tmp_path_factory.mktemp("native_export")
    cases = [c for c in write_cases(folder, lambda name, spec: [{"kind": "forward"}]) if c["name"] == CASE]
    reference = Results({"folder": folder, "cases": cases})(Variant(REFERENCE, REFERENCE))
    images = np.load(folder / f"{CASE}.npz")["images"]
    np.save(folder / "images.npy", images)
    checkpoint = checkpoint_for(CASE, folder / "run" / "model.safetensors")
    return {"folder": folder, "checkpoint": checkpoint, "logits": reference[f"{CASE}/forward/logits"]}


def test_every_native_format_is_reloaded_here():
    assert set(NATIVE) == {"torchscript", "saved_model", "keras"}
    from tests.export.reload_worker import RELOADERS

    assert set(RELOADERS) == set(NATIVE)


@pytest.mark.parametrize("fmt", NATIVE)
def test_native_export_reloads_with_the_checkpoints_logits(staged, fmt, tmp_path):
    loaded = loaded_after(["task=export", f"checkpoint={staged['checkpoint']}", f"export.format={fmt}"], tmp_path)
    assert loaded <= ALLOWED[FORMATS[fmt].framework], f"exporting {fmt} imported {loaded}"
    exported = staged["checkpoint"].with_suffix(FORMATS[fmt].suffix)  # the default: beside the checkpoint
    assert exported.exists()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    out = tmp_path / "logits.npy"
    proc = subprocess.run(
        [sys.executable, str(WORKER), fmt, str(exported), str(staged["folder"] / "images.npy"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    np.testing.assert_allclose(np.load(out), staged["logits"], rtol=0, atol=LOGITS_ATOL)
