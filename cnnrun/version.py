"""``cnnrun --version``: cnnrun's version and the versions of the stack it runs on, read without importing it.

cnnrun's own version has one source, ``cnnrun.__version__`` (pyproject.toml reads it from there too); the others
come from the installed packages' metadata, so the report costs no framework import.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import List, Sequence

import cnnrun

CORE_STACK = ("hydra-core", "omegaconf", "pydantic", "numpy", "mlflow")
# The packages of cnnrun.backends.BACKENDS, named here because importing that table builds the spec's pydantic
# classes, which would cost --version more than everything else (tests/test_cli.py keeps the two equal).
FRAMEWORK_PACKAGES = ("torch", "tensorflow", "keras", "chainer")


def installed(distributions: Sequence[str]) -> List[str]:
    """'name version' for each distribution, 'name (not installed)' for the missing ones."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return found


def report() -> str:
    return "\n".join([
        f"cnnrun {cnnrun.__version__}",
        f"Python {platform.python_version()}, " + ", ".join(installed(CORE_STACK)),
        "frameworks: " + ", ".join(installed(FRAMEWORK_PACKAGES)),
    ])
