"""Training: determinism, resume after a real signal, data cache, MLflow (embedded and a real
server), and generation from a finished run."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, gptx, missing_tool, write_experiment

from gptx.config import load_experiment
from gptx.plugins.tokenizers import GPT2Tokenizer
from gptx.training.step import build_schedule
from gptx.training.trainer import train


def test_lr_schedule_warmup_cosine_floor():
    cfg = load_experiment(REPO / "experiments" / "shakespeare_char.toml")
    lr = cfg.training.learning_rate
    lr_at = lambda step: lr * build_schedule(cfg).factor(step)  # noqa: E731
    assert lr_at(0) == pytest.approx(1e-3 / 101)
    assert lr_at(99) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100) == pytest.approx(1e-3)
    assert lr_at(1050) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert lr_at(2000) == pytest.approx(1e-4) and lr_at(5000) == pytest.approx(1e-4)


def load_dataset(cfg, tokenizer):
    """The experiment's dataset, prepared (read, tokenized through the cache, split)."""
    ds = cfg.data.cls(cfg.data.options, base_dir=cfg.base_dir, tokenizer=tokenizer,
                      block_size=cfg.model.block_size, seed=cfg.training.seed)
    ds.prepare()
    return ds


def test_data_is_tokenized_once_cached_and_split(tmp_path):
    cfg = load_experiment(write_experiment(tmp_path / "e.toml"), ["tokenizer.kind=gpt2"])
    tok = GPT2Tokenizer(None)
    ds = load_dataset(cfg, tok)
    cached = list((Path(os.environ["GPTX_CACHE_DIR"]) / "tokens").glob("*.bin"))
    assert cached, "token cache not written"
    train_tokens, val_tokens = ds.train, ds.val
    assert train_tokens.dtype == np.uint16
    total = len(train_tokens) + len(val_tokens)
    assert len(train_tokens) == int(total * 0.9)  # nanoGPT's split
    assert list(train_tokens[:4]) == tok.encode(Path(cfg.data.options.path).read_text()[:40])[:4]
    again = load_dataset(cfg, tok)
    assert isinstance(again.train, np.memmap) and Path(again.train.filename) == cached[0]  # read from the cache
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, y1 = ds.windows("train", 5, g1)
    x2, y2 = again.windows("train", 5, g2)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])


