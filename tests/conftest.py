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


# ---- the web page's browser: one Playwright per worker ------------------------------------------
# Playwright's sync API refuses a second instance while one runs in the process, so every module
# that opens the page takes these fixtures rather than starting its own.

@pytest.fixture(scope="session")
def web_cache(request, tmp_path_factory):
    """GPTX_CACHE_DIR for the page's servers: `gptx web --install` puts the pinned packages there (in
    pytest's cache, so a later session finds them and npm only checks them)."""
    from pathlib import Path

    from helpers import install_web_packages, once

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("gptx-web")) if cache is not None else tmp_path_factory.mktemp("gptx-web")
    return once("web-install", lambda: install_web_packages(root))


@pytest.fixture(scope="session")
def browser():
    from gptx.export.browser import chromium, launch

    assert chromium().is_file(), f"{chromium()} is missing: apt-get install -y chromium (.ci/run installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)  # the same Chromium, found the same way, as gptx bench's web backend
        yield b
        b.close()


@pytest.fixture
def page(browser):
    p = browser.new_page(viewport={"width": 1000, "height": 720})
    errors = []
    p.on("pageerror", lambda err: errors.append(str(err)))
    yield p
    p.close()
    assert not errors, errors
