"""Helpers shared by test modules (importable: pyproject puts tests/ on pythonpath)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "experiments" / "data" / "tinyshakespeare.txt"


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


def start_mlflow_server(d: Path) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1 (the FIELD-NOTES recipe) in its own process group,
    its store and log in ``d``. Returns the process and its URL once /health answers OK."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)


def tiny_checkpoint_and_export(root: Path, block_size: int = 32):
    """A 1-layer byte-level checkpoint (random weights, seed 0) in root/run and its verified ONNX
    export in root/export, made in-process. Returns (checkpoint dir, export dir)."""
    import torch

    from gptx import checkpoint
    from gptx.config import from_dict
    from gptx.export.onnx_export import export_checkpoint
    from gptx.model import GPT

    cfg = from_dict({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": block_size},
                     "tokenizer": {"kind": "byte"}})
    tok = checkpoint.build_tokenizer(cfg.tokenizer)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    ck = checkpoint.save(root / "run", 1, GPT(cfg.model), cfg, tok)
    export_checkpoint(ck, root / "export", log=lambda _msg: None, track=False)
    return ck, root / "export"


PLUGIN_PACKAGES = Path(__file__).resolve().parent / "plugin_packages"


def install_plugin_packages(tmp: Path, names: list[str]) -> Path:
    """pip-install the packages under tests/plugin_packages named ``names`` into a fresh
    ``--target`` directory (offline with this environment's setuptools); returns it. Put it on
    PYTHONPATH (``plugin_env``) for a subprocess to see the plugins."""
    import importlib.util
    import shutil

    sources = []
    for name in names:  # build from copies: setuptools writes build/ and *.egg-info in place
        shutil.copytree(PLUGIN_PACKAGES / name, tmp / name, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        sources.append(str(tmp / name))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target", str(target)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd += ["--no-build-isolation", "--no-index"]
    proc = subprocess.run(cmd + sources, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def plugin_env(site: Path, load: str | None = None) -> dict:
    """Environment variables for a subprocess that sees the plugins installed in ``site``."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    if load is not None:
        env["GPTX_LOAD_PLUGINS"] = load
    return env
