"""The checks a run makes before it loads anything: they read the raw config and name each problem's key."""

import dataclasses

import pytest

from cnnrun import preflight
from cnnrun.backends import BACKENDS


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "mlruns", "/abs/mlruns",
                                 "file:///abs/mlruns", "postgresql://u@db/mlflow", "postgresql+psycopg2://u@db/m",
                                 "mysql+pymysql://u@db/m", "http://127.0.0.1:5000", "https://mlflow.example.com",
                                 "databricks"])
def test_tracking_uris_mlflow_takes_pass(uri):
    assert preflight.tracking_uri_problem(uri) is None


@pytest.mark.parametrize("uri, fragment", [("htp://host:5000", "unknown scheme 'htp' (did you mean 'http'?)"),
                                           ("sqlite://mlflow.db", "three slashes"), ("http://", "names no host"),
                                           ("  ", "empty")])
def test_malformed_tracking_uris_are_named(uri, fragment):
    assert fragment in preflight.tracking_uri_problem(uri)


def test_a_framework_that_is_not_installed_is_a_problem_without_importing_it(monkeypatch):
    monkeypatch.setitem(BACKENDS, "torch", dataclasses.replace(BACKENDS["torch"], package="no_such_framework_pkg"))
    problems = preflight.problems({"task": "validate", "framework": {"name": "torch"}})
    assert [(p.key, "needs the no_such_framework_pkg package" in p.message) for p in problems] == [
        ("framework.name", True)]


def test_keras_needs_the_framework_it_runs_on(monkeypatch):
    monkeypatch.setitem(BACKENDS, "torch", dataclasses.replace(BACKENDS["torch"], package="no_such_framework_pkg"))
    raw = {"task": "validate", "framework": {"name": "keras", "backend": "torch"}}
    assert [p.key for p in preflight.problems(raw)] == ["framework.name"]


def test_summary_needs_none_of_it():
    assert preflight.problems({"task": "summary", "dataset": {"name": "mnsit"}, "checkpoint": "/nope"}) == []


def _precision_problems(framework: str, device: str, precision: str):
    raw = {"task": "validate", "framework": {"name": framework}, "device": {"name": device},
           "trainer": {"precision": precision}}
    return [p for p in preflight.problems(raw) if p.key == "trainer.precision"]


@pytest.mark.parametrize("framework, device, precision, refused", [
    ("chainer", "cpu", "fp16", True), ("chainer", "cuda:1", "bf16", True), ("chainer", "auto", "bf16", True),
    ("chainer", "cuda", "fp16", False), ("chainer", "auto", "fp16", False),  # auto: the runner checks the device
    ("chainer", "cpu", "fp32", False), ("torch", "cpu", "fp16", False), ("keras", "cpu", "bf16", False),
    ("tensorflow", "cuda", "bf16", False),
])
def test_a_precision_the_framework_cannot_run_on_the_device_is_a_problem(framework, device, precision, refused):
    problems = _precision_problems(framework, device, precision)
    assert bool(problems) == refused
    if refused:  # what it can, and which frameworks can run the precision
        assert f"framework={framework}" in problems[0].message
        assert "runs with framework='torch', 'tensorflow' or 'keras'" in problems[0].message
