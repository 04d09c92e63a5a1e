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
    """Token caches and downloaded runs go to a per-session directory, not ~/.cache; and the
    working directory is a scratch one, so whatever defaults to the working directory (MLflow's
    ./mlruns artifacts, ./runs) never lands in the checkout. Tests use absolute paths."""
    os.environ["GPTX_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptx-cache"))
    os.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory) -> str:
    """One real sqlite-backed MLflow store per test session (creating one costs seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the session, stopped by its PID at the end."""
    import signal
    import subprocess

    from helpers import start_mlflow_server

    d = tmp_path_factory.mktemp("mlflow-server")
    proc, url = start_mlflow_server(d)
    yield type("Server", (), {"url": url, "proc": proc, "dir": d})
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
