"""A sweep tracked through ``mlflow server`` whose backend store is a real PostgreSQL database."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli
from tests.tiny import TINY, rest_runs


@pytest.mark.slow
def test_sweep_through_a_server_on_postgresql(workdir, postgres_uri, mlflow_server):
    server = mlflow_server(postgres_uri)
    result = run_cli(["-m"] + TINY + [f"tracking.uri={server.url}", "optimizer.lr=1e-3,3e-3"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = rest_runs(server.url)
    parents = [r for r in runs if r["tags"].get("cnnrun.task") == "sweep"]
    children = [r for r in runs if r["tags"].get("cnnrun.task") == "train"]
    (parent,) = parents
    assert len(children) == 2 and all(r["info"]["status"] == "FINISHED" for r in runs)
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parent["info"]["run_id"]}
    assert {c["tags"]["cnnrun.sweep.job"] for c in children} == {"0", "1"}
    assert parent["tags"]["cnnrun.sweep.best_run_id"] in {c["info"]["run_id"] for c in children}
    assert parent["metrics"]["kept_val_acc"] == max(c["metrics"]["kept_val_acc"] for c in children)
    # the database really is PostgreSQL: MLflow's tables are there
    import psycopg2

    with psycopg2.connect(postgres_uri.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == 3
