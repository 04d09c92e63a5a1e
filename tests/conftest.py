"""Shared fixtures. Real parts only: real torch models, tiktoken, MLflow stores, subprocesses.

Tests run two workers on two cores (pytest -n 2): each process uses one torch thread, or
OpenMP threads of the two workers fight over the cores and everything runs many times slower.
"""
import os
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches and downloaded runs go to a per-session directory, not ~/.cache."""
    os.environ["GPTX_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptx-cache"))


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory) -> str:
    """One real sqlite-backed MLflow store per test session (creating one costs seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (the FIELD-NOTES recipe), stopped by its PID."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    d = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    server = type("Server", (), {"url": url, "proc": proc, "dir": d})
    yield server
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()
