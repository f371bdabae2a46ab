"""Fixtures: an empty working directory per test and its MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory: the MLflow store and outputs/ land here."""
    return tmp_path


@pytest.fixture
def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"
