"""torchrun on CPU: 2 gloo processes, DDP and FSDP, against a single process with the same
global batch; one MLflow run; checkpoints that resume and load in a single process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import gptx, write_experiment

pytestmark = pytest.mark.slow

STEPS = ["--set", "training.max_steps=12", "--set", "training.eval_interval=6", "--set", "training.log_interval=1",
         "--set", "tracking.enabled=true"]
# how 2 processes share the global batch: whole micro-batches each (grad_accum_steps 2), or half the
# rows of every micro-batch (grad_accum_steps 1, batch_size 4)
SPLITS = {"micro-batches": ["--set", "training.grad_accum_steps=2"], "rows": ["--set", "training.grad_accum_steps=1"]}


def _train_losses(client, run_id):
    return [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, mlflow_sqlite, parallel, split):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    uri = ["--set", f"tracking.uri='{mlflow_sqlite}'", *SPLITS[split]]
    name = f"{parallel}_{split.replace('-', '_')}"  # one MLflow experiment per case: the store is shared
    single = write_experiment(tmp_path / f"single_{name}.toml")
    multi = write_experiment(tmp_path / f"multi_{name}.toml")
    one = gptx("run", single, *STEPS, *uri, "--quiet", cwd=tmp_path, check=True)
    two = gptx("run", multi, *STEPS, *uri, "--set", f"training.parallel='{parallel}'", "--nproc", "2", "--quiet",
               cwd=tmp_path, check=True)
    run_one = one.stdout.split("MLflow run: ")[1].split()[0]
    run_two = two.stdout.split("MLflow run: ")[1].split()[0]
    exp = client.get_experiment_by_name(f"multi_{name}")
    assert len(client.search_runs([exp.experiment_id])) == 1  # only rank 0 tracks
    a, b = _train_losses(client, run_one), _train_losses(client, run_two)
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, abs=1e-4)
    assert client.get_run(run_two).data.params["training.parallel"] == parallel
    # the distributed checkpoint loads and generates in a single process
    (run_dir,) = (tmp_path / "runs" / f"multi_{name}").iterdir()
    g = gptx("generate", run_dir, "--prompt", "KING", "--max-new-tokens", "5", "--temperature", "0", "--json", check=True)
    assert len(json.loads(g.stdout)["ids"]) == 5


def test_fsdp_checkpoint_resumes_in_a_single_process(tmp_path):
    from safetensors.torch import load_file

    steps = ["--set", "training.max_steps=120", "--set", "training.checkpoint_interval=4", "--set",
             "training.grad_accum_steps=2", "--set", "training.eval_interval=20"]
    ref = write_experiment(tmp_path / "ref.toml")
    gptx("run", ref, *steps, "--quiet", cwd=tmp_path, check=True)

    f = write_experiment(tmp_path / "sharded.toml")
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), *steps, "--set", "training.parallel='fsdp'",
                             "--nproc", "2", "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    runs = tmp_path / "runs" / "sharded"
    deadline = time.time() + 300
    while not list(runs.glob("*/checkpoints/step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both ranks
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "KILLED"

    gptx("run", f, *steps, "--resume", "--quiet", cwd=tmp_path, check=True)  # one process now
    a = load_file(next((tmp_path / "runs" / "ref").glob("*/checkpoints/step-000120")) / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "step-000120" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_the_readmes_torchrun_command_runs_on_the_shipped_experiment(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m gptx run experiments/shakespeare_char.toml`,
    as the README writes it (its grad_accum_steps is 1: the processes split each micro-batch's rows),
    shortened to a few steps."""
    from helpers import REPO

    short = ["--set", "training.max_steps=3", "--set", "training.eval_steps=1", "--set", "tracking.enabled=false",
             "--set", "training.final_eval_tokens=2000", "--set", "training.sample_tokens=0",
             "--set", f"training.out_dir='{tmp_path / 'runs'}'"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gptx", "run",
           str(REPO / "experiments" / "shakespeare_char.toml"), *short, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:  # never leave a rank behind, whatever happened
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err[-3000:]
    assert "after 3 steps" in out


def test_a_global_batch_that_cannot_be_split_is_one_clear_line(tmp_path):
    f = write_experiment(tmp_path / "e.toml")  # batch_size 4
    proc = gptx("run", f, "--set", "training.batch_size=5", "--set", "training.grad_accum_steps=3", "--nproc", "2",
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "training.grad_accum_steps: the global batch of grad_accum_steps x batch_size = 3 x 5 = 15 sequences" in line
    assert "cannot be shared evenly by 2 processes" in line
    assert "grad_accum_steps in 2, 4, 6" in line and "batch_size in 4, 6" in line
    assert not (tmp_path / "runs").exists()


def test_every_rank_gets_an_equal_share_in_micro_batches_that_fit():
    from types import SimpleNamespace

    from gptx.training.step import BatchSplit

    for A, bs, world in [(1, 12, 2), (2, 4, 2), (4, 8, 8), (2, 8, 16), (3, 4, 4), (1, 1, 1), (5, 6, 3)]:
        tc = SimpleNamespace(grad_accum_steps=A, batch_size=bs)
        splits = [BatchSplit.plan(tc, r, world) for r in range(world)]
        assert sorted(row for s in splits for row in s.rows) == list(range(A * bs))  # every row once
        for s in splits:
            assert s.rows_per_micro <= bs and s.micro_batches * s.rows_per_micro == len(s.rows) == A * bs // world
    one = BatchSplit.plan(SimpleNamespace(grad_accum_steps=3, batch_size=4))
    assert (one.micro_batches, one.rows_per_micro, one.subset) == (3, 4, None)  # one process: as always
    # an absurd batch is planned in O(sqrt) steps and no per-row list, for the memory check to refuse it
    huge = BatchSplit.plan(SimpleNamespace(grad_accum_steps=3, batch_size=10**9), 1, 2)
    assert (huge.micro_batches, huge.rows_per_micro, huge.rows) == (2, 75 * 10**7, range(15 * 10**8, 3 * 10**9))
    from gptx.training.step import _largest_divisor

    for n in range(1, 150):
        for limit in range(1, 40):
            assert _largest_divisor(n, limit) == max(d for d in range(1, limit + 1) if n % d == 0)
