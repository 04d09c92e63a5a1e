"""Issue 26, causes 6, 8 and 9, through the real CLI: looking a run up never creates an MLflow
store, an export logs to the store its run was tracked in, a diverged run says truly what it
left; a write the machine refuses names its path; a read-only store is one line; the Node
example's flags are one line each; a sweep checks every variant first and resumes as a whole."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import gptx, write_experiment
from test_faults import NAN_DRIVER, one_error_line

pytestmark = pytest.mark.slow

UNKNOWN_RUN = "runs:/0123456789abcdef0123456789abcdef"


@pytest.fixture
def no_store_configured(monkeypatch):
    """MLflow's default store: ./mlflow.db in the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_dir_of(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


# ---- cause 6: leftovers ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "eval", "run", "validate"])
def test_an_unknown_run_id_creates_no_mlflow_store(tmp_path, no_store_configured, command):
    f = write_experiment(tmp_path / "e.toml")
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n" * 20)
    args = {"generate": ["generate", UNKNOWN_RUN, "--prompt", "hi"],
            "eval": ["eval", UNKNOWN_RUN, "--data", text],
            "run": ["run", f, "--set", f"training.init_from='{UNKNOWN_RUN}'"],
            "validate": ["validate", f, "--set", f"training.init_from='{UNKNOWN_RUN}'"]}[command]
    p = gptx(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert f"{UNKNOWN_RUN}: no MLflow store at {tmp_path / 'mlflow.db'}" in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["e.toml", "t.txt"]  # no mlflow.db, no mlruns, no runs


def tracked_run(tmp_path: Path, store: Path, *extra: str) -> Path:
    f = write_experiment(tmp_path / "e.toml")
    gptx("run", f, "--set", "tracking.enabled=true", "--set", f"tracking.uri='sqlite:///{store}'",
         "--set", "training.max_steps=4", "--set", "training.eval_interval=4", "--set", "training.sample_tokens=0",
         *extra, "--quiet", cwd=tmp_path, check=True)
    return run_dir_of(tmp_path / "runs" / "e")


def test_an_export_logs_to_the_store_its_run_was_tracked_in_and_never_creates_one(tmp_path, no_store_configured):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store" / "mlflow.db"
    run_dir = tracked_run(tmp_path, store)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mlflow_tracking_uri"] == f"sqlite:///{store}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = gptx("export", run_dir, "-o", elsewhere / "onnx", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert f"logged to MLflow run {info['mlflow_run_id']} in sqlite:///{store} (artifacts onnx/)" in p.stdout, p.stdout
    assert sorted(x.name for x in elsewhere.iterdir()) == ["onnx"]  # no ./mlflow.db, no ./mlruns
    names = [a.path for a in MlflowClient(f"sqlite:///{store}").list_artifacts(info["mlflow_run_id"], "onnx")]
    assert "onnx/model.onnx" in names

    store.rename(tmp_path / "moved.db")  # the store is gone: the export still succeeds, says so, creates none
    p = gptx("export", run_dir, "-o", elsewhere / "onnx2", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert f"Warning: export not logged: MLflow run {info['mlflow_run_id']}: no MLflow store at {store}" in p.stdout, p.stdout
    assert not store.exists() and sorted(x.name for x in elsewhere.iterdir()) == ["onnx", "onnx2"]


def stopped_tracked_run(tmp_path: Path, store: Path) -> Path:
    """A tracked run of tmp_path/e.toml stopped by SIGTERM after its first checkpoint; the experiment file."""
    f = write_experiment(tmp_path / "e.toml")
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), "--set", "tracking.enabled=true",
                             "--set", f"tracking.uri='sqlite:///{store}'", "--set", "training.max_steps=2000",
                             "--set", "training.checkpoint_interval=5", "--set", "training.sample_tokens=0", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "runs" / "e").glob("*/checkpoints/step-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    return f


def test_resume_from_another_folder_continues_in_the_runs_own_store(tmp_path, no_store_configured):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store" / "mlflow.db"
    f = stopped_tracked_run(tmp_path, store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = gptx("run", f, "--resume", "--set", "tracking.enabled=true", "--set", "training.max_steps=40",
             "--set", "training.sample_tokens=0", "--quiet", cwd=elsewhere)  # no store named: the default is ./mlflow.db
    assert p.returncode == 0, p.stderr
    assert list(elsewhere.iterdir()) == []  # no new store, no artifacts folder
    run_id = json.loads((run_dir_of(tmp_path / "runs" / "e") / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{store}").get_run(run_id).info.status == "FINISHED"


def test_resume_with_tracking_off_keeps_the_runs_link_to_its_mlflow_run(tmp_path, no_store_configured):
    """run.json and the new checkpoints keep the MLflow run and store the run was tracked in, so a
    later export or tracked resume still finds them."""
    from gptx import checkpoint

    store = tmp_path / "store" / "mlflow.db"
    f = stopped_tracked_run(tmp_path, store)
    run_dir = run_dir_of(tmp_path / "runs" / "e")
    link = {k: json.loads((run_dir / "run.json").read_text())[k] for k in ("mlflow_run_id", "mlflow_tracking_uri")}
    assert link["mlflow_run_id"] and link["mlflow_tracking_uri"] == f"sqlite:///{store}"
    p = gptx("run", f, "--resume", "--set", "tracking.enabled=false", "--set", "training.max_steps=40",
             "--set", "training.sample_tokens=0", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FINISHED" and {k: info[k] for k in link} == link
    last = checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]
    assert last.name == "step-000040" and {k: checkpoint.read_meta(last)[k] for k in link} == link


def test_a_run_that_diverges_before_its_first_checkpoint_says_what_it_left(tmp_path):
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    f = write_experiment(tmp_path / "e.toml", '\n[model.ffn]\nkind = "nan_after"\nnan_after = 2\n')
    p = subprocess.run([sys.executable, str(driver), "run", str(f), "--quiet", "--set", "training.log_interval=1",
                        "--set", "training.checkpoint_interval=10"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    run_dir = run_dir_of(tmp_path / "runs" / "e")
    assert line == (f"Error: training diverged: loss is nan at step 3; no checkpoint was written before it, so there is "
                    f"nothing to resume; {run_dir} keeps run.json (status FAILED) and the curves in metrics.jsonl; try "
                    "a lower training.learning_rate"), line
    # run.lock: the empty file whose flock made the run's process its one writer (the OS dropped the lock)
    assert sorted(x.name for x in run_dir.iterdir()) == ["metrics.jsonl", "run.json", "run.lock"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FAILED" and info["error"] == line.removeprefix("Error: ")
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2]

    p = subprocess.run([sys.executable, str(driver), "run", str(f), "--resume", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "--resume: no interrupted run of 'e' with a checkpoint" in one_error_line(p.stderr)
    p = gptx("compare", tmp_path / "runs" / "e", cwd=tmp_path)
    assert p.returncode == 2 and "status 'FAILED'): training diverged: loss is nan at step 3" in p.stderr, p.stderr


# ---- cause 8: messages -------------------------------------------------------------------------

def limited(max_bytes: int):
    """A child whose files cannot grow past ``max_bytes`` (RLIMIT_FSIZE; SIGXFSZ ignored, so a
    write past it fails with EFBIG as a full disk fails with ENOSPC). Needs no root."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def gptx_limited(max_bytes: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, preexec_fn=limited(max_bytes))


def test_a_refused_write_names_its_path_for_the_data_cache_run_json_and_prepare(tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # cold, whatever ran before
    monkeypatch.setenv("GPTX_CACHE_DIR", str(cache))
    f = write_experiment(tmp_path / "e.toml")
    src = tmp_path / "small.txt"
    src.write_text("hello there, a small corpus for a small model\n" * 400)  # ~18 kB: 36 kB of uint16 ids

    # the tokenized data cache: the shard of the experiment's text is ~2 MB
    p = gptx_limited(100_000, "run", f, "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert line.startswith(f"Error: {f}: data.path: {cache / 'tokens'}") and line.endswith(
        ": cannot write the tokenized data cache ($GPTX_CACHE_DIR) (File too large); nothing was written there"), line
    assert not (tmp_path / "runs").exists()

    # run.json: the cache is warm, the run directory's first file is larger than the limit
    gptx("validate", f, cwd=tmp_path, check=True)
    p = gptx_limited(1000, "run", f, "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    run_dir = run_dir_of(tmp_path / "runs" / "e")
    assert one_error_line(p.stderr) == f"Error: {run_dir / 'run.json'}: cannot write: File too large"
    assert not [x for x in run_dir.iterdir() if x.name.startswith(".")]  # no temporary left behind

    # gptx prepare: the folder, not its hidden temporary, and nothing there
    p = gptx_limited(10_000, "prepare", src, "-o", tmp_path / "shards", "--tokenizer", "char", "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert one_error_line(p.stderr) == (f"Error: {tmp_path / 'shards'}: cannot write the shards (File too large); "
                                        "nothing was written there")
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob(".shards*"))


def test_a_refused_export_write_names_the_export_folder(tmp_path):
    from helpers import tiny_checkpoint_and_export

    ck, _ = tiny_checkpoint_and_export(tmp_path)
    p = gptx_limited(20_000, "export", ck, "-o", tmp_path / "out", "--no-track", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert one_error_line(p.stderr) == (f"Error: {tmp_path / 'out'}: cannot write the export (File too large); "
                                        "nothing was written there")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def read_only_bind(src: Path, dst: Path):
    """``dst`` shows ``src`` read-only (a bind mount, remounted ro: even root cannot write there)."""
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode != 0:
        pytest.skip("needs root to bind-mount a read-only folder")
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(dst)])
        pytest.skip("cannot remount read-only here")


def test_a_read_only_mlflow_store_is_one_line_naming_it(tmp_path):
    store_dir = tmp_path / "store"
    tracked_run(tmp_path, store_dir / "mlflow.db")
    ro = tmp_path / "ro"
    read_only_bind(store_dir, ro)
    try:
        f = tmp_path / "e.toml"
        p = gptx("run", f, "--set", "tracking.enabled=true", "--set", f"tracking.uri='sqlite:///{ro / 'mlflow.db'}'",
                 "--quiet", cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        line = one_error_line(p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert line.startswith(f"Error: tracking: cannot start an MLflow run at sqlite:///{ro / 'mlflow.db'}: ") \
            and line.endswith("OperationalError: attempt to write a readonly database"), line
        assert len(list((tmp_path / "runs" / "e").iterdir())) == 1  # no run directory for the refused run
    finally:
        subprocess.run(["umount", str(ro)])


NODE_SCRIPT = Path(__file__).resolve().parents[1] / "export" / "node" / "generate.js"


@pytest.mark.parametrize("args, message", [
    (["x", "--prompt"], "--prompt: expects a value (the prompt text)"),
    (["x", "--prompt", "--seed", "3"], "--prompt: expects a value (the prompt text)"),
    (["x", "--prompt", ""], "--prompt: a prompt must not be empty"),
    (["x", "--prompt", "hi", "--seed"], "--seed: expects a value"),
    (["x", "--prompt", "hi", "--seed", "-1"], "--seed: must be an integer from 0 to 9007199254740991, got -1"),
    (["x", "--prompt", "hi", "--max-new-tokens", "1.5"], '--max-new-tokens: expected an integer, got "1.5"'),
    (["x", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer from 1 to 16777216, got 0"),
    (["x", "--prompt", "hi", "--threads", "x"], '--threads: expected an integer, got "x"'),
    (["x", "--prompt", "hi", "--temperature", "nan"], '--temperature: expected a number, got "nan"'),
    (["x", "--prompt", "hi", "--temperature=-1"], "--temperature: must be a number in [0, 10000], got -1"),
    (["x", "--prompt", "hi", "--top-k", "0"], "--top-k: must be an integer from 1 to 16777216, got 0"),
    (["x", "--prompt", "hi", "--top-p", "1.5"], "--top-p: must be a number in (0, 1], got 1.5"),
    (["x", "--prompt", "hi", "--bogus"], "--bogus: no such option (usage: node generate.js"),
    (["--prompt", "hi"], "OUT_DIR: missing: the export folder to generate from"),
    (["x"], "--prompt: missing: give at least one prompt"),
    (["x", "--prompt", "hi"], "x: not a gptx export (no gptx_export.json)"),
])
def test_the_node_example_says_each_bad_flag_in_one_line(tmp_path, args, message):
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    p = subprocess.run(["node", str(NODE_SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1 and p.stderr.startswith(f"Error: {message}"), p.stderr


def test_the_node_example_names_a_missing_package_in_one_line(tmp_path):
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    (tmp_path / "gptx_export.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "NODE_PATH"}
    p = subprocess.run(["node", str(NODE_SCRIPT), str(tmp_path), "--prompt", "hi"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=env)
    if p.returncode == 0:
        pytest.skip("onnxruntime-node is installed beside the script")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("Error: onnxruntime-node is not installed: ONNXRUNTIME_NODE_INSTALL=skip npm install"), p.stderr


# ---- cause 9 and sweeps: every variant checked first, resumable as a whole -----------------------

def test_a_sweep_checks_every_variants_data_before_the_first_trains(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    f = write_experiment(tmp_path / "e.toml")
    good = f.read_text().split('path = "')[1].split('"')[0]
    p = gptx("sweep", f, "--vary", f"data.path={good},{empty}", "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert str(empty) in line and f"(variant data.path={empty})" in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["e.toml", "empty.txt"]  # nothing trained, nothing created


def sweep_args(f: Path, uri: str) -> list[str]:
    return ["sweep", str(f), "--vary", "training.learning_rate=0.001,0.002,0.003", "--set", "training.max_steps=300",
            "--set", "training.checkpoint_interval=10", "--set", "training.eval_interval=100",
            "--set", "training.log_interval=10", "--set", "training.sample_tokens=0",
            "--set", "training.final_eval_tokens=2048", "--set", "tracking.enabled=true", "--set", f"tracking.uri='{uri}'"]


def test_a_sweep_stopped_mid_variant_resumes_as_a_whole(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "e.toml")
    p = gptx("sweep", f, "--vary", "training.learning_rate=0.001,0.002,0.003", "--resume", cwd=tmp_path)
    assert p.returncode == 2 and "--resume: no unfinished sweep of 'e'" in one_error_line(p.stderr), p.stderr

    proc = subprocess.Popen([sys.executable, "-m", "gptx", *sweep_args(f, mlflow_sqlite)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        second = None
        while second is None or not list((second / "checkpoints").glob("step-*")):  # the 2nd variant has a checkpoint
            folders = list((tmp_path / "runs" / "e").glob("sweep-*/*0.002*")) if (tmp_path / "runs").exists() else []
            second = folders[0] if folders else None
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue the sweep with: gptx sweep" in err and err.strip().endswith("--resume"), err
    folder = second.parent
    first = next(folder.glob("*0.001*"))
    assert json.loads((first / "run.json").read_text())["status"] == "FINISHED"
    kept = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    stopped = json.loads((second / "run.json").read_text())
    assert stopped["status"] == "KILLED" and stopped["step"] < 300
    assert not list(folder.glob("*0.003*"))
    assert json.loads((folder / "sweep.json").read_text())["status"] == "KILLED"

    p = gptx(*sweep_args(f, mlflow_sqlite), "--resume", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["folder"] == str(folder) and len(out["variants"]) == 3
    assert [v["n"] for v in out["variants"]] == [1, 1, 1]
    assert {p: p.read_bytes() for p in kept} == kept  # the finished variant, byte for byte
    resumed = json.loads((second / "run.json").read_text())
    assert resumed["status"] == "FINISHED" and resumed["step"] == 300
    assert resumed["mlflow_run_id"] == stopped["mlflow_run_id"]  # the same MLflow run continued
    steps = [r["step"] for r in map(json.loads, (second / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert steps == list(range(1, 301))  # one curve, no step twice
    assert json.loads((folder / "sweep.json").read_text())["status"] == "FINISHED"
    client = MlflowClient(mlflow_sqlite)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
