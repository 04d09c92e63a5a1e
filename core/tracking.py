"""MLflow tracking for training runs.

With no URI configured MLflow 3 uses ``sqlite:///mlflow.db`` in the working directory, so runs
are tracked out of the box; ``MLFLOW_TRACKING_URI`` or ``[tracking] uri`` point elsewhere
(e.g. a server ``http://127.0.0.1:5000``). Tracking must never cost a training run: once a call
fails (say the server died), the tracker warns once, stops calling MLflow and training goes on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from gptx import __version__
from gptx.errors import GptxError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A tracking server that dies mid-run must cost the run seconds, not MLflow's default of 7 retries
# with exponential backoff (about 4 minutes stalled in the first call that fails). Users' settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": "4"} (MLflow params are flat strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) or v is None else str(v)
    return out


def tracking_uri(configured: Optional[str]) -> Optional[str]:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_reachable(uri: Optional[str]) -> None:
    """Fail fast (exit 2, before anything is created) when a tracking server does not answer."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise GptxError(f"tracking.uri: MLflow tracking server {uri} is unreachable ({reason})") from None


def git_commit(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class NullTracker:
    """Tracking disabled (or a rank other than 0): every call does nothing."""

    run_id: Optional[str] = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def flush(self) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run. Metrics are buffered and sent in batches (one request per flush)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: Optional[str], run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        if uri:
            mlflow.set_tracking_uri(uri)
        self.client = MlflowClient()
        self.broken: Optional[str] = None
        self._buffer: list = []
        try:
            if run_id is None:
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
                tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
                run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
                self.run_id = run.info.run_id
            else:  # --resume: the same MLflow run continues
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
        except Exception as err:
            raise GptxError(f"tracking: cannot start an MLflow run at {mlflow.get_tracking_uri()}: {_short(err)}") from None

    def _call(self, what: str, fn, *args, **kwargs):
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never stop training
            self.broken = f"{what}: {_short(err)}"
            print(f"Warning: MLflow tracking stopped ({self.broken}); training continues, checkpoints are unaffected",
                  file=sys.stderr, flush=True)
            return None

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the server takes at most 100 params per request
            self._call("log params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        buf, self._buffer = self._buffer, []
        for i in range(0, len(buf), 1000):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=buf[i:i + 1000])

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self._call("log artifacts", self.client.log_artifacts, self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", self.client.log_text, self.run_id, text, artifact_file)

    def finish(self, status: str) -> None:
        """status: FINISHED, KILLED or FAILED."""
        self.flush()
        self._call("end run", self.client.set_terminated, self.run_id, status)


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def start(cfg, run_id: Optional[str] = None, rank: int = 0):
    """The tracker for this process: MLflow on rank 0 when enabled, else a NullTracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    t = cfg.tracking
    return MlflowTracker(tracking_uri(t.uri), cfg.name, t.run_name, run_id, t.parent_run_id)


def run_tags(cfg, registry) -> dict[str, str]:
    used = {}
    for slot, spec in [("attention", cfg.model.attention), ("positional", cfg.model.positional), ("ffn", cfg.model.ffn),
                       ("norm", cfg.model.norm), ("tokenizer", cfg.tokenizer)]:
        kind = "tokenizer" if slot == "tokenizer" else slot
        e = registry.get(kind, spec.kind)
        used[slot] = f"{spec.kind} ({e.plugin.distribution} {e.plugin.version})"
    if cfg.model.norm.placement:
        e = registry.get("norm_placement", cfg.model.norm.placement)
        used["norm_placement"] = f"{cfg.model.norm.placement} ({e.plugin.distribution} {e.plugin.version})"
    tags = {"gptx.version": __version__, "gptx.plugins": json.dumps(used)}
    commit = git_commit(cfg.source.parent if cfg.source else Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def download_checkpoint(uri: str) -> Path:
    """``runs:/<run_id>`` -> a local copy of that run's logged checkpoint directory."""
    import mlflow

    run_id = uri[len("runs:/"):].strip("/").split("/")[0]
    if not run_id:
        raise GptxError(f"{uri}: expected runs:/<run_id>")
    from gptx.paths import cache_root

    dest = cache_root() / "mlflow-runs" / run_id
    if (dest / "checkpoint" / "gptx.json").is_file():
        return dest / "checkpoint"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dest))
    except Exception as err:
        raise GptxError(f"{uri}: cannot fetch the run's checkpoint from {mlflow.get_tracking_uri()}: {_short(err)}") from None
    return Path(local)
