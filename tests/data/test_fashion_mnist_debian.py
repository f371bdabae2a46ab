"""The real Fashion-MNIST as Debian's dataset-fashion-mnist package installs it, loaded offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnrun.data import fashion_mnist, load_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason=f"{DEBIAN_DIR} is missing: install it with `apt-get install dataset-fashion-mnist`",
)


def test_debian_copy_loads_offline_with_the_official_shapes(make_cfg, tmp_path):
    assert str(DEBIAN_DIR) in fashion_mnist.SYSTEM_DIRS
    cfg = make_cfg("fashion_mnist", download=False, val_fraction=0.1)
    ds = load_dataset(cfg)
    assert ds.source == str(DEBIAN_DIR)
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.test) == 10000
    assert ds.split_sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert ds.train.images.shape[1:] == (28, 28, 1) and ds.train.images.dtype == np.uint8
    train_val = np.concatenate([ds.train.labels, ds.val.labels])
    assert np.bincount(train_val, minlength=10).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels, minlength=10).tolist() == [1000] * 10
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [600] * 10  # stratified
    assert ds.class_names[9] == "Ankle boot"
    # decoded once into the cache (under CNNRUN_DATA_DIR, never under /usr/share)
    assert list((tmp_path / "data-home" / "fashion_mnist").glob("*.npy"))
    assert load_dataset(cfg).digest() == ds.digest()
