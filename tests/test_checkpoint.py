"""The portable checkpoint: atomic, verified, never unpickled."""

import pickle

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


def test_the_split_round_trips_and_a_checkpoint_without_one_still_loads(tmp_path):
    split = {"dataset": "mnist_5k", "split_seed": 4, "val_fraction": 0.1, "test_fraction": 0.2}
    assert ckpt_io.load(ckpt_io.save(tmp_path / "c.safetensors", sample(split=split))).split == split
    from safetensors.numpy import load_file, save_file  # an older checkpoint: no "split" in its metadata

    path = ckpt_io.save(tmp_path / "old.safetensors", sample())
    meta = ckpt_io._metadata(path.read_bytes())
    del meta["split"]
    save_file(load_file(path), path, metadata=meta)
    assert ckpt_io.load(path).split == {}
