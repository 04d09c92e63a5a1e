"""Nothing a user already has is lost: not by a rerun, a re-export, two runs at once, or a kill -9
while the MLflow store is being created. Real processes, real MLflow sqlite stores."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import gptx, tiny_checkpoint_and_export, write_experiment

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tracked_experiment(d: Path, body: str = "") -> Path:
    """The tiny experiment with tracking ON into MLflow's default store: ./mlflow.db in the cwd."""
    f = write_experiment(d / "e.toml", body)
    f.write_text(f.read_text().replace("enabled = false", "enabled = true"))
    return f


def test_rerun_with_the_same_run_name_keeps_the_finished_run(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    f.write_text(f.read_text().replace("enabled = false", 'enabled = false\nrun_name = "mine"'))
    gptx("run", f, "--quiet", "--set", "training.max_steps=5", cwd=tmp_path, check=True)
    first = tmp_path / "runs" / "e" / "mine"
    before = tree_digest(first)
    assert json.loads((first / "run.json").read_text())["status"] == "FINISHED"
    gptx("run", f, "--quiet", "--set", "training.max_steps=5", cwd=tmp_path, check=True)
    assert tree_digest(first) == before  # the finished run is untouched
    second = tmp_path / "runs" / "e" / "mine-2"
    assert json.loads((second / "run.json").read_text())["status"] == "FINISHED"


def test_reexport_keeps_files_gptx_did_not_write(tmp_path):
    ck, out = tiny_checkpoint_and_export(tmp_path)
    (out / "notes.txt").write_text("my notes")
    proc = gptx("export", ck, "-o", out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "notes.txt" in proc.stderr and "--force" in proc.stderr
    assert (out / "notes.txt").read_text() == "my notes"
    (out / "notes.txt").unlink()
    gptx("export", ck, "-o", out, cwd=tmp_path, check=True)  # only gptx's own files: replaced
    assert (out / "model.onnx").is_file()


def test_export_removes_what_a_killed_export_left_but_not_a_live_one(tmp_path):
    ck, out = tiny_checkpoint_and_export(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".export.tmp-{int(dead.stdout)}-abcdef"
    stale.mkdir()
    (stale / ".gptx-temporary").write_text(stale.name)  # as temp_sibling marks its directories
    (stale / "model.onnx").write_bytes(b"half")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".export.tmp-{sleeper.pid}-abcdef"
        live.mkdir()
        (live / ".gptx-temporary").write_text(live.name)
        gptx("export", ck, "-o", out, cwd=tmp_path, check=True)
        assert not stale.exists() and live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_runs_started_at_once_in_a_fresh_folder_both_finish(tmp_path):
    f = tracked_experiment(tmp_path)
    env = os.environ | {"MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    procs = [subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), "--quiet", "--set", "training.max_steps=3"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    import mlflow

    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("e").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


KILLED_MID_MIGRATION = """
import os, signal, sys, sqlalchemy
from sqlalchemy import event

@event.listens_for(sqlalchemy.engine.Engine, "after_cursor_execute")
def die(conn, cursor, statement, *args):  # kill -9 in the middle of MLflow's schema migrations
    if statement.lstrip().startswith("CREATE TABLE _alembic_tmp_"):
        os.kill(os.getpid(), signal.SIGKILL)

from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore(f"sqlite:///{sys.argv[1]}", "./mlruns")
"""


def test_a_store_killed_mid_migration_is_rebuilt(tmp_path):
    """What a kill -9 during MLflow's own store creation leaves (as before gptx created stores
    atomically): a half-migrated mlflow.db that MLflow cannot open again. It holds no runs, so
    gptx rebuilds it."""
    db = tmp_path / "mlflow.db"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_MIGRATION, str(db)], cwd=tmp_path, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and db.is_file()
    f = tracked_experiment(tmp_path)
    proc = gptx("run", f, "--quiet", "--set", "training.max_steps=3", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".mlflow.db.*"))


def test_kill_9_while_the_store_is_created_costs_nothing(tmp_path):
    f = tracked_experiment(tmp_path)
    db = tmp_path / "mlflow.db"
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), "--quiet", "--set", "training.max_steps=3"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".mlflow.db.tmp-*")):
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not db.exists() or db.stat().st_size > 0
    again = gptx("run", f, "--quiet", "--set", "training.max_steps=3", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".mlflow.db.tmp-*"))  # the killed creator's temporary is gone
