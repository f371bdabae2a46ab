"""The portable checkpoint: atomic, verified, never unpickled."""

import pickle
import tempfile
import time
from datetime import datetime

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun.errors import UserError


def sample(**overrides):
    data = dict(
        weights={"conv2d_0/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                 "conv2d_0/bias": np.ones(2, np.float32)},
        spec={"name": "t", "layers": [{"type": "conv2d", "filters": 2, "kernel": 2}]},
        input_shape=(3, 8, 8),
        class_names=("a", "b"),
        mean=(1.0, 2.0, 3.0),
        std=(4.0, 5.0, 6.0),
        origin={"framework": "torch"},
        progress={"epoch": 3},
        training_state={"conv2d_0/kernel/exp_avg": np.zeros((2, 3, 2, 2), np.float32)},
    )
    data.update(overrides)
    return ckpt_io.Checkpoint(**data)


def test_round_trip(tmp_path):
    path = ckpt_io.save(tmp_path / "sub" / "c.safetensors", sample())
    back = ckpt_io.load(path)
    assert back.spec["name"] == "t" and back.input_shape == (3, 8, 8) and back.class_names == ("a", "b")
    assert back.progress == {"epoch": 3} and back.origin == {"framework": "torch"}
    np.testing.assert_array_equal(back.weights["conv2d_0/kernel"], sample().weights["conv2d_0/kernel"])
    assert set(back.training_state) == {"conv2d_0/kernel/exp_avg"}
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]  # no temporary file left


def test_truncated_file_is_refused(tmp_path):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(UserError, match="damaged|not a cnnrun checkpoint"):
        ckpt_io.load(path)


def test_flipped_tensor_byte_is_refused(tmp_path):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="do not match the checksum"):
        ckpt_io.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(UserError, match="not a cnnrun checkpoint"):
        ckpt_io.load(path)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match="not a cnnrun checkpoint"):
        ckpt_io.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ckpt_io.load(tmp_path / "nope.safetensors")


def test_check_matches_names_the_layers_that_differ():
    ckpt = sample()
    with pytest.raises(UserError) as err:
        ckpt_io.check_matches(ckpt, {"conv2d_0/kernel": (4, 3, 2, 2), "dense_1/kernel": (10, 4)})
    text = str(err.value)
    assert "missing: dense_1/kernel" in text and "not in the model: conv2d_0/bias" in text
    assert "conv2d_0/kernel: checkpoint (2, 3, 2, 2), model (4, 3, 2, 2)" in text


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return fh.metadata()


def _rewrite_metadata(path, drop=(), **changes):
    """Save the same tensors with edited metadata: a checkpoint from another cnnrun version, or a damaged one."""
    from safetensors.numpy import load_file, save_file

    meta = {k: v for k, v in _header(path).items() if k not in drop}
    meta.update(changes)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_round_trip_keeps_normalisation_and_creates_missing_folders(tmp_path):
    path = ckpt_io.save(tmp_path / "run" / "checkpoints" / "last.safetensors", sample())
    back = ckpt_io.load(path)
    assert back.mean == (1.0, 2.0, 3.0) and back.std == (4.0, 5.0, 6.0)
    np.testing.assert_array_equal(back.training_state["conv2d_0/kernel/exp_avg"], np.zeros((2, 3, 2, 2)))


def test_a_model_without_weights_round_trips(tmp_path):
    """E.g. global pooling straight into softmax: the file is a header and no tensor bytes."""
    path = ckpt_io.save(tmp_path / "c.safetensors", sample(weights={}, training_state={}))
    back = ckpt_io.load(path)
    assert back.weights == {} and back.training_state == {} and back.spec["name"] == "t"


