"""trainer.resume: which checkpoint ``last`` finds, and every reason a checkpoint cannot continue this run.

In-process and framework-free (the CLI and the resumed training itself are tested in tests/tasks/test_resume.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun.context import RunContext
from cnnrun.errors import UserError
from cnnrun.resume import find_last, load_for_resume, spec_differences
from cnnrun.spec.init import initial_weights
from tests.helpers import composed_config


SMALL = ["model.layers.0.filters=4", "model.layers.2.filters=4", "model.layers.5.units=16"]  # classic_cnn, shrunk


def _context(tmp_path, *overrides):
    return RunContext.create(composed_config(SMALL + list(overrides)), tmp_path, {}, [])


def _save(path, ctx, *, spec=None, weights=None, progress=None, training_state=None, framework="torch"):
    """A checkpoint of the run ``ctx`` describes, as the train task writes it after an epoch; keywords change it."""
    model = ctx.compiled
    return ckpt_io.save(path, ckpt_io.Checkpoint(
        weights=initial_weights(model, 0) if weights is None else weights,
        spec=model.spec if spec is None else spec,
        input_shape=model.input_shape,
        class_names=tuple(str(d) for d in range(model.num_classes)),
        mean=(33.5,), std=(78.7,),
        origin={"framework": framework},
        progress={"epoch": 1, "batch": 0} if progress is None else progress,
        training_state={"rng/seed": np.zeros(4, np.uint8)} if training_state is None else training_state,
    ))


def _last(root, relative, mtime):
    path = root / relative / "checkpoints" / "last.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_find_last_picks_the_newest_under_outputs_and_multirun(tmp_path):
    _last(tmp_path, "outputs/2026-01-01/10-00-00-a", 1_000)
    newest = _last(tmp_path, "multirun/2026-01-02/09-00-00/3-a", 3_000)
    _last(tmp_path, "outputs/2026-01-02/11-00-00-a", 2_000)
    _last(tmp_path, "elsewhere/run", 9_000)  # not a Hydra output folder
    (tmp_path / "outputs" / "last.safetensors").write_bytes(b"x")  # not in a checkpoints/ folder
    assert find_last(tmp_path) == newest


@pytest.mark.parametrize("folder", ["outputs", "multirun"])
def test_find_last_searches_each_output_root(tmp_path, folder):
    path = _last(tmp_path, f"{folder}/day/run", 1_000)
    assert find_last(tmp_path) == path


def test_find_last_with_nothing_to_resume_names_the_places_searched(tmp_path):
    with pytest.raises(UserError) as err:
        find_last(tmp_path)
    assert str(err.value) == (
        f"trainer.resume=last: no checkpoints/last.safetensors under {tmp_path / 'outputs'}, "
        f"{tmp_path / 'multirun'}; give the path instead: trainer.resume=PATH"
    )


def test_a_fitting_checkpoint_is_loaded(tmp_path):
    path = _save(tmp_path / "last.safetensors", _context(tmp_path))
    found, ckpt = load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    assert found == path and ckpt.progress == {"epoch": 1, "batch": 0} and set(ckpt.training_state) == {"rng/seed"}


def test_resume_last_looks_under_the_working_directory(tmp_path, monkeypatch):
    path = _save(tmp_path / "outputs" / "day" / "run" / "checkpoints" / "last.safetensors", _context(tmp_path))
    monkeypatch.chdir(tmp_path)
    found, _ = load_for_resume(_context(tmp_path, "trainer.resume=last"))
    assert found.resolve() == path.resolve()


def test_a_checkpoint_of_another_model_lists_the_layers_that_differ(tmp_path):
    other = _context(tmp_path, "model.layers.0.filters=8", "model.layers.5.units=24")
    path = _save(tmp_path / "last.safetensors", other)
    with pytest.raises(UserError) as err:
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    lines = str(err.value).split("\n")
    assert lines[0] == f"trainer.resume={path}: {path} was trained with a different model:"
    assert [line.split(":")[0] for line in lines[1:]] == ["  model.layers[0]", "  model.layers[5]"]
    assert "filters: 8" in lines[1] and "filters: 4" in lines[1]


def test_a_checkpoint_whose_spec_is_invalid_is_refused_as_a_user_error(tmp_path):
    ctx = _context(tmp_path)
    spec = {**ctx.compiled.spec, "layers": [{"type": "conv2d", "filters": 0, "kernel": 3}]}
    path = _save(tmp_path / "last.safetensors", ctx, spec=spec)
    with pytest.raises(UserError) as err:
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    text = str(err.value)
    assert text.startswith(f"trainer.resume={path}: checkpoint {path}") and "model.layers[0].filters" in text


def test_tensors_that_do_not_fit_are_refused(tmp_path):
    ctx = _context(tmp_path)
    weights = initial_weights(ctx.compiled, 0)
    weights["conv2d_0/bias"] = np.zeros(3, np.float32)
    path = _save(tmp_path / "last.safetensors", ctx, weights=weights)
    with pytest.raises(UserError) as err:
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    assert str(err.value).split("\n") == [f"checkpoint {path} does not fit this model:",
                                          "  conv2d_0/bias: checkpoint (3,), model (4,)"]


@pytest.mark.parametrize("state", [{"training_state": {}}, {"progress": {"batch": 3}}], ids=["no-state", "no-epoch"])
def test_a_weights_only_checkpoint_is_refused(tmp_path, state):
    path = _save(tmp_path / "best.safetensors", _context(tmp_path), **state)
    with pytest.raises(UserError, match="holds weights only .* resume from the run's checkpoints/last.safetensors"):
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))


def test_a_checkpoint_of_another_framework_is_refused(tmp_path):
    path = _save(tmp_path / "last.safetensors", _context(tmp_path), framework="chainer")
    with pytest.raises(UserError) as err:
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    assert str(err.value) == (
        f"trainer.resume={path}: {path} was written by framework=chainer; optimizer state does not carry across "
        "frameworks, so resume with framework=chainer (task=eval reads any)"
    )


def test_spec_differences_line_by_line():
    conv = {"type": "conv2d", "filters": 4, "kernel": [3, 3]}
    dense = {"type": "dense", "units": 10, "activation": "relu"}
    stored = {"layers": [conv, {"type": "flatten"}, dense]}
    current = {"layers": [conv, {"type": "flatten", "name": "f"}]}
    assert spec_differences(stored, current) == [
        "model.layers[1]: checkpoint {type: flatten}, this run {type: flatten, name: f}",
        "model.layers[2]: checkpoint {type: dense, units: 10, activation: relu}, this run (none)",
    ]
    assert spec_differences(current, stored)[1] == (
        "model.layers[2]: checkpoint (none), this run {type: dense, units: 10, activation: relu}"
    )
    assert spec_differences(stored, stored) == [] and spec_differences({}, {}) == []


def test_a_residual_block_is_summarised_without_its_body():
    block = {"type": "residual", "layers": [{"type": "conv2d", "filters": 4, "kernel": 3}]}
    (line,) = spec_differences({"layers": [block]}, {"layers": [{**block, "name": "r"}]})
    assert line == "model.layers[0]: checkpoint {type: residual}, this run {type: residual, name: r}"


def test_a_damaged_checkpoint_names_the_setting(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError) as err:
        load_for_resume(_context(tmp_path, f"trainer.resume={path}"))
    assert str(err.value).startswith(f"trainer.resume={path}: checkpoint {path} is not a cnnrun checkpoint")
