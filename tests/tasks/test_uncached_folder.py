"""dataset=folder with dataset.cache=false, end to end: an image that breaks during a run stops it with the file's
name, exit code 2 and a FAILED MLflow run; nothing hangs and nothing is cached but the channel statistics."""

import os

import pytest
from PIL import Image

from cnnrun.config import DatasetConfig
from cnnrun.data import load_dataset
from tests.helpers import mlflow_runs, run_cli


@pytest.mark.slow
def test_an_image_that_breaks_mid_run_fails_the_run_naming_it(workdir, tracking_uri, monkeypatch):
    root = workdir / "images"
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (12, 12), (120 * k, 10 * i, 60)).save(root / name / f"{i}.png")
    home = workdir / "data-home"
    monkeypatch.setenv("CNNRUN_DATA_DIR", str(home))
    settings = dict(name="folder", num_classes=2, channels=3, image_size=(8, 8), root=str(root), cache=False,
                    val_fraction=0.0, test_fraction=0.0)
    load_dataset(DatasetConfig(**settings))  # a run before this one: the statistics are kept, no images

    # Bit rot after the run started: same size and modification time, so nothing tells before it is decoded.
    broken = root / "b" / "7.png"
    stat = broken.stat()
    broken.write_bytes(b"\0" * stat.st_size)
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    result = run_cli(["dataset=folder", f"dataset.root={root}", "dataset.num_classes=2", "dataset.image_size=[8,8]",
                      "dataset.cache=false", "dataset.val_fraction=0", "dataset.test_fraction=0",
                      "trainer.batch_size=4", "trainer.epochs=1", "device=cpu", f"tracking.uri={tracking_uri}",
                      "tracking.log_model=false"], workdir, env={"CNNRUN_DATA_DIR": str(home)}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{broken}: " in result.stderr and "dataset.cache=false" in result.stderr
    _, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FAILED"
    assert [p.suffix for p in home.rglob("*") if p.is_file()] == [".json"]  # no decoded images cached
