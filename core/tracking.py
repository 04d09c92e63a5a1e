"""MLflow tracking for training runs.

With no URI configured MLflow 3 uses ``sqlite:///mlflow.db`` in the working directory, so runs
are tracked out of the box; ``MLFLOW_TRACKING_URI`` or ``[tracking] uri`` point elsewhere
(e.g. a server ``http://127.0.0.1:5000``). Tracking must never cost a training run: once a call
fails (say the server died), the tracker warns once, stops calling MLflow and training goes on.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from gptx import __version__
from gptx.errors import GptxError
from gptx.fsutil import directory_lock

# A tracking server that dies mid-run must cost the run seconds, not MLflow's default of 7 retries
# with exponential backoff (about 4 minutes stalled in the first call that fails). Users' settings win.
MLFLOW_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def client(uri: Optional[str] = None):
    """An ``MlflowClient`` for ``uri`` (None: $MLFLOW_TRACKING_URI, else MLflow's default
    ``./mlflow.db``); a local sqlite store is created whole first (``ensure_sqlite_store``).
    The one way gptx opens MLflow."""
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri:
        mlflow.set_tracking_uri(uri)
    ensure_sqlite_store(mlflow.get_tracking_uri())
    quiet_store_logs()
    return MlflowClient()


def store_uri(uri: Optional[str] = None) -> str:
    """The store gptx means by ``uri`` (None: $MLFLOW_TRACKING_URI, else MLflow's default
    ``./mlflow.db``), with a sqlite file made absolute: what a run records as its store, so that
    later commands find it from any working directory."""
    uri = tracking_uri(uri) or "sqlite:///mlflow.db"
    path = sqlite_file(uri)
    return f"sqlite:///{path}" if path is not None else uri


def existing_client(uri: Optional[str], named: str):
    """An ``MlflowClient`` for a store that must already be there (``store_uri(uri)``): looking a
    run up never creates a store. A missing sqlite file, a server that does not answer or a store
    that cannot be opened is a GptxError starting with ``named``."""
    uri = store_uri(uri)
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise GptxError(f"{named}: no MLflow store at {path} (set MLFLOW_TRACKING_URI to the store that holds the run)")
    try:
        check_reachable(uri)
    except GptxError as err:  # it names the config key; here the store came from elsewhere
        raise GptxError(f"{named}: {str(err).removeprefix('tracking.uri: ')}") from None
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    quiet_store_logs()
    try:
        return MlflowClient(uri)
    except Exception as err:
        raise GptxError(f"{named}: cannot open the MLflow store {uri}: {_short(err)}") from None


def quiet_store_logs() -> None:
    """MLflow's database store logs every failed statement with its traceback (a read-only or
    full store: ~65 lines) before raising; gptx reports each failure itself, in one line."""
    logging.getLogger("mlflow.store").setLevel(logging.CRITICAL)


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///path`` tracking URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def ensure_sqlite_store(uri: str) -> None:
    """Make sure the sqlite store at ``uri`` exists with MLflow's current schema, creating it
    atomically: built in a temporary file beside it, then renamed into place, under a lock on its
    directory. So a ``kill -9`` while MLflow creates its tables (3-8 s) leaves no half-migrated
    ``mlflow.db``, and two runs started at once in a fresh folder do not race MLflow's
    migrations. A store left incomplete by an older gptx and holding no runs is rebuilt; one
    that holds runs is left to MLflow (which migrates it or says why not)."""
    path = sqlite_file(uri)
    if path is None or _store_is_current(path):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(path.parent):
            if _store_is_current(path) or (path.exists() and _store_holds_runs(path)):
                return
            _create_store(path)
    except OSError as err:
        raise GptxError(f"tracking.uri: cannot create the MLflow store {uri}: {err.strerror or err}") from None


def _store_is_current(path: Path) -> bool:
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if any(t.startswith("_alembic_tmp") for t in tables) or "alembic_version" not in tables:
                return False
            versions = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.Error:
        return False
    return versions == [_get_latest_schema_revision()]


def _store_holds_runs(path: Path) -> bool:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:  # no runs table: nothing recorded yet
        return False


def _create_store(path: Path) -> None:
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from gptx.fsutil import remove_stale_siblings, temp_sibling

    remove_stale_siblings(path)
    tmp = temp_sibling(path)  # the database and SQLite's side files are built in it
    quiet = logging.getLogger("mlflow.store.db.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." is not the user's business
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp / path.name}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        store.engine.dispose()
        os.replace(tmp / path.name, path)  # replaces an incomplete store that holds no runs
    finally:
        quiet.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Fail fast (exit 2, before anything is created) when a tracking server does not answer, or
    answers but is not an MLflow tracking server."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise GptxError(f"tracking.uri: MLflow tracking server {uri} is unreachable ({reason})") from None
    try:  # MLflow answers its REST API with JSON; another web server does not
        with urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10) as resp:
            json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise GptxError(f"tracking.uri: {uri} answers but is not an MLflow tracking server (HTTP {err.code} "
                        "on its REST API)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise GptxError(f"tracking.uri: {uri} answers but is not an MLflow tracking server ({type(err).__name__})") from None


def git_commit(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class NullTracker:
    """Tracking disabled (or a rank other than 0): every call does nothing."""

    run_id: Optional[str] = None
    uri: Optional[str] = None  # the store the run is in (absolute), recorded with the run and its checkpoints
    error: Optional[GptxError] = None  # why the run could not be started (a BackgroundTracker's start)

    def ready(self, wait: bool = True) -> bool:
        """Whether the run is up: only a BackgroundTracker's may not be yet, or ever."""
        return True

    def begin(self) -> None:
        """Start what a BackgroundTracker starts in the background; every other tracker is started."""

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict, step: int, timestamp_ms: Optional[int] = None) -> None: ...
    def flush(self) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...
    def log_artifact(self, local_file: Path, artifact_path: Optional[str] = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run. Metrics are buffered and sent in batches (one request per flush)."""

    def __init__(self, uri: Optional[str], experiment: str, run_name: Optional[str], run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None):
        import mlflow

        self.broken: Optional[str] = None
        self._buffer: list = []
        try:
            self.client = client(uri)
            self.uri = store_uri(mlflow.get_tracking_uri())
            if run_id is None:
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
                tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
                run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
                self.run_id = run.info.run_id
            else:  # --resume: the same MLflow run continues
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
        except GptxError:
            raise
        except Exception as err:
            raise GptxError(f"tracking: cannot start an MLflow run at {mlflow.get_tracking_uri()}: {_short(err)}") from None

    def _call(self, what: str, fn, *args, **kwargs):
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never stop training
            self.broken = f"{what} at {self.uri}: {_short(err)}"  # the store, say a full or read-only disk
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

    def log_metrics(self, metrics: dict, step: int, timestamp_ms: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        ts = timestamp_ms or int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        buf, self._buffer = self._buffer, []
        for i in range(0, len(buf), 1000):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=buf[i:i + 1000])

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self._call("log artifacts", self.client.log_artifacts, self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: Optional[str] = None) -> None:
        self._call("log artifact", self.client.log_artifact, self.run_id, str(local_file), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", self.client.log_text, self.run_id, text, artifact_file)

    def finish(self, status: str) -> None:
        """status: FINISHED, KILLED or FAILED."""
        self.flush()
        self._call("end run", self.client.set_terminated, self.run_id, status)


class BackgroundTracker(NullTracker):
    """An MLflow run started in a background thread (``begin``): importing MLflow and creating the
    run take seconds (more for a new sqlite store), which would otherwise all come before the
    first training step. Calls made before the run is up are queued (metrics stamped when logged)
    and sent, in order, by the first call after; only the training thread sends, so nothing
    races. A start that fails is kept in ``error`` (one line), and the run stops on it."""

    def __init__(self, start: Callable[[], NullTracker]):
        self._tracker: Optional[NullTracker] = None
        self._queue: list = []
        self._done = threading.Event()
        # a daemon: a start stalled on an unresponsive server must not keep a failed run's process alive
        self._thread = threading.Thread(target=self._start, args=(start,), name="gptx-mlflow-start", daemon=True)

    def begin(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def _start(self, start) -> None:
        try:
            self._tracker = start()
        except GptxError as err:
            self.error = err
        except Exception as err:  # e.g. MLflow itself failing to import
            self.error = GptxError(f"tracking: cannot start an MLflow run: {_short(err)}")
        finally:
            self._done.set()

    @property
    def run_id(self) -> Optional[str]:
        return self._tracker.run_id if self._tracker is not None else None

    @property
    def uri(self) -> Optional[str]:
        return self._tracker.uri if self._tracker is not None else None

    def ready(self, wait: bool = True) -> bool:
        """Whether the run is up (``wait``: once the start ends), its queued calls sent; False
        after a failed start (``error`` says why)."""
        if wait:
            self.begin()  # whoever waits first starts it
            self._done.wait()
        if not self._done.is_set() or self.error is not None:
            return False
        queued, self._queue = self._queue, []
        for name, args in queued:
            getattr(self._tracker, name)(*args)
        return True

    def _send(self, name: str, *args) -> None:
        if not self._done.is_set():
            self._queue.append((name, args))
        elif self.error is None:  # after a failed start the run stops at its next check: nothing to send to
            self.ready(wait=False)  # what was queued goes first
            getattr(self._tracker, name)(*args)

    def log_params(self, params: dict[str, str]) -> None:
        self._send("log_params", params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("set_tags", tags)

    def log_metrics(self, metrics: dict, step: int, timestamp_ms: Optional[int] = None) -> None:
        self._send("log_metrics", metrics, step, timestamp_ms or int(time.time() * 1000))

    def flush(self) -> None:
        self._send("flush")

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self._send("log_artifacts", local_dir, artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: Optional[str] = None) -> None:
        self._send("log_artifact", local_file, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send("log_text", text, artifact_file)

    def finish(self, status: str) -> None:
        """Waits for the start (MLflow's own timeouts bound it); a run that never started has nothing to end."""
        if self.ready():
            self._tracker.finish(status)


def _short(err: Exception) -> str:
    """One line for an MLflow failure: the database's or the OS's own word when one is in the
    chain (MLflow and SQLAlchemy wrap "attempt to write a readonly database" under a first line
    about autoflush), else the exception's first line."""
    import sqlite3

    e, seen = err, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sqlite3.Error) or (isinstance(e, OSError) and e.strerror):
            err = e
            break
        e = e.__cause__ or e.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def start(cfg, run_id: Optional[str] = None, rank: int = 0, store: Optional[str] = None, background: bool = False):
    """The tracker for this process: MLflow on rank 0 when enabled, else a NullTracker. A resumed
    run (``run_id``) continues in ``store``, the store its run.json recorded: its MLflow run is
    there and nowhere else, whatever the working directory or $MLFLOW_TRACKING_URI is now.
    ``background``: started off the training thread (BackgroundTracker); its failure comes later."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    t = cfg.tracking
    uri = store if run_id and isinstance(store, str) else tracking_uri(t.uri)
    begin = functools.partial(MlflowTracker, uri, cfg.name, t.run_name, run_id, t.parent_run_id)
    return BackgroundTracker(begin) if background else begin()


def run_tags(cfg, registry, init_from=None) -> dict[str, str]:
    """The gptx version, every component used with its plugin's distribution and version, the
    git commit of the experiment's folder and the checkpoint the weights started from."""
    used = {}
    for kind, spec in cfg.components():
        e = registry.get(kind.name, spec.name)
        used[kind.name] = f"{spec.name} ({e.plugin.distribution} {e.plugin.version})"
        for field, ref in spec.refs.items():
            used[f"{kind.name}.{field}"] = f"{ref.name} ({ref.plugin.distribution} {ref.plugin.version})"
    tags = {"gptx.version": __version__, "gptx.plugins": json.dumps(used)}
    if init_from is not None:
        tags["gptx.init_from"] = str(init_from)
    commit = git_commit(cfg.source.parent if cfg.source else Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def check_store(uri: Optional[str]) -> None:
    """Fail fast, creating nothing, when runs could not be tracked at ``uri``: an unknown scheme,
    a server that does not answer or is not MLflow, a sqlite file that cannot be created."""
    if uri is None:
        return
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("http", "https"):
        return check_reachable(uri)
    if scheme in ("", "file"):  # MLflow's file store, always registered: no need to import MLflow to know
        return
    if scheme == "sqlite":
        path = sqlite_file(uri)
        if path is not None and not path.exists():
            from gptx.fsutil import unwritable_ancestor

            blocked = unwritable_ancestor(path.parent)
            if blocked is not None:
                raise GptxError(f"tracking.uri: cannot create the MLflow store {uri}: {blocked} is not writable")
        return
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception as err:
        raise GptxError(f"tracking.uri: MLflow cannot track to {uri!r} ({_short(err)})") from None


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")  # MLflow's own rule for a run id


def run_id_of(source) -> Optional[str]:
    """The run id of an MLflow run URI ``runs:/<run_id>[/...]``; None for anything else."""
    src = str(source)
    if not src.startswith("runs:/"):
        return None
    run_id = src[len("runs:/"):].strip("/").split("/")[0]
    if not RUN_ID.fullmatch(run_id):  # it names a cache folder: '..' must not step out of it
        raise GptxError(f"{src[:100]}: expected runs:/<run_id> (letters, digits, '_' and '-', as MLflow makes them)")
    return run_id


def download_checkpoint(uri: str) -> Path:
    """``runs:/<run_id>`` -> a local copy of that run's logged checkpoint directory (cached:
    downloaded into a temporary sibling and renamed into place only when whole)."""
    from gptx.fsutil import cache_root, publishable, remove_stale_siblings, temp_sibling

    run_id = run_id_of(uri)
    dest = cache_root() / "mlflow-runs" / run_id
    if (dest / "checkpoint" / "gptx.json").is_file():
        return dest / "checkpoint"
    mlflow_client = existing_client(None, uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(dest)
    tmp = temp_sibling(dest)
    try:
        mlflow_client.download_artifacts(run_id, "checkpoint", str(tmp))
        os.replace(publishable(tmp), dest)  # a concurrent download of the same run may have won: same files
    except OSError:
        if not (dest / "checkpoint" / "gptx.json").is_file():
            raise
    except Exception as err:
        raise GptxError(f"{uri}: cannot fetch the run's checkpoint from {store_uri()}: {_short(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "checkpoint"
