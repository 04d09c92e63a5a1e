"""Run directories: ``<out_dir>/<experiment>/<run>/`` with ``run.json`` (status, MLflow run id,
step, results), ``metrics.jsonl`` (the curves) and ``checkpoints/``. Torch-free."""
from __future__ import annotations

import datetime
import json
import os
import secrets
from pathlib import Path
from typing import Optional

from gptx.errors import ConfigError, GptxError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def experiment_dir(cfg) -> Path:
    return Path(cfg.training.out_dir).expanduser().resolve() / cfg.name


def read_run_file(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_run_file(run_dir: Path, **fields) -> None:
    """Merge ``fields`` into run.json, atomically (a crash leaves the previous version)."""
    data = read_run_file(run_dir) | fields
    tmp = Path(run_dir) / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, Path(run_dir) / RUN_FILE)


def new_run_dir(cfg) -> Path:
    """A directory no other run has: ``<run_name>`` (or a timestamp), with ``-2``, ``-3``, ...
    appended when taken. ``mkdir`` without ``exist_ok`` claims it atomically, so neither a rerun
    with the same ``tracking.run_name`` nor a concurrent run ever writes into another run's directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = cfg.tracking.run_name or f"{stamp}-{secrets.token_hex(2)}"
    root = experiment_dir(cfg)
    for n in range(1, 10_000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as err:
            raise GptxError(f"training.out_dir: cannot create {run_dir}: {err.strerror}") from None
    raise GptxError(f"training.out_dir: {root} already holds 9,999 runs named {base!r}; choose another tracking.run_name")


def find_resumable(cfg, complete_checkpoints) -> Path:
    """The newest run of this experiment that did not finish and has a checkpoint."""
    root = experiment_dir(cfg)
    candidates = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for run_dir in reversed(candidates):
        if read_run_file(run_dir).get("status") != "FINISHED" and complete_checkpoints(run_dir / "checkpoints"):
            return run_dir
    raise GptxError(f"--resume: no interrupted run of '{cfg.name}' with a checkpoint under {root}")


def check_writable(cfg) -> None:
    """Fail before training when the run directory cannot be created, creating nothing."""
    p = experiment_dir(cfg)
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{p} is not a writable directory", "training.out_dir")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as the run goes (a crash loses at most
    the line being written): ``{"step", "seconds", "train_loss", "lr", "tokens_per_sec", ...}`` at
    logged steps, ``{"step", "seconds", "val_loss", "eval_train_loss"}`` at evaluations and
    ``{"step", "seconds", "final_val_loss"}`` at the end; ``seconds`` is training wall clock."""

    def __init__(self, run_dir: Optional[Path]):
        self.path = None if run_dir is None else Path(run_dir) / METRICS_FILE

    def append(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(run_dir: Path) -> list[dict]:
        """The records of a run; a torn last line (a crash mid-write) is skipped."""
        records = []
        try:
            lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
        except OSError:
            return records
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
