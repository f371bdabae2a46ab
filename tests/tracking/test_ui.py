"""The MLflow UI over a store cnnrun filled (a two-job sweep), checked in a real headless Chromium.

Screenshots go to $CNNRUN_TEST_ARTIFACTS (default tests/artifacts/, git-ignored): look at them after a run.
MLflow 3.17's UI opens every experiment in its GenAI view unless the URL says ``?workflowType=machine_learning``
(or the user picks "Model training" at the top left); the experiment's ``mlflow.experimentKind`` tag that cnnrun
sets is what older 3.x releases use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, mlflow_runs, run_cli
from tests.tiny import TINY

CHROMIUM = os.environ.get("CNNRUN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ML_VIEW = "workflowType=machine_learning"


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CNNRUN_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shots(request) -> Path:
    folder = Path(os.environ.get("CNNRUN_TEST_ARTIFACTS", ROOT / "tests" / "artifacts")) / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _close_assistant(page) -> None:
    close = page.locator('button[aria-label="Close"]')
    if close.count():
        close.first.click()


@pytest.mark.slow
def test_ui_shows_the_sweep_its_runs_metrics_and_plots(workdir, mlflow_server, browser, shots):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = [a for a in TINY if not a.startswith("tracking.log_model")]  # the model too, as a user gets it
    result = run_cli(["-m"] + args + [f"tracking.uri={uri}", "optimizer.lr=1e-3,3e-3"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(uri)
    (parent,) = [r for r in runs if r.data.tags["cnnrun.task"] == "sweep"]
    children = sorted((r for r in runs if r.data.tags["cnnrun.task"] == "train"), key=lambda r: r.info.run_name)
    best = client.get_run(parent.data.tags["cnnrun.sweep.best_run_id"])
    experiment = parent.info.experiment_id
    server = mlflow_server(uri)

    page = browser.new_page(viewport={"width": 1800, "height": 1000})
    page.set_default_timeout(60_000)

    # the experiment page: the sweep's parent run, expanded to show its two children, with metric columns
    page.goto(f"{server.url}/#/experiments/{experiment}?{ML_VIEW}", wait_until="load")
    page.get_by_text(parent.info.run_name).first.wait_for()
    _close_assistant(page)
    assert page.get_by_text("Model training").first.is_visible()
    page.locator(".ag-row").first.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for child in children:
        page.get_by_text(child.info.run_name).first.wait_for()
    page.get_by_role("button", name="Columns").click()
    for metric in ("kept_val_acc", "test_acc"):
        page.get_by_text(metric, exact=True).first.click()
    page.keyboard.press("Escape")
    header = page.locator(".ag-header")
    header.get_by_text("kept_val_acc").first.wait_for()
    page.screenshot(path=shots / "experiment_runs.png")
    table = page.locator(".ag-center-cols-container, .ag-body").first.inner_text()
    for child in children:
        assert f"{child.data.metrics['kept_val_acc']:.3f}"[:4] in table  # values shown, whatever their rounding

    # the best child's run page: metrics, and its parent run
    page.goto(f"{server.url}/#/experiments/{experiment}/runs/{best.info.run_id}?{ML_VIEW}", wait_until="load")
    page.get_by_text("Parent run").first.wait_for()
    _close_assistant(page)
    page.get_by_role("link", name=parent.info.run_name).first.wait_for()
    for metric in ("kept_val_acc", "test_acc", "val_loss"):
        page.get_by_text(metric, exact=True).first.wait_for()
    page.get_by_text("Logged models").first.wait_for()
    page.screenshot(path=shots / "run_overview.png", full_page=True)

    # its artifacts: both plots are there and render as images
    for name in ("learning_curve.png", "confusion_matrix.png"):
        page.goto(f"{server.url}/#/experiments/{experiment}/runs/{best.info.run_id}/artifacts?{ML_VIEW}",
                  wait_until="load")
        page.get_by_text(name, exact=True).first.click()
        image = page.locator(f'img[alt="{name}"]').first
        image.wait_for()
        assert image.evaluate("img => img.complete && img.naturalWidth > 100")
        _close_assistant(page)
        page.screenshot(path=shots / f"artifact_{name}")

    # the parent run: the sweep's summary table as its description, and its child runs
    page.goto(f"{server.url}/#/experiments/{experiment}/runs/{parent.info.run_id}?{ML_VIEW}", wait_until="load")
    page.get_by_text("ranked by").first.wait_for()
    _close_assistant(page)
    page.get_by_text(best.info.run_id[:8]).first.wait_for()  # the description's table links each job's run
    for child in children:  # "Child runs" lists both
        page.get_by_role("link", name=child.info.run_name).first.wait_for()
    page.screenshot(path=shots / "parent_run.png", full_page=True)
    assert len(list(shots.glob("*.png"))) == 5
