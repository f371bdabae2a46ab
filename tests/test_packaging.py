"""The built wheel is a working cnnrun: it carries every config file and runs from outside the repository."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import CONF, ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: setuptools reuses a build/ folder left in a working tree, which can hide a missing file.
    source = tmp_path_factory.mktemp("source")
    for name in ("cnnrun", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("cnnrun-*.whl")
    return path


def test_the_wheel_ships_every_config_file(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cnnrun/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= shipped, sorted(expected - shipped)
    assert "cnnrun/backends/keras_home/keras.json" in shipped
    # the Ray launcher, in the namespace package Hydra searches for plugins (which must stay without __init__.py)
    assert "hydra_plugins/cnnrun_ray_launcher/ray_launcher.py" in shipped and "hydra_plugins/__init__.py" not in shipped
    assert not [name for name in shipped if "__pycache__" in name or name.startswith("tests/")]


def test_the_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The wheel's copy comes first on the path, so the repository's editable install is not what runs.
    code = "import cnnrun, sys; print(cnnrun.__file__, file=sys.stderr); from cnnrun.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "task=summary", "model=resnet_lite"], cwd=tmp_path,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.startswith(str(target))
    assert "total" in result.stdout
