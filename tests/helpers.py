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
