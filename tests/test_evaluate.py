"""gptx eval against independent computations: Hugging Face's GPT2LMHeadModel on a random GPT-2
imported with gptx import-hf (text loss, strided windows, HellaSwag-style accuracy as llm.c
scores it), the ONNX export against the checkpoint (onnxruntime alone, no torch import), and
results logged to the MLflow run a runs:/ checkpoint came from."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import SHAKESPEARE, gptx, tiny_checkpoint_and_export

import transformers  # a test dependency: missing is a failure, not a skip

from gptx.evaluate import TorchScorer, read_examples, score_example  # noqa: E402
from gptx.hf import import_hf  # noqa: E402
from gptx.plugins.tokenizers import GPT2Tokenizer  # noqa: E402

C = 64  # the HF model's n_positions: gptx's block_size after import
TEXT = SHAKESPEARE.read_text()[:2500] + "Ünïcödé — “quotes” and 中文 at the end.\n"
EXAMPLES = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon and the stars above", "dog", "periodic table"], "label": 0},
    {"ctx": "ROMEO: O, she doth teach the torches to", "endings": ["burn bright!", "sing", "eat cake", "run"], "label": 0},
    {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
    {"ctx": "To be, or not to be,", "endings": ["that is the question.", "a banana", "42", "quietly"], "label": 0},
    {"ctx": "She opened the door and", "endings": ["walked in.", "the door", "flew to Mars on a spoon", "x"], "label": "0"},
    {"ctx": "First Citizen: Before we proceed any further,", "endings": ["hear me speak.", "All: Speak, speak.",
     "You are all resolved rather to die than to famish?", "Resolved. resolved."], "label": 0},
]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random HF GPT-2 (GPT-2's vocabulary, 2 layers, 64 wide), imported with gptx import-hf."""
    root = tmp_path_factory.mktemp("hf-eval")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=C, initializer_range=0.1)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "hf")
    import_hf(root / "hf", root / "run")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "task.jsonl").write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n", encoding="utf-8")
    return type("HF", (), {"model": model, "root": root, "run": root / "run", "text": root / "text.txt",
                           "task": root / "task.jsonl"})


def hf_text_loss(model, ids: list[int], stride: int) -> tuple[float, int]:
    """Total nats and count over every token after the first, each scored once, from windows of C
    inputs advancing by ``stride`` (only targets not scored before count), with HF's model."""
    scored: dict[int, int] = {}  # target index -> context length it was scored with
    total, begin = 0.0, 0
    while len(scored) < len(ids) - 1:
        window = ids[begin:begin + C + 1]  # C inputs and the next token
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].double(), -1)  # [L, V]
        for i, target in enumerate(window[1:]):
            t = begin + 1 + i
            if t not in scored:
                scored[t] = i + 1
                total -= float(logp[i, target])
        begin += stride
    assert sorted(scored) == list(range(1, len(ids)))
    assert all(ctx >= C - stride for t, ctx in scored.items() if t > C)  # the recipe's promise
    return total, len(scored)


def run_eval(*args) -> dict:
    r = gptx("eval", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 16])
def test_text_loss_matches_transformers(hf, stride):
    ids = GPT2Tokenizer(None).encode(TEXT)
    total, count = hf_text_loss(hf.model, ids, stride or C)
    got = run_eval(hf.run, "--data", hf.text, *(["--stride", stride] if stride else []))
    assert got["tokens"] == count == len(ids) - 1
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)


@pytest.mark.parametrize("n, context, stride", [(2, 4, 4), (5, 4, 4), (100, 16, 16), (100, 16, 1), (100, 16, 7),
                                                 (17, 16, 3), (1000, 64, 63)])
def test_text_windows_score_every_token_once(n, context, stride):
    from gptx.evaluate import text_windows

    seen = []
    for begin, end, first in text_windows(n, context, stride):
        assert 0 < end - begin <= context and first > begin
        targets = range(max(first, begin + 1), end + 1)
        assert all(t - begin >= context - stride or t <= context for t in targets)  # context kept
        seen += targets
    assert seen == list(range(1, n))


def hf_choice(model, tokenizer, ex: dict) -> tuple[int, int]:
    """llm.c's hellaswag.py scoring with HF's model: lowest summed and lowest mean ending loss."""
    ctx = tokenizer.encode(ex["ctx"])
    ends = [tokenizer.encode(" " + e) for e in ex["endings"]]
    width = max(len(ctx) + len(e) for e in ends)
    tokens = torch.zeros((len(ends), width), dtype=torch.long)
    mask = torch.zeros((len(ends), width), dtype=torch.long)
    for i, e in enumerate(ends):
        tokens[i, :len(ctx) + len(e)] = torch.tensor(ctx + e)
        mask[i, len(ctx):len(ctx) + len(e)] = 1
    with torch.no_grad():
        logits = model(tokens).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                               reduction="none").view(len(ends), -1)
    shift_mask = mask[:, 1:]
    summed = (losses * shift_mask).sum(1)
    return int(summed.argmin()), int((summed / shift_mask.sum(1)).argmin())


