"""Training runs on disk. A run directory, ``<out_dir>/<experiment>/<run>/``, holds ``run.json``
(status, MLflow run id, step, results, the resolved config), ``metrics.jsonl`` (its curves,
``gptx.metrics_log``) and ``checkpoints/``. This module creates them for the trainer (unique,
atomically claimed names; the run to resume) and reads finished runs back for ``gptx compare``
and ``gptx sweep``, however the user names them: a run directory, a folder of run directories (a
sweep's folder), an MLflow run id or ``runs:/<id>`` (a sweep's parent run stands for its child
runs). Each becomes a ``FinishedRun``: its resolved settings (the flattened config, as MLflow
stores params), its results (``final_val_loss`` ...) and its curves. Torch-free.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import secrets
import statistics
from pathlib import Path
from typing import Optional

from gptx import metrics_log
from gptx.errors import ConfigError, GptxError, first_line
from gptx.fsutil import HeldLock, read_regular, try_lock, unwritable_ancestor
from gptx.numeric import int_or_none, number_or_none, parse_int

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"  # held (flock) by the one process training in the run directory
SWEEP_FILE = "sweep.json"
# What a run reports once: the whole-split val loss (the last sampled one where a run skipped it), and
# the target metrics when the run had a target.
TARGET_KEYS = ("best_val_loss", "steps_to_target", "tokens_to_target", "seconds_to_target")
RESULT_KEYS = ("final_val_loss", "val_loss", *TARGET_KEYS)
# MLflow metric -> the metrics.jsonl record it belongs to (records of one kind share a timestamp).
RECORD_KINDS = {"train_loss": "train", "lr": "train", "tokens_per_sec": "train",
                "val_loss": "eval", "eval_train_loss": "eval", "final_val_loss": "final"}
MAX_JSON_BYTES = 16 * 1024 * 1024  # run.json and sweep.json are kilobytes
_RUN_ID = re.compile(r"[0-9a-f]{32}")



# ---- the trainer's run directories ------------------------------------------------------------

def experiment_dir(cfg) -> Path:
    return Path(cfg.training.out_dir).expanduser().resolve() / cfg.name


def read_run_file(run_dir: Path) -> dict:
    try:
        data = json.loads(read_regular(Path(run_dir) / RUN_FILE))
    except (OSError, ValueError, GptxError):  # a run folder without a readable run.json is no run
        return {}
    return data if isinstance(data, dict) else {}


def write_run_file(run_dir: Path, **fields) -> None:
    """Merge ``fields`` into run.json, atomically (a crash leaves the previous version)."""
    from gptx.fsutil import write_atomic

    write_atomic(Path(run_dir) / RUN_FILE, json.dumps(read_run_file(run_dir) | fields, indent=2))


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


def lock_run_dir(run_dir: Path, what: str = "training.out_dir") -> HeldLock:
    """Own ``run_dir`` for the run's life: an exclusive lock on its ``run.lock``, which the OS drops
    when the process ends (even by kill -9, so a lock is never stale). Another process holding it
    is training there: refused, before anything is written."""
    try:
        lock, holder = try_lock(Path(run_dir) / LOCK_FILE)
    except OSError as err:
        raise GptxError(f"{what}: cannot lock {err.filename}: {err.strerror}") from None
    if lock is None:
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise GptxError(f"{what}: {run_dir} is in use by another gptx process{pid}; wait for it to finish or stop it")
    return lock


def find_resumable(cfg, complete_checkpoints, lock: bool = True) -> tuple[Path, Optional[HeldLock]]:
    """The newest run of this experiment that did not finish and has a checkpoint, and (``lock``:
    rank 0) the lock that makes this process its only writer. The newest one still in use by
    another process is refused, not passed over: that is the run the user means."""
    root = experiment_dir(cfg)
    candidates = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for run_dir in reversed(candidates):
        if not _resumable(run_dir, complete_checkpoints):
            continue
        if not lock:
            return run_dir, None
        held = lock_run_dir(run_dir, "--resume")
        if _resumable(run_dir, complete_checkpoints):  # it may have finished while we took the lock
            return run_dir, held
        held.release()
    raise GptxError(f"--resume: no interrupted run of '{cfg.name}' with a checkpoint under {root}")


def _resumable(run_dir: Path, complete_checkpoints) -> bool:
    return read_run_file(run_dir).get("status") != "FINISHED" and bool(complete_checkpoints(run_dir / "checkpoints"))


def check_writable(cfg) -> None:
    """Fail before training when the run directory cannot be created, creating nothing."""
    blocked = unwritable_ancestor(experiment_dir(cfg))
    if blocked is not None:
        raise ConfigError(f"{blocked} is not a writable directory", "training.out_dir")


# ---- finished runs, read back ------------------------------------------------------------------

@dataclasses.dataclass
class FinishedRun:
    name: str  # how tables and messages show it: the run directory, or the MLflow run name
    settings: dict[str, str]  # the flattened resolved config ("training.seed" -> "1337")
    results: dict[str, float]
    records: list[dict]  # the metrics.jsonl contract; [] when the run left no curves
    run_id: Optional[str] = None
    run_dir: Optional[Path] = None
    num_params: Optional[int] = None
    wall_seconds: Optional[float] = None  # first step to the final evaluation

    @property
    def seed(self) -> Optional[int]:
        return int_or_none(self.settings.get("training.seed"))  # '²' or text from a foreign run: no seed

    @property
    def experiment(self) -> str:
        return self.settings.get("tracking.experiment", "?")

    def median_tokens_per_sec(self) -> Optional[float]:
        values = [r["tokens_per_sec"] for r in self.records if "tokens_per_sec" in r]
        return statistics.median(values) if values else None


def read_json_file(path: Path, what: str) -> dict:
    """A small JSON object file (run.json, sweep.json); missing, huge, corrupted or not an object:
    a GptxError naming it."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise GptxError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB; not a gptx {what}")
        data = json.loads(read_regular(path))
    except FileNotFoundError:
        raise GptxError(f"{path.parent}: not a gptx {what} (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptxError(f"{path}: corrupted ({err})") from None
    except OSError as err:
        raise GptxError(f"{path}: cannot read: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise GptxError(f"{path}: not a gptx {what} (not a JSON object)")
    return data


class NotFinished(GptxError):
    """A run that is still running, failed or was stopped: it has no final result to compare."""


def from_run_dir(path: Path, mlflow: Optional["MlflowRuns"] = None) -> FinishedRun:
    from gptx.tracking import flatten

    info = read_json_file(path / RUN_FILE, "run directory")
    if info.get("status") != "FINISHED":
        why = f": {info['error']}" if isinstance(info.get("error"), str) else ""
        raise NotFinished(f"{path}: the run has not finished (status {info.get('status')!r}){why}")
    config = info.get("config")
    if not isinstance(config, dict):
        raise GptxError(f"{path / RUN_FILE}: has no resolved 'config' object")
    records = metrics_log.read(path / metrics_log.FILE) if (path / metrics_log.FILE).is_file() else []
    run_id = info.get("mlflow_run_id") if isinstance(info.get("mlflow_run_id"), str) else None
    if not records and run_id and mlflow is not None and mlflow.available():  # a run from before metrics.jsonl
        records = mlflow.records(mlflow.get(run_id, str(path)))
    results = {k: v for k in RESULT_KEYS if (v := number_or_none(info.get(k))) is not None}
    for key in RESULT_KEYS:  # the metrics file has them too (final_val_loss at least)
        if key not in results and metrics_log.last(records, key) is not None:
            results[key] = metrics_log.last(records, key)
    params = int_or_none(info.get("num_params"), 0)
    return FinishedRun(name=path.name, settings=flatten(config), results=results, records=records, run_id=run_id,
                       run_dir=path, num_params=params,
                       wall_seconds=max((r["seconds"] for r in records), default=None))


def run_dirs_in(folder: Path) -> list[Path]:
    """The run directories of a folder: in a sweep's order when it has a sweep.json, else by name."""
    found = sorted(p for p in folder.iterdir() if (p / RUN_FILE).is_file())
    if (folder / SWEEP_FILE).is_file():
        listed = [Path(r.get("run_dir", "")).name for v in read_json_file(folder / SWEEP_FILE, "sweep folder").get("variants", [])
                  if isinstance(v, dict) for r in v.get("runs", []) if isinstance(r, dict)]
        rank = {name: i for i, name in enumerate(listed)}
        found.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    return found


class MlflowRuns:
    """Finished runs read from an MLflow tracking store, opened on first use. ``uri``: the
    store (default: $MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db). A store that is
    not there is an error, never a new empty one."""

    def __init__(self, uri: Optional[str] = None):
        from gptx.tracking import tracking_uri

        self.uri = tracking_uri(uri) or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self._client = None

    def available(self) -> bool:
        return not self.uri.startswith("sqlite:///") or Path(self.uri[len("sqlite:///"):]).is_file()

    def client(self, named: str):
        if self._client is None:
            from gptx import tracking

            if not self.available():
                raise GptxError(f"{named}: no MLflow store at {self.uri[len('sqlite:///'):]} (set MLFLOW_TRACKING_URI or --tracking-uri)")
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr stays one line per problem
            self._client = tracking.existing_client(self.uri, named)
        return self._client

    def get(self, run_id: str, named: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client(named).get_run(run_id)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
                raise GptxError(f"{named}: no such MLflow run in {self.uri}") from None
            raise GptxError(f"{named}: cannot read the MLflow run from {self.uri}: {first_line(err) or type(err).__name__}") from None

    def load(self, run_id: str, named: str) -> list[FinishedRun]:
        """The run, or a sweep parent's child runs in the order they were started."""
        run = self.get(run_id, named)
        children = self.client(named).search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", order_by=["attributes.start_time ASC"])
        if children:
            return [self._finished(child, f"{named} (child {child.info.run_id})") for child in children]
        return [self._finished(run, named)]

    def _finished(self, run, named: str) -> FinishedRun:
        if run.info.status != "FINISHED":
            raise NotFinished(f"{named}: the MLflow run has not finished (status {run.info.status})")
        if "training.seed" not in run.data.params:
            raise GptxError(f"{named}: not a gptx training run (no training.seed param)")
        records = self.records(run)
        return FinishedRun(name=run.info.run_name or run.info.run_id, settings=dict(run.data.params),
                           results={k: float(v) for k, v in run.data.metrics.items() if k in RESULT_KEYS},
                           records=records, run_id=run.info.run_id,
                           num_params=int_or_none(run.data.metrics.get("num_params"), 0),
                           wall_seconds=max((r["seconds"] for r in records), default=None))

    def records(self, run) -> list[dict]:
        """The run's metrics.jsonl artifact (gptx logs it at the end of a run), else MLflow's
        metric history as the same records (seconds since the MLflow run started)."""
        import tempfile

        client = self._client
        if any(a.path == metrics_log.FILE for a in client.list_artifacts(run.info.run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                return metrics_log.read(Path(client.download_artifacts(run.info.run_id, metrics_log.FILE, tmp)))
        start = run.info.start_time
        merged: dict[tuple[int, str], dict] = {}
        for key, kind in RECORD_KINDS.items():
            for m in client.get_metric_history(run.info.run_id, key):
                rec = merged.setdefault((m.step, kind), {"step": parse_int(m.step, f"MLflow run {run.info.run_id}: {key} step", 0),
                                                         "seconds": max(0.0, (m.timestamp - start) / 1000)})
                rec[key] = float(m.value)
        return sorted(merged.values(), key=lambda r: (r["step"], r["seconds"]))


def resolve(names: list[str], mlflow: MlflowRuns) -> tuple[list[FinishedRun], list[str]]:
    """Every named run (folders and sweep parents expanded), in order, each once; and a warning
    per unfinished run skipped inside a folder. A run named on its own that has not finished is
    an error."""
    found: list[FinishedRun] = []
    warnings: list[str] = []
    for name in names:
        path = Path(name)
        if path.is_dir() and not (path / RUN_FILE).is_file():
            dirs = run_dirs_in(path)
            if not dirs:
                raise GptxError(f"{name}: not a run directory or a folder of runs (no {RUN_FILE})")
            for d in dirs:
                try:
                    found.append(from_run_dir(d, mlflow))
                except NotFinished as err:
                    warnings.append(f"skipped {err}")
        elif path.is_dir():
            found.append(from_run_dir(path, mlflow))
        elif path.exists():
            raise GptxError(f"{name}: not a run directory (a file)")
        else:
            from gptx.tracking import run_id_of

            run_id = run_id_of(name) or name
            if not _RUN_ID.fullmatch(run_id):
                raise GptxError(f"{name}: no such run directory, and not an MLflow run id (32 hex digits, or runs:/<id>)")
            found.extend(mlflow.load(run_id, name))
    unique, seen = [], set()
    for run in found:
        key = run.run_id or str(run.run_dir)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    return unique, warnings