def test_same_config_same_loss_curve(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    a = train(load_experiment(f, ["training.max_steps=12", "training.eval_interval=6"]), progress=False)
    b = train(load_experiment(f, ["training.max_steps=12", "training.eval_interval=6"]), progress=False)
    assert a.history == b.history and len(a.history) == 2
    assert a.history[-1]["val_loss"] < 4.2  # char vocab of 65: ln(65) = 4.17 at random
    assert a.run_dir != b.run_dir


def test_final_val_loss_is_the_mean_over_the_whole_validation_split(tmp_path):
    from gptx import checkpoint

    cfg = load_experiment(write_experiment(tmp_path / "e.toml"), ["training.max_steps=4", "training.eval_interval=4"])
    result = train(cfg, progress=False)
    ck = checkpoint.load(result.checkpoint)
    ds = load_dataset(cfg, ck.tokenizer)
    T = cfg.model.block_size
    n = (len(ds.val) - 1) // T
    val = torch.from_numpy(np.asarray(ds.val, dtype=np.int64))
    x, y = val[: n * T].view(n, T), val[1: n * T + 1].view(n, T)  # every window, independently cut
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(ck.model(x)[0].reshape(n * T, -1), y.reshape(-1)).item()
    assert result.final_val_loss == pytest.approx(expected, abs=1e-5)
    assert result.final_val_loss != pytest.approx(result.val_loss, abs=1e-6)  # not the sampled estimate
    assert json.loads((result.run_dir / "run.json").read_text())["final_val_loss"] == result.final_val_loss
    capped, _ = ds.tiled_windows("val", 3 * T)  # over the cap: that many windows, spread over the split
    assert len(capped) == 3 and torch.equal(capped[0], x[0]) and torch.equal(capped[2], x[-1])
    assert any(torch.equal(capped[1], w) for w in x[n // 2 - 1: n // 2 + 2])
    off = train(load_experiment(cfg.source, ["training.max_steps=2", "training.final_eval_tokens=0"]), progress=False)
    assert off.final_val_loss is None and "final_val_loss" not in json.loads((off.run_dir / "run.json").read_text())


def test_bfloat16_autocast_trains_on_cpu_and_keeps_fp32_weights(tmp_path):
    from gptx import checkpoint

    f = write_experiment(tmp_path / "e.toml")
    steps = ["training.max_steps=8", "training.eval_interval=8", "training.sample_tokens=0"]
    fp32 = train(load_experiment(f, steps), progress=False)
    bf16 = train(load_experiment(f, [*steps, "training.dtype='bfloat16'"]), progress=False)
    # the same batches and initial weights: bf16 matmuls move the curve a little, not a lot
    assert bf16.history[-1]["val_loss"] == pytest.approx(fp32.history[-1]["val_loss"], abs=0.05)
    assert bf16.history[-1]["val_loss"] != fp32.history[-1]["val_loss"]  # autocast really ran in bf16
    assert {t.dtype for t in checkpoint.load_weights(bf16.checkpoint).values()} == {torch.float32}


def test_torch_compile_on_cpu_follows_the_eager_loss_curve(tmp_path):
    if not (shutil.which("g++") or shutil.which("c++")):
        missing_tool("torch.compile on CPU needs a C++ compiler")
    f = write_experiment(tmp_path / "e.toml")
    steps = ["training.max_steps=6", "training.eval_interval=3", "training.sample_tokens=0", "training.final_eval_tokens=0"]
    eager = train(load_experiment(f, steps), progress=False)
    compiled = train(load_experiment(f, [*steps, "training.compile=true"]), progress=False)
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4) and b["step"] == a["step"]


def _wait_for(pred, timeout=300):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    # long enough that the signal always lands mid-run, even on a fast machine
    steps = ["--set", "training.max_steps=300", "--set", "training.checkpoint_interval=5", "--set", "training.eval_interval=100"]
    (tmp_path / "ref").mkdir()
    ref = write_experiment(tmp_path / "ref" / "e.toml")
    gptx("run", ref, *steps, "--quiet", check=True)
    (ref_ckpt,) = (tmp_path / "ref" / "runs" / "e").glob("*/checkpoints/step-000300")

    (tmp_path / "int").mkdir()
    f = write_experiment(tmp_path / "int" / "e.toml")
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(f), *steps, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "int" / "runs" / "e"
    _wait_for(lambda: list(runs.glob("*/checkpoints/step-*")) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "Traceback" not in err
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "KILLED"
    stopped = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert stopped < 300

    gptx("run", f, *steps, "--resume", "--quiet", check=True)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FINISHED"
    a = load_file(ref_ckpt / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "step-000300" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"  # bitwise on CPU


@pytest.mark.slow
def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    p = gptx("run", f, "--resume", cwd=tmp_path)
    assert p.returncode == 2 and "no interrupted run" in p.stderr and "Traceback" not in p.stderr


def test_mlflow_embedded_store_records_the_run(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "tracked.toml")
    cfg = load_experiment(f, ["tracking.enabled=true", f"tracking.uri='{mlflow_sqlite}'", "training.max_steps=10",
                              "training.log_interval=1", "training.eval_interval=5"])
    result = train(cfg, progress=False)
    client = MlflowClient(mlflow_sqlite)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    assert run.data.params["model.n_layer"] == "2" and run.data.params["tokenizer.kind"] == "char"
    assert run.data.params["model.attention.kind"] == "causal"
    assert len(client.get_metric_history(result.run_id, "train_loss")) == 10
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [5, 10]
    assert [(m.step, m.value) for m in client.get_metric_history(result.run_id, "final_val_loss")] == [
        (10, pytest.approx(result.final_val_loss))]
    assert len(client.get_metric_history(result.run_id, "tokens_per_sec")) == 10
    assert len(client.get_metric_history(result.run_id, "lr")) == 10
    tags = run.data.tags
    assert tags["gptx.version"] and "causal" in json.loads(tags["gptx.plugins"])["attention"]
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "sample.txt", "checkpoint"} <= names
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoint")} >= {
        "checkpoint/model.safetensors", "checkpoint/gptx.json"}


@pytest.mark.slow
def test_real_mlflow_server_run_and_generate_from_run(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "served.toml")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    p = gptx("run", f, "--set", "tracking.enabled=true", "--set", "training.max_steps=10", "--set",
             "training.log_interval=1", "--set", "training.eval_interval=5", cwd=tmp_path, env=env, check=True)
    run_id = p.stdout.split("MLflow run: ")[1].split()[0]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "10"
    assert len(client.get_metric_history(run_id, "train_loss")) == 10
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [5, 10]
    local = Path(client.download_artifacts(run_id, "sample.txt", str(tmp_path)))
    assert local.read_text().strip()
    g = gptx("generate", f"runs:/{run_id}", "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
             "--json", cwd=tmp_path, env=env, check=True)
    out = json.loads(g.stdout)
    assert len(out["ids"]) == 8 and out["text"]
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server


def test_chunked_tokenization_equals_whole_text():
    """The text dataset tokenizes in pieces cut by gptx.prepare.safe_cut; whitespace runs, CRLF
    and special tokens around the cuts must not change a single id."""
    from helpers import SHAKESPEARE

    from gptx.prepare import Chunker

    tok = GPT2Tokenizer(None)
    text = SHAKESPEARE.read_text() + "\n\n\nA  b\n \nC\r\nD\n<|endoftext|>E\n"
    chunker = Chunker(2000)
    chunks = [c for i in range(0, len(text), 700) for c in chunker.feed(text[i:i + 700])] + list(chunker.flush())
    assert len(chunks) > 100 and "".join(chunks) == text
    assert [t for c in chunks for t in tok.encode(c)] == tok.encode(text)


def test_auto_dtype_is_float32_on_cpu_where_bf16_measured_slower():
    from gptx.training.machine import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "float32"  # whatever the CPU's flags: see resolve_dtype
    assert resolve_dtype("float32", cpu) == "float32" and resolve_dtype("bfloat16", cpu) == "bfloat16"


HEAP_PROBE = """
import ctypes, torch
from gptx.training.machine import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
MiB = 2**20

def a_large_tensor(mib):  # allocated, written, freed, as a step's logits
    x = torch.ones(mib * MiB // 4)
    mapped_while_alive = mallinfo2().hblkhd // MiB  # in chunks glibc mmapped (and unmaps on free)
    del x
    return mapped_while_alive, mallinfo2().arena // MiB  # arena: the heap, free parts included

plain = a_large_tensor(64)
applied = keep_freed_memory(torch.device("cpu"))
first = a_large_tensor(64)
then = a_large_tensor(48)
print((applied, keep_freed_memory(torch.device("meta")), plain, first, then))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_cpu_training_keeps_freed_tensor_memory_in_the_heap_for_the_next_step():
    """Each step's logits (~200 MiB with GPT-2's vocabulary) used to be mmapped and unmapped by
    glibc every step, so the kernel faulted in and zeroed them again; after keep_freed_memory they
    come from the heap, stay there when freed and serve the next step's tensors. (What that saves
    in page faults and time depends on the kernel: `gptx bench --only train` reports faults per step.)
    The second tensor is smaller than the first: torch asks glibc for 64-byte-aligned blocks, for
    which glibc 2.36 wants 96 bytes more than a same-size block leaves free, so whether one lone
    tensor of one size reuses its predecessor depends on what else sits in the heap (seen both ways
    in two environments; training's steps free many tensors together and stayed bounded in both)."""
    r = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, on_meta, plain, first, then = ast.literal_eval(r.stdout)
    assert applied is True and on_meta is False
    assert plain[0] >= 64, plain  # before: the block was a fresh mapping of its own
    assert first[0] < 64 and first[1] >= 64, first  # after: from the heap, and still there once freed
    assert then[0] < 48 and then[1] - first[1] < 16, (first, then)  # the next tensor reuses it: no growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_gptx_keep_freed_memory_0_leaves_the_allocator_alone_and_other_values_are_refused(tmp_path):
    env = os.environ | {"GPTX_KEEP_FREED_MEMORY": "0"}
    r = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    applied, _, _, first, _ = ast.literal_eval(r.stdout)
    assert applied is False and first[0] >= 64, first  # still a mapping of its own, unmapped on free
    exp = write_experiment(tmp_path / "e.toml")
    for command in (["validate", exp], ["bench", "--only", "train", "--experiment", exp]):  # bench: before measuring
        bad = gptx(*command, env={"GPTX_KEEP_FREED_MEMORY": "yes"})
        assert bad.returncode == 2 and bad.stderr == "Error: GPTX_KEEP_FREED_MEMORY: expected 0 or 1, got 'yes'\n"


def test_plan_run_resolves_a_copy_and_never_changes_the_callers_config(tmp_path):
    """The plan holds the resolved config (dtype, vocabulary size); the config handed in stays as
    loaded, so one loaded config can be planned again (a sweep's variants, gptx bench)."""
    from gptx.training.plan import plan_run

    cfg = load_experiment(write_experiment(tmp_path / "e.toml"), ["training.dtype='auto'", "training.device='cpu'"])
    before = cfg.to_dict()
    plan = plan_run(cfg, outputs=False)
    assert cfg.to_dict() == before and cfg.model.vocab_size is None and cfg.training.dtype == "auto"
    assert plan.cfg is not cfg and plan.cfg.model.vocab_size == 65 and plan.cfg.training.dtype == "float32"  # auto on a CPU
