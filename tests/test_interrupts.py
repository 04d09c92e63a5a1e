"""Interruptions with real processes and real signals: SIGINT checkpoints, marks the MLflow run
KILLED and resumes to the very weights of an uninterrupted run; kill -9 at any moment (one of
them in the middle of a checkpoint write) always leaves the previous checkpoint loadable and
resumable. (SIGTERM + bitwise resume without MLflow is in test_train.py.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import gptx, write_experiment
from safetensors.torch import load_file

from gptx import checkpoint
from gptx.config import load_experiment
from gptx.training.trainer import train

pytestmark = pytest.mark.slow

STEPS = 120
BASE = [f"training.max_steps={STEPS}", "training.eval_interval=60", "training.sample_tokens=0"]


def sets(*items: str) -> list[str]:
    return [a for item in (*BASE, *items) for a in ("--set", item)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final weights of an uninterrupted run (in-process; one torch thread, like the CLI here)."""
    d = tmp_path_factory.mktemp("reference")
    result = train(load_experiment(write_experiment(d / "e.toml"), BASE), progress=False)
    assert result.step == STEPS
    return load_file(result.checkpoint / "model.safetensors")


def assert_same_weights(ref: dict, ckpt_dir: Path):
    got = load_file(ckpt_dir / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs from the uninterrupted run"  # bitwise on CPU


def start(f: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), *args, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, proc: subprocess.Popen, timeout=300, poll=0.005):
    deadline = time.time() + timeout
    while not (found := pred()):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment came:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError
        time.sleep(poll)
    return found


def assert_one_curve(run_dir: Path) -> None:
    """metrics.jsonl after interruptions and resumes: every step once, the wall clock never going
    back, one final evaluation (records past the resumed checkpoint were dropped)."""
    from gptx.metrics_log import read, series

    records = read(run_dir / "metrics.jsonl")
    steps, seconds, _ = series(records, "train_loss")
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, STEPS + 1))
    assert (seconds[1:] >= seconds[:-1]).all()
    assert [r["step"] for r in records if "final_val_loss" in r] == [STEPS]


def steps_saved(run_root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_root.glob("*/checkpoints/step-*"))


def test_sigint_checkpoints_marks_mlflow_killed_and_resumes_bitwise(tmp_path, reference, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "e.toml")
    args = sets("training.checkpoint_interval=10", "tracking.enabled=true", f"tracking.uri='{mlflow_sqlite}'")
    runs = tmp_path / "runs" / "e"
    proc = start(f, *args)
    wait_for(lambda: steps_saved(runs), proc)  # training is under way: step 10 is saved
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "interrupted by SIGINT" in err and "--resume" in err
    (run_dir,) = runs.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "KILLED"
    stopped = steps_saved(runs)[-1]
    assert 10 <= stopped < STEPS
    assert f"step-{stopped:06d}" in err  # the message names the checkpoint it wrote
    checkpoint.load(run_dir)  # and that checkpoint loads
    client = MlflowClient(mlflow_sqlite)
    assert client.get_run(info["mlflow_run_id"]).info.status == "KILLED"

    done = gptx("run", f, *args, "--resume", "--quiet", check=True)
    assert "MLflow run: " + info["mlflow_run_id"] in done.stdout  # the same run continued
    assert client.get_run(info["mlflow_run_id"]).info.status == "FINISHED"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FINISHED"
    steps_logged = [m.step for m in client.get_metric_history(info["mlflow_run_id"], "train_loss")]
    assert steps_logged[-1] == STEPS
    assert_same_weights(reference, run_dir / "checkpoints" / f"step-{STEPS:06d}")
    assert_one_curve(run_dir)


def test_kill_9_at_any_moment_leaves_a_loadable_resumable_checkpoint(tmp_path, reference):
    seed = int(os.environ.get("GPTX_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    f = write_experiment(tmp_path / "e.toml")
    args = sets("training.checkpoint_interval=1")  # a checkpoint every step: kills land in writes
    runs = tmp_path / "runs" / "e"
    leftovers_seen = False
    for i, moment in enumerate(["mid-write", "random", "random"]):
        before = steps_saved(runs)
        proc = start(f, *args, *(["--resume"] if i else []))
        if moment == "mid-write":
            # freeze the process the moment a temporary checkpoint directory exists (a write in
            # progress), make sure it is still there, then kill -9 it
            def writing():
                if steps_saved(runs)[-1:] >= [2] and list(runs.glob("*/checkpoints/.step-*")):
                    proc.send_signal(signal.SIGSTOP)
                    if list(runs.glob("*/checkpoints/.step-*")):
                        return True
                    proc.send_signal(signal.SIGCONT)
                return False

            wait_for(lambda: steps_saved(runs) and writing(), proc, poll=0.001)
        else:
            wait_for(lambda: steps_saved(runs)[-1:] > before[-1:], proc)  # it made progress
            time.sleep(rng.uniform(0, 0.5))
        proc.kill()  # SIGKILL: no handler runs
        proc.communicate(timeout=60)
        if proc.returncode != -signal.SIGKILL:  # it finished first: nothing left to test
            pytest.fail(f"run {i} ended on its own (exit {proc.returncode}) before kill -9 (seed {seed})")
        (run_dir,) = runs.iterdir()
        leftovers_seen |= bool(list((run_dir / "checkpoints").glob(".step-*")))
        ck = checkpoint.load(run_dir)  # the newest complete checkpoint, intact
        assert checkpoint.load_trainer_state(ck.path)["step"] == ck.meta["step"]
        assert all(torch.isfinite(p).all() for p in ck.model.parameters())
        if moment == "mid-write":
            assert leftovers_seen, "the kill should have left a half-written .step-* directory behind"
            g = gptx("generate", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0")
            assert g.returncode == 0 and g.stdout.startswith("ROMEO:"), g.stderr

    gptx("run", f, *args, "--resume", check=True)
    (run_dir,) = runs.iterdir()
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".*")), "leftover temporary directories were not cleaned by the next save"
    assert [p.name for p in sorted(ckpts.iterdir())] == [f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]
    assert_same_weights(reference, ckpts / f"step-{STEPS:06d}")
    assert_one_curve(run_dir)


def test_sigterm_after_the_last_step_stops_at_once_and_keeps_the_final_checkpoint(tmp_path):
    """After the last step come the whole-split evaluation and the sample (seconds to minutes on
    a big model). A SIGTERM there must not be swallowed: exit 143, the run KILLED, the final
    checkpoint intact; --resume then finishes what was left."""
    f = write_experiment(tmp_path / "e.toml")
    args = ["--set", "training.max_steps=6", "--set", "training.eval_interval=6", "--set", "model.n_layer=4",
            "--set", "model.n_embd=128", "--set", "model.n_head=4", "--set", "training.final_eval_tokens=10000000",
            "--set", "training.batch_size=2", "--set", "training.sample_tokens=20"]
    runs = tmp_path / "runs" / "e"
    proc = start(f, *args)
    wait_for(lambda: list(runs.glob("*/checkpoints/step-000006")), proc, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "interrupted by SIGTERM" in err and "step-000006" in err and "Traceback" not in err
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "KILLED"
    checkpoint.load(run_dir / "checkpoints" / "step-000006")
    done = gptx("run", f, *args, "--resume", "--quiet", check=True)
    assert "after 6 steps" in done.stdout
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FINISHED" and info["final_val_loss"] > 0
