"""Shared fixtures. Real parts only: real torch models, tiktoken, MLflow stores, subprocesses.

Tests run two workers on two cores (pytest -n 2): each process uses one torch thread, or
OpenMP threads of the two workers fight over the cores and everything runs many times slower.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "experiments" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches and downloaded runs go to a per-session directory, not ~/.cache."""
    os.environ["GPTX_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptx-cache"))


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory) -> str:
    """One real sqlite-backed MLflow store per test session (creating one costs seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


def gptx(*args, cwd=None, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess: ``python -m gptx ARGS``."""
    full_env = os.environ.copy() | (env or {})
    proc = subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptx {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_experiment(path: Path, body: str = "", data: Path = SHAKESPEARE, **sections) -> Path:
    """A tiny experiment TOML (2 layers, 32 wide, char tokenizer, tracking off) plus ``body``."""
    text = f'''
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[tokenizer]
kind = "char"

[data]
path = "{data}"

[training]
max_steps = 20
batch_size = 4
eval_interval = 10
eval_steps = 2
log_interval = 5
sample_tokens = 10
out_dir = "{path.parent / 'runs'}"

[tracking]
enabled = false
'''
    path.write_text(text + body)
    return path