def test_the_header_states_format_version_and_creation_time(tmp_path):
    before = time.time()
    meta = _header(ckpt_io.save(tmp_path / "c.safetensors", sample()))
    assert meta["format"] == "cnnrun-checkpoint" and meta["version"] == "1"
    created = datetime.strptime(meta["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert before - 1 <= created <= time.time() + 1


def test_a_checkpoint_from_a_newer_cnnrun_is_refused(tmp_path):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    _rewrite_metadata(path, version="2")
    with pytest.raises(UserError, match="has format version 2; this cnnrun reads up to 1"):
        ckpt_io.load(path)


def test_optional_metadata_may_be_absent(tmp_path):
    """A header without version, origin or progress (written before they existed) reads as version 0, empty."""
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    _rewrite_metadata(path, drop=("version", "origin", "progress", "created"))
    back = ckpt_io.load(path)
    assert back.origin == {} and back.progress == {} and back.input_shape == (3, 8, 8)


def test_missing_required_metadata_is_refused(tmp_path):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    _rewrite_metadata(path, drop=("spec",))
    with pytest.raises(UserError, match=r"c.safetensors has incomplete metadata \('spec'\)"):
        ckpt_io.load(path)


@pytest.mark.parametrize("size,reason", [(5, "file shorter than a safetensors header"),
                                         (8, "header length exceeds the file"),
                                         (40, "header length exceeds the file")])
def test_a_truncated_header_is_named(tmp_path, size, reason):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(UserError, match=rf"is not a cnnrun checkpoint or is damaged .*: {reason}\)$"):
        ckpt_io.load(path)


def test_a_file_cut_inside_its_header_is_named(tmp_path):
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[: header_end - 4])
    with pytest.raises(UserError, match=r"header length exceeds the file\)$"):
        ckpt_io.load(path)


def test_the_temporary_file_is_written_beside_the_target(tmp_path, monkeypatch):
    """So that the final rename is atomic: the system's temporary folder may be another file system."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_folder"))
    path = ckpt_io.save(tmp_path / "c.safetensors", sample())
    assert ckpt_io.load(path).progress == {"epoch": 3}


def test_a_failed_save_raises_its_error_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "c.safetensors"
    (target / "occupied").mkdir(parents=True)  # a non-empty folder where the file should go: the rename fails
    with pytest.raises(UserError, match=f"cannot write checkpoint {target}: Is a directory"):
        ckpt_io.save(target, sample())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


@pytest.mark.parametrize("kind", ["missing", "extra", "wrong"])
def test_check_matches_refuses_each_kind_of_difference_alone(kind):
    expected = {k: tuple(v.shape) for k, v in sample().weights.items()}
    if kind == "missing":
        expected["dense_1/bias"] = (10,)
    elif kind == "extra":
        del expected["conv2d_0/bias"]
    else:
        expected["conv2d_0/bias"] = (3,)
    with pytest.raises(UserError, match="does not fit this model"):
        ckpt_io.check_matches(sample(), expected)
    ckpt_io.check_matches(sample(), {k: tuple(v.shape) for k, v in sample().weights.items()})  # an exact fit passes


def test_check_matches_message_lists_at_most_eight_of_each(tmp_path):
    weights = {f"extra_{i}/w": np.zeros(1, np.float32) for i in range(9)}
    weights.update({f"wrong_{i}/w": np.zeros(2, np.float32) for i in range(9)})
    expected = {f"missing_{i}/w": (1,) for i in range(9)}
    expected.update({f"wrong_{i}/w": (3,) for i in range(9)})
    with pytest.raises(UserError) as err:
        ckpt_io.check_matches(sample(weights=weights), expected, tmp_path / "c.safetensors")
    lines = str(err.value).split("\n")
    assert lines[0] == f"checkpoint {tmp_path / 'c.safetensors'} does not fit this model:"
    assert lines[1] == "  missing: " + ", ".join(f"missing_{i}/w" for i in range(8)) + " …"
    assert lines[2] == "  not in the model: " + ", ".join(f"extra_{i}/w" for i in range(8)) + " …"
    assert lines[3:] == [f"  wrong_{i}/w: checkpoint (2,), model (3,)" for i in range(8)]


def test_check_matches_without_a_path_and_with_exactly_eight():
    weights = {f"extra_{i}/w": np.zeros(1, np.float32) for i in range(8)}
    expected = {f"missing_{i}/w": (1,) for i in range(8)}
    with pytest.raises(UserError) as err:
        ckpt_io.check_matches(sample(weights=weights), expected)
    assert str(err.value).split("\n") == [
        "checkpoint does not fit this model:",
        "  missing: " + ", ".join(f"missing_{i}/w" for i in range(8)),
        "  not in the model: " + ", ".join(f"extra_{i}/w" for i in range(8)),
    ]


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "blocker").write_text("a file where the checkpoint folder should be")
    target = tmp_path / "blocker" / "c.safetensors"
    with pytest.raises(UserError) as err:
        ckpt_io.save(target, sample())
    assert str(err.value) == f"cannot write checkpoint {target}: File exists ({tmp_path / 'blocker'})"


def test_the_split_round_trips_and_a_checkpoint_without_one_still_loads(tmp_path):
    split = {"dataset": "mnist_5k", "split_seed": 4, "val_fraction": 0.1, "test_fraction": 0.2}
    assert ckpt_io.load(ckpt_io.save(tmp_path / "c.safetensors", sample(split=split))).split == split
    from safetensors.numpy import load_file, save_file  # an older checkpoint: no "split" in its metadata

    path = ckpt_io.save(tmp_path / "old.safetensors", sample())
    meta = ckpt_io._metadata(path.read_bytes())
    del meta["split"]
    save_file(load_file(path), path, metadata=meta)
    assert ckpt_io.load(path).split == {}
