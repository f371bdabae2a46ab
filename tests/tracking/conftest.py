"""Real tracking servers for the tests: ``mlflow server`` in its own process group, and a throwaway PostgreSQL.

Each server runs in a new session (``start_new_session=True``) and its whole process group is killed at teardown,
so no uvicorn worker outlives a test. PostgreSQL runs from Debian's ``postgresql`` package binaries (initdb +
pg_ctl on a free port, socket in a temporary folder; as the ``postgres`` user when the tests run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest

from tests.tiny import free_port, kill_group, wait_until_up


class MlflowServer:
    def __init__(self, backend_uri: str, root: Path, port: Optional[int] = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / f"mlflow-server-{self.port}.log"
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
        command += ["server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts"),
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # no background job workers (huey consumers: seven extra processes the tests never use)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=root, env=env)

    def wait(self, timeout: float = 120) -> "MlflowServer":
        wait_until_up(self.process, f"{self.url}/health", self.log, "mlflow server", timeout)
        return self

    def kill(self) -> None:
        """Kill the server's whole process group (uvicorn and its workers) at once."""
        kill_group(self.process)


@pytest.fixture
def mlflow_server(tmp_path):
    """Factory: ``mlflow_server(backend_uri)`` starts a server, waits for /health, stops it at teardown."""
    started: List[MlflowServer] = []

    def start(backend_uri: Optional[str] = None) -> MlflowServer:
        root = tmp_path / f"server{len(started)}"
        server = MlflowServer(backend_uri or f"sqlite:///{root / 'mlflow.db'}", root)
        started.append(server)
        return server.wait()

    yield start
    for server in started:
        server.kill()


def _postgres_bin() -> Optional[Path]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres_uri():
    """A fresh PostgreSQL cluster on a free port: yields a SQLAlchemy URI for an empty database 'mlflow'."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 (psycopg2-binary) is needed for postgresql:// URIs")
    as_user: List[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cnnrun-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as Debian's postgres user
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*command: str) -> None:
        result = subprocess.run(as_user + list(command), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "cnnrun", "-A", "trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "postgres.log"), "-w", "start")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="cnnrun", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; this environment has psycopg2(-binary)
        yield f"postgresql+psycopg2://cnnrun@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
