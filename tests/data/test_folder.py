"""dataset=folder on generated PNG/JPEG trees: layouts, conversion, resizing, caching and every error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnrun.data import folder, load_dataset
from cnnrun.errors import UserError

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


def _tree(base: Path, per_class: int = 10, classes=COLOURS, size=(12, 10), fmt="png") -> Path:
    """One folder per class of solid-colour images, each a little different."""
    for name, rgb in classes.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", size, tuple(max(0, c - i) for c in rgb))
            img.save(base / name / f"{i:03d}.{fmt}")
    return base


def _cfg(make_cfg, root, **kw):
    kw.setdefault("num_classes", 3)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("test_fraction", 0.2)
    return make_cfg("folder", root=str(root), **kw)


def test_flat_tree_is_split_stratified(tmp_path, make_cfg):
    root = _tree(tmp_path / "pets")
    ds = load_dataset(_cfg(make_cfg, root))
    assert ds.class_names == ("cat", "dog", "fox")
    assert ds.split_sizes() == {"train": 18, "val": 6, "test": 6}
    for split in (ds.train, ds.val, ds.test):
        assert np.bincount(split.labels, minlength=3).min() == np.bincount(split.labels).max()
    assert ds.train.images.shape[1:] == (8, 8, 3)
    red = ds.train.images[ds.train.labels == 0]
    assert (red[..., 0] > 200).all() and (red[..., 1:] == 0).all()  # RGB order kept, resize didn't smear
    assert ds.source == str(root)
    again = load_dataset(_cfg(make_cfg, root))
    assert again.digest() == ds.digest()
    other_seed = load_dataset(_cfg(make_cfg, root, split_seed=1))
    assert other_seed.digest() != ds.digest()


def test_grayscale_and_resize(tmp_path, make_cfg):
    root = _tree(tmp_path / "g", per_class=3, size=(40, 20), fmt="jpg")
    ds = load_dataset(_cfg(make_cfg, root, channels=1, image_size=(16, 24), val_fraction=0.0, test_fraction=0.0))
    assert ds.train.images.shape == (9, 16, 24, 1)
    greens = ds.train.images[ds.train.labels == 1]
    assert abs(int(greens.mean()) - 150) < 5  # L = 0.587 G for pure green
    assert ds.input_shape == (1, 16, 24)


def test_train_val_test_folders_are_honoured(tmp_path, make_cfg):
    for part, n in (("train", 6), ("val", 2), ("test", 3)):
        _tree(tmp_path / "d" / part, per_class=n)
    ds = load_dataset(_cfg(make_cfg, tmp_path / "d"))
    assert ds.split_sizes() == {"train": 18, "val": 6, "test": 9}


def test_missing_val_is_carved_from_train(tmp_path, make_cfg):
    _tree(tmp_path / "d" / "train", per_class=10)
    _tree(tmp_path / "d" / "test", per_class=2)
    ds = load_dataset(_cfg(make_cfg, tmp_path / "d", val_fraction=0.3, test_fraction=0.5))
    assert ds.split_sizes() == {"train": 21, "val": 9, "test": 6}  # test_fraction unused: test/ exists
    assert not ds.test_is_carved  # so task=eval need not hold the split keys to training's


def test_train_only_carves_both(tmp_path, make_cfg):
    _tree(tmp_path / "d" / "train", per_class=10)
    ds = load_dataset(_cfg(make_cfg, tmp_path / "d"))
    assert ds.split_sizes() == {"train": 18, "val": 6, "test": 6}


def test_corrupt_images_are_listed(tmp_path, make_cfg):
    root = _tree(tmp_path / "p", per_class=4)
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (root / "cat" / "000.png").read_bytes()
    (root / "cat" / "half.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError) as err:
        load_dataset(_cfg(make_cfg, root))
    text = str(err.value)
    assert "2 image(s)" in text and str(root / "dog" / "bad.png") in text and str(root / "cat" / "half.png") in text


def test_many_corrupt_images_are_counted(tmp_path, make_cfg):
    root = _tree(tmp_path / "p", per_class=1)
    for i in range(15):
        (root / "fox" / f"junk{i:02d}.jpg").write_bytes(b"junk")
    with pytest.raises(UserError) as err:
        load_dataset(_cfg(make_cfg, root))
    assert "15 image(s)" in str(err.value) and "and 5 more" in str(err.value)
    assert str(err.value).count("junk") == 10


def test_empty_class_folder_is_named(tmp_path, make_cfg):
    root = _tree(tmp_path / "p", per_class=2)
    (root / "owl").mkdir()
    (root / "owl" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=f"empty class folder.*{root / 'owl'}"):
        load_dataset(_cfg(make_cfg, root, num_classes=4))


def test_hidden_entries_are_ignored(tmp_path, make_cfg):
    root = _tree(tmp_path / "p", per_class=5)
    (root / ".thumbnails").mkdir()
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    assert load_dataset(_cfg(make_cfg, root)).num_classes == 3


def test_num_classes_must_match(tmp_path, make_cfg):
    root = _tree(tmp_path / "p", per_class=5)
    with pytest.raises(UserError, match="num_classes is 2 but folder has 3"):
        load_dataset(_cfg(make_cfg, root, num_classes=2))


@pytest.mark.parametrize("root, message", [(None, "dataset.root: required with dataset=folder"),
                                           ("/no/such/dir", "no such folder")])
def test_root_problems(make_cfg, root, message):
    with pytest.raises(UserError, match=message):
        load_dataset(make_cfg("folder", num_classes=2, root=root))


def test_layout_problems(tmp_path, make_cfg):
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(UserError, match="no class folders"):
        load_dataset(_cfg(make_cfg, tmp_path / "loose"))
    _tree(tmp_path / "noval" / "val", per_class=1)
    with pytest.raises(UserError, match="but no train/ folder"):
        load_dataset(_cfg(make_cfg, tmp_path / "noval"))
    _tree(tmp_path / "odd" / "train", per_class=2)
    _tree(tmp_path / "odd" / "test", per_class=1, classes={"cat": (1, 1, 1), "emu": (2, 2, 2)})
    with pytest.raises(UserError, match="emu are not in"):
        load_dataset(_cfg(make_cfg, tmp_path / "odd"))
    with pytest.raises(UserError, match="grayscale \\(1\\) or RGB \\(3\\)"):
        load_dataset(_cfg(make_cfg, tmp_path / "odd", channels=4))


def test_decoded_images_are_cached_and_invalidated(tmp_path, make_cfg, monkeypatch):
    root = _tree(tmp_path / "p", per_class=5)
    first = load_dataset(_cfg(make_cfg, root))
    real = folder.decode_image
    monkeypatch.setattr(folder, "decode_image", lambda *a: pytest.fail("decoded despite the cache"))
    assert load_dataset(_cfg(make_cfg, root)).digest() == first.digest()
    Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "cat" / "000.png")
    os.utime(root / "cat" / "000.png", ns=(10**9, 10**9))  # a changed file: other mtime
    calls = []
    monkeypatch.setattr(folder, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    assert load_dataset(_cfg(make_cfg, root)).digest() != first.digest()
    assert len(calls) == 15
    calls.clear()
    load_dataset(_cfg(make_cfg, root, image_size=(6, 6)))  # another size: another cache entry
    assert len(calls) == 15


def test_sixteen_bit_and_palette_images(tmp_path, make_cfg):
    root = tmp_path / "modes"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "a" / "deep.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.info["transparency"] = 0
    pal.save(root / "b" / "pal.png", transparency=0)
    ds = load_dataset(make_cfg("folder", root=str(root), num_classes=2, channels=1, val_fraction=0, test_fraction=0))
    deep = ds.train.images[ds.train.labels == 0]
    assert int(deep.max()) == 40000 >> 8  # scaled to 8 bits, not clipped at 255
