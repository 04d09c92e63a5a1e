"""training.init_from: a run starts from the weights of a checkpoint, a run directory or a
`gptx import-hf` folder (here a randomly initialised Hugging Face GPT-2: no downloads); the
model and tokenizer come from the source, the optimizer starts fresh, and the source is
recorded. With a negligible learning rate the run evaluates like the imported model."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, gptx

import transformers  # a test dependency: missing is a failure, not a skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, initializer_range=0.1)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf")
    gptx("import-hf", root / "hf", "-o", root / "gpt2-tiny", check=True)
    return root / "gpt2-tiny"


def experiment(d, imported, body: str = "") -> object:
    f = d / "ft.toml"
    f.write_text(f"""
[data]
path = "{REPO / 'experiments' / 'data' / 'tinyshakespeare.txt'}"

[training]
init_from = "{imported}"
max_steps = 2
batch_size = 2
learning_rate = 1e-12
eval_interval = 2
eval_steps = 1
final_eval_tokens = 4096
sample_tokens = 0
out_dir = "{d / 'runs'}"

[tracking]
enabled = false
{body}""")
    return f


def test_a_run_from_imported_weights_evaluates_like_them(tmp_path, imported):
    from safetensors.torch import load_file

    f = experiment(tmp_path, imported)
    gptx("run", f, "--quiet", cwd=tmp_path, check=True)
    (run_dir,) = (tmp_path / "runs" / "ft").iterdir()
    ckpt = run_dir / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "gptx.json").read_text())
    assert meta["init_from"].endswith("step-000000") and meta["config"]["model"]["n_embd"] == 64
    assert meta["config"]["tokenizer"]["kind"] == "gpt2"
    source = load_file(imported / "checkpoints" / "step-000000" / "model.safetensors")
    trained = load_file(ckpt / "model.safetensors")
    assert source.keys() == trained.keys()
    assert max((source[k] - trained[k]).abs().max().item() for k in source) < 1e-6  # lr 1e-12: the same weights
    text = tmp_path / "val.txt"
    text.write_text((REPO / "experiments" / "data" / "tinyshakespeare.txt").read_text()[-3000:])
    before = json.loads(gptx("eval", imported, "--data", text, "--json", cwd=tmp_path, check=True).stdout)
    after = json.loads(gptx("eval", run_dir, "--data", text, "--json", cwd=tmp_path, check=True).stdout)
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)


def test_init_from_is_recorded_in_mlflow(tmp_path, imported, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = experiment(tmp_path, imported, f"uri = '{mlflow_sqlite}'").read_text().replace("enabled = false", "enabled = true")
    (tmp_path / "ft.toml").write_text(f)
    out = gptx("run", tmp_path / "ft.toml", "--quiet", cwd=tmp_path, check=True).stdout
    run_id = out.split("MLflow run: ")[1].split()[0]
    tags = MlflowClient(mlflow_sqlite).get_run(run_id).data.tags
    assert tags["gptx.init_from"].endswith("step-000000")


@pytest.mark.parametrize("body, key", [
    ("\n[model]\nn_layer = 3\n", "model.n_layer"),  # the source has 2
    ('\n[tokenizer]\nkind = "char"\n', "tokenizer.kind"),  # the source's is gpt2
])
def test_a_file_that_contradicts_the_source_is_one_line(tmp_path, imported, body, key):
    f = experiment(tmp_path, imported)
    f.write_text(body + f.read_text())
    proc = gptx("run", f, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"{key}: is " in line and "init_from" in line and "remove it" in line
    assert not (tmp_path / "runs").exists()


def test_a_missing_source_is_one_line(tmp_path):
    f = experiment(tmp_path, tmp_path / "nowhere")
    proc = gptx("run", f, cwd=tmp_path)
    assert proc.returncode == 2 and "training.init_from: cannot start from" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_the_shipped_finetune_recipe_names_the_import_folder():
    from gptx.config import load_experiment

    cfg = load_experiment(REPO / "experiments" / "finetune_gpt2.toml")
    assert cfg.training.init_from == "../gpt2-124m" and cfg.training.grad_accum_steps == 32
    assert cfg.training.schedule.name == "constant" and cfg.training.learning_rate == 3e-5
