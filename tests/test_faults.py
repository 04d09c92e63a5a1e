"""Faults during training, with real processes: a loss that turns NaN, a tracking server that
dies mid-run, a disk that fills up under a checkpoint write. Each is reported clearly, and the
last good checkpoint survives."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import gptx, missing_tool, start_mlflow_server, write_experiment

from gptx import checkpoint
from gptx.config import load_experiment
from gptx.training.trainer import train

pytestmark = pytest.mark.slow

# A plugin whose MLP turns NaN after a number of training steps, registered in-process by a
# driver that then runs the real CLI entry point (what `python -m gptx` runs).
NAN_DRIVER = textwrap.dedent('''
    import dataclasses, sys
    import gptx
    from gptx import registry
    from gptx.plugins.ffn import GeluMLP, MLPOptions

    @dataclasses.dataclass(frozen=True)
    class NanOptions(MLPOptions):
        nan_after: int = 10  # training steps before the output turns NaN

    class NanAfter(GeluMLP):
        Options = NanOptions

        def __init__(self, config, options):
            super().__init__(config, options)
            self.calls = 0

        def forward(self, x):
            out = super().forward(x)
            if self.training:
                self.calls += 1
                if self.calls > self.options.nan_after:
                    return out * float("nan")
            return out

    class Plugin:
        @staticmethod
        @gptx.hookimpl
        def register_ffn(register):
            register("nan_after", NanAfter)

    registry.use(registry.load(extra_plugins=(Plugin,)))
    if __name__ == "__main__":
        from gptx.cli import main
        sys.argv[0] = "gptx"
        main()
''')


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_fails_the_mlflow_run(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    f = write_experiment(tmp_path / "e.toml", '\n[model.ffn]\nkind = "nan_after"\nnan_after = 12\n')
    p = subprocess.run(
        [sys.executable, str(driver), "run", str(f), "--quiet", "--set", "training.max_steps=40",
         "--set", "training.checkpoint_interval=5", "--set", "tracking.enabled=true",
         "--set", f"tracking.uri='{mlflow_sqlite}'"],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    (run_dir,) = (tmp_path / "runs" / "e").iterdir()
    good = run_dir / "checkpoints" / "step-000010"
    assert "training diverged: loss is nan at step 13" in line and f"last good checkpoint is {good}" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    weights = checkpoint.load_weights(good)
    assert all(torch.isfinite(t).all() for t in weights.values())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FAILED"
    assert MlflowClient(mlflow_sqlite).get_run(info["mlflow_run_id"]).info.status == "FAILED"


def test_an_exploding_learning_rate_is_refused_before_anything_is_created(tmp_path):
    """A learning rate no training survives is refused by its declared range when the config is
    validated, not found as a NaN loss after the run folder exists (a loss that does turn NaN:
    test_nan_loss_stops_keeps_the_last_good_checkpoint_and_fails_the_mlflow_run)."""
    f = write_experiment(tmp_path / "e.toml")
    p = gptx("run", f, "--set", "training.learning_rate=1e30", "--set", "training.warmup_steps=0", "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert one_error_line(p.stderr) == ("Error: --set training.learning_rate=1e30: training.learning_rate: "
                                        "must be in (0, 10], got 1e+30")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_tracking_server_dying_mid_run_does_not_stop_training(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "server").mkdir()
    server, url = start_mlflow_server(tmp_path / "server")
    try:
        f = write_experiment(tmp_path / "e.toml")
        run = subprocess.Popen(
            [sys.executable, "-m", "gptx", "run", str(f), "--set", "tracking.enabled=true", "--set", f"tracking.uri='{url}'",
             "--set", "training.max_steps=100", "--set", "training.eval_interval=10", "--set", "training.log_interval=1",
             "--set", "training.checkpoint_interval=50", "--quiet"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(url)
        runs = tmp_path / "runs" / "e"
        deadline = time.time() + 300
        while True:  # the first metrics have arrived at the server
            run_files = list(runs.glob("*/run.json"))
            run_id = json.loads(run_files[0].read_text()).get("mlflow_run_id") if run_files else None
            if run_id and client.get_metric_history(run_id, "train_loss"):
                break
            assert run.poll() is None and time.time() < deadline, run.communicate()[1]
            time.sleep(0.2)
        stop(server)  # the server dies, by its PID
        assert run.poll() is None, "training had already finished: make it longer"
        out, err = run.communicate(timeout=300)
    finally:
        stop(server)
    assert run.returncode == 0, err
    assert err.count("Warning: MLflow tracking stopped") == 1, err
    assert "training continues" in err and "Traceback" not in err
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FINISHED"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000050", "step-000100"]
    ck = checkpoint.load(run_dir)
    assert ck.meta["step"] == 100 and checkpoint.load_trainer_state(ck.path)["step"] == 100


def test_disk_full_during_a_checkpoint_write_is_reported_and_the_previous_checkpoint_survives(tmp_path, mlflow_sqlite):
    """A real ENOSPC: the run directory lives on a tmpfs (in a private mount namespace, so even
    root cannot write past its size) with room for one checkpoint and a half."""
    from mlflow.tracking import MlflowClient

    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
            capture_output=True).returncode != 0:
        missing_tool("needs a private mount namespace (unshare -m, root) to make a small disk")
    f = write_experiment(tmp_path / "e.toml")
    steps = ["--set", "training.max_steps=12", "--set", "training.checkpoint_interval=5", "--set",
             "training.eval_interval=5", "--quiet"]
    # the size of one checkpoint of this model, measured on the ordinary disk
    probe = train(load_experiment(f, ["training.max_steps=1", "training.sample_tokens=0",
                                      f"training.out_dir='{tmp_path / 'probe'}'"]), progress=False)
    size = sum(p.stat().st_size + 4096 for p in probe.checkpoint.iterdir())
    shutil.rmtree(tmp_path / "probe")

    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    script = ('mount -t tmpfs -o size=$1 tmpfs "$2" && shift 3 && "$@"; rc=$?; '
              'cp -a "$DISK/." "$SAVED/" 2>/dev/null; exit $rc')
    p = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(size * 3 // 2 + 16384), str(disk), "--",
         sys.executable, "-m", "gptx", "run", str(f), *steps, "--set", f"training.out_dir='{disk / 'runs'}'",
         "--set", "tracking.enabled=true", "--set", f"tracking.uri='{mlflow_sqlite}'"],
        env=os.environ | {"DISK": str(disk), "SAVED": str(saved)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    (run_dir,) = (saved / "runs" / "e").iterdir()
    kept = disk / "runs" / "e" / run_dir.name / "checkpoints" / "step-000005"
    assert "cannot write checkpoint step-000010 (No space left on device)" in line, line
    assert f"the previous checkpoint {kept} is intact" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000005"]  # no half-written one
    ck = checkpoint.load(run_dir / "checkpoints" / "step-000005")
    assert ck.meta["step"] == 5 and checkpoint.load_trainer_state(ck.path)["step"] == 5
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(mlflow_sqlite).get_run(run_id).info.status == "FAILED"