@pytest.mark.slow
def test_multiple_choice_matches_llmc_scoring_with_transformers(hf):
    tok = GPT2Tokenizer(None)
    want = [hf_choice(hf.model, tok, ex) for ex in EXAMPLES]
    scorer = TorchScorer(str(hf.run))
    got = [score_example(scorer, ex) for ex in read_examples(hf.task, scorer.tokenizer, scorer.context)]
    assert got == want
    labels = [int(ex["label"]) for ex in EXAMPLES]
    result = run_eval(hf.run, "--task", hf.task)
    assert result == {"source": str(hf.run), "n": len(EXAMPLES),
                      "acc": pytest.approx(np.mean([p == y for (p, _), y in zip(want, labels)])),
                      "acc_norm": pytest.approx(np.mean([p == y for (_, p), y in zip(want, labels)]))}


def test_a_long_context_keeps_its_newest_tokens(hf):
    """An example longer than the model's window is scored on the last C + 1 tokens of each row."""
    tok = GPT2Tokenizer(None)
    long_ex = {"ctx": TEXT[:600], "endings": ["speak.", "famish?"], "label": 1}
    path = hf.root / "long.jsonl"
    path.write_text(json.dumps(long_ex))
    scorer = TorchScorer(str(hf.run))
    (ex,) = read_examples(path, scorer.tokenizer, C)
    assert len(ex.context) > C
    ctx = tok.encode(long_ex["ctx"])
    ends = [tok.encode(" " + e) for e in long_ex["endings"]]
    summed = []
    for e in ends:
        row = ctx[-(C + 1 - len(e)):] + e
        with torch.no_grad():
            logp = torch.log_softmax(hf.model(torch.tensor([row[:-1]])).logits[0].double(), -1)
        summed.append(-sum(float(logp[len(row) - len(e) - 1 + i, t]) for i, t in enumerate(e)))
    assert score_example(scorer, ex) == (int(np.argmin(summed)), int(np.argmin([s / len(e) for s, e in zip(summed, ends)])))
    assert abs(summed[0] - summed[1]) > 1e-3  # a real choice, not a tie


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A byte-level checkpoint and its ONNX export (block 64), a text and a task file."""
    root = tmp_path_factory.mktemp("tiny-eval")
    ck, export = tiny_checkpoint_and_export(root, 64)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "task.jsonl").write_text("\n".join(json.dumps(e) for e in EXAMPLES[:4]) + "\n", encoding="utf-8")
    return type("Tiny", (), {"ck": ck, "export": export, "root": root})


NO_TORCH = (
    "import json, sys\n"
    "from gptx.cli import main\n"
    "sys.argv = ['gptx', 'eval', *sys.argv[1:], '--json']\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 8])
def test_onnx_export_agrees_with_the_checkpoint_without_torch(tiny, stride):
    args = ["--data", tiny.root / "text.txt", "--task", tiny.root / "task.jsonl", *(["--stride", stride] if stride else [])]
    from_ck = run_eval(tiny.ck, *args)
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny.export), *map(str, args)], capture_output=True,
                       text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    from_onnx = json.loads(r.stdout)
    assert from_onnx["tokens"] == from_ck["tokens"] == len(TEXT.encode("utf-8")) - 1
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert from_onnx[key] == pytest.approx(from_ck[key], rel=1e-4, abs=1e-4), key
    assert (from_onnx["acc"], from_onnx["acc_norm"], from_onnx["n"]) == (from_ck["acc"], from_ck["acc_norm"], 4)


@pytest.mark.slow
def test_results_go_to_the_mlflow_run_of_a_runs_uri(tiny, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    client = MlflowClient()
    exp = client.get_experiment_by_name("eval-test") or client.create_experiment("eval-test")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, str(tiny.ck), "checkpoint")
    client.set_terminated(run_id)
    r = gptx("eval", f"runs:/{run_id}", "--data", tiny.root / "text.txt", "--task", tiny.root / "task.jsonl", "--json",
             env={"MLFLOW_TRACKING_URI": mlflow_sqlite})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    metrics = client.get_run(run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("eval/")} == pytest.approx({
        "eval/text/loss": out["loss"], "eval/text/perplexity": out["perplexity"],
        "eval/text/bits_per_byte": out["bits_per_byte"], "eval/text/tokens": out["tokens"],
        "eval/task/acc": out["acc"], "eval/task/acc_norm": out["acc_norm"], "eval/task/n": 4})


def test_the_table_names_each_file(tiny):
    r = gptx("eval", tiny.ck, "--data", tiny.root / "text.txt", "--task", tiny.root / "task.jsonl")
    assert r.returncode == 0, r.stderr
    data_line, task_line = r.stdout.strip().splitlines()
    assert data_line.startswith("text.txt: loss ") and "perplexity" in data_line and "bits/byte" in data_line
    assert task_line.startswith("task.jsonl: acc ") and "acc_norm" in task_line and "(n = 4)" in task_line
