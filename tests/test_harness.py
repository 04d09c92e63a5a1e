"""`gptx eval --harness` and the lm-eval backend `gptx` (gptx.harness): real lm-eval, real
transformers, real tiny models, local task YAMLs over jsonl files (no network: the datasets
library runs offline with its cache under tmp_path).

The key check: a checkpoint scores what lm-eval's own hf backend scores on its `gptx export
--format hf` folder. The backend mirrors the hf backend's batching (sort, right-pad, one forward
per batch), so both models see the same tensor shapes: for the GPT-2 layout (GPT2LMHeadModel)
every float comes out bit for bit equal. For the Llama layout, transformers' LlamaForCausalLM
rounds differently from gptx's RoPE/SwiGLU blocks (logits within about 1 float32 ulp, 1.2e-7
here), so a request's log-likelihood, a sum over its tokens, can differ in the 7th significant
digit: those results agree to a relative 1e-6.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from helpers import gptx, tiny_checkpoint

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}
LLAMA = {"positional": {"kind": "rope"}, "ffn": {"kind": "swiglu"}, "norm": {"kind": "rmsnorm"}, "bias": False,
         "attention": {"kind": "causal", "n_kv_heads": 1}}
QUESTIONS = [{"q": f"Question {i}: is the sky blue", "choices": [" yes", " no", " it may be so"], "label": i % 3}
             for i in range(5)]
TEXTS = [{"text": "ROMEO: hello there, world. " * n} for n in (1, 3, 6)]  # the longest spans several windows
PROMPTS = [f"Say {i}:" for i in range(4)]
GENERATION = {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The environment every lm-eval run here gets: no network, the datasets cache in tmp_path."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def write_tasks(root, answers: list[str]) -> None:
    """Three lm-eval tasks in root/tasks over jsonl files in root: multiple choice, rolling
    perplexity, and generation whose targets are ``answers`` (one per prompt)."""
    (root / "tasks").mkdir()
    files = {"mc": QUESTIONS, "ppl": TEXTS, "gen": [{"q": p, "a": a} for p, a in zip(PROMPTS, answers)]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
              "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: brier_score\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
               "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "gen": f'output_type: generate_until\ndoc_to_text: "{{{{q}}}}"\ndoc_to_target: a\n'
               f"generation_kwargs: {json.dumps(GENERATION)}\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, body in bodies.items():
        (root / "tasks" / f"{name}.yaml").write_text(f"task: tiny_{name}\n" + common.format(file=root / f"{name}.jsonl") + body)


def chars() -> list[str]:
    text = json.dumps(QUESTIONS) + json.dumps(TEXTS) + "".join(PROMPTS)
    return sorted(set(text) | set("\n"))


def instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def greedy_answers(ck) -> list[str]:
    """What the gptx backend generates for PROMPTS: half of the generation task's targets are these."""
    from gptx.harness import GptxLM

    lm = GptxLM(checkpoint=str(ck), batch_size=3)
    out = lm.generate_until([instance("generate_until", (p, dict(GENERATION))) for p in PROMPTS])
    return [a if i % 2 == 0 else a + " (not generated)" for i, a in enumerate(out)]


# ---- the backend through lm-eval's LM API (fast) ------------------------------------------

def logprobs(ck, ids: list[int]) -> torch.Tensor:
    """log-probabilities [T, V] of the model on one unpadded row: the reference the backend must match."""
    with torch.no_grad():
        return torch.log_softmax(ck.model(torch.tensor([ids]))[0][0].float(), dim=-1)  # [T, V]


def test_the_backend_answers_each_request_type_as_the_model_scores_it(tmp_path):
    from gptx import checkpoint
    from gptx.generate import generate_ids
    from gptx.harness import GptxLM
    from gptx.sampling import Sampler

    ck_dir = tiny_checkpoint(tmp_path / "run", "gpt2", **MODEL)
    ck, lm = checkpoint.load(ck_dir), GptxLM(checkpoint=str(tmp_path / "run"), batch_size=2)
    enc = ck.tokenizer.encode
    pairs = [("The sky is", " blue"), ("The sky is", " very blue indeed"), ("A", " b"), ("", "Hello")]
    got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
    for (ctx, cont), (score, _) in zip(pairs, got):
        ctx_ids = enc(ctx) if ctx else [ck.tokenizer.eot_id]  # an empty context conditions on end-of-text
        ids = ctx_ids + enc(cont)
        lp = logprobs(ck, ids[:-1])
        expected = sum(lp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(enc(cont)))
        assert score == pytest.approx(expected, abs=1e-4), (ctx, cont)
    text = "ROMEO: hello there " * 12  # longer than the context: several windows
    (rolled,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert len(enc(text)) > MODEL["block_size"] and math.isfinite(rolled) and rolled < 0
    prompt = "ROMEO: hello"
    free = lm.generate_until([instance("generate_until", (prompt, {"until": [], "max_gen_toks": 8}))])[0]
    ids = generate_ids(ck.model, [enc(prompt)], 8, Sampler(temperature=0), ck.tokenizer.eot_id).ids[0]
    assert free == ck.tokenizer.decode(ids)
    stop = free[len(free) // 2:][:2]  # a stop sequence met midway: the text ends before it
    cut = lm.generate_until([instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 8}))])[0]
    assert cut == free.split(stop)[0]


def test_an_onnx_export_answers_as_its_checkpoint(tmp_path):
    from helpers import tiny_checkpoint_and_export

    from gptx.harness import GptxLM

    ck, export = tiny_checkpoint_and_export(tmp_path)
    torch_lm, onnx_lm = GptxLM(checkpoint=str(ck), batch_size=2), GptxLM(checkpoint=str(export), batch_size=2)
    assert type(onnx_lm.scorer).__name__ == "OnnxScorer"
    pairs = [instance("loglikelihood", ("The sky is", c)) for c in (" blue", " very blue indeed", " grey")]
    for (ours, greedy), (theirs, greedy_onnx) in zip(torch_lm.loglikelihood(pairs), onnx_lm.loglikelihood(pairs)):
        assert ours == pytest.approx(theirs, abs=1e-4) and greedy == greedy_onnx
    text = [instance("loglikelihood_rolling", ("hello there " * 8,))]
    assert torch_lm.loglikelihood_rolling(text) == pytest.approx(onnx_lm.loglikelihood_rolling(text), abs=1e-3)
    ask = [instance("generate_until", (p, {"until": ["\n"], "max_gen_toks": 6})) for p in ("ROMEO:", "Say")]
    assert torch_lm.generate_until(ask) == onnx_lm.generate_until(ask)


def test_bad_model_arguments_are_one_line(tmp_path):
    from gptx.errors import GptxError
    from gptx.harness import GptxLM

    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    with pytest.raises(GptxError, match="^batch_size: must be a whole number of at least 1, got '0'$"):
        GptxLM(checkpoint=str(ck), batch_size="0")
    with pytest.raises(GptxError, match="no such checkpoint directory"):
        GptxLM(checkpoint=str(tmp_path / "missing"))


# ---- the command line ----------------------------------------------------------------------

def test_gptx_eval_harness_json_is_lm_evals_results(tmp_path, offline):
    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    write_tasks(tmp_path, ["x"] * len(PROMPTS))
    p = gptx("eval", ck, "--harness", "tiny_mc", "--include-path", tmp_path / "tasks", "--limit", "3", "--batch", "2",
             "--json", cwd=tmp_path, env=offline)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["backend"] == "gptx" and out["source"] == str(ck)
    mc = out["results"]["tiny_mc"]
    assert mc["sample_len"] == 3 and set(mc) >= {"acc,none", "acc_norm,none", "brier_score,none"}
    assert any((tmp_path / "datasets-cache").iterdir())  # the datasets cache went to tmp, not ~/.cache


@pytest.mark.parametrize("args, line", [
    (["--harness", "tiny_mc", "--limit", "0"], "--limit: must be at least 1 example per task, got 0"),
    (["--harness", "tiny_mc", "--limit", "-2"], "--limit: must be at least 1 example per task, got -2"),
    (["--harness", "tiny_mc", "--num-fewshot", "-1"], "--num-fewshot: must be at least 0, got -1"),
    (["--harness", "tiny_mc", "--num-fewshot", str(2**70)], f"--num-fewshot: must be at most 10,000, got {2**70}"),
    (["--harness", "tiny_mc", "--limit", str(2**70)], f"--limit: must be at most 2,147,483,647 examples per task, got {2**70}"),
    (["--harness", "tiny_mc", "--include-path", "/nonexistent/tasks"], "--include-path: /nonexistent/tasks: no such directory"),
    (["--harness", "tiny_mc", "--data", "x.txt"], "--data: cannot be combined with --harness (run gptx eval twice)"),
    (["--harness", " , "], "--harness: give one or more lm-eval task names, separated by commas"),
    (["--data", "x.txt", "--limit", "3"], "--limit: applies to --harness TASKS only"),
])
def test_bad_harness_input_is_one_line_and_exit_2(tmp_path, args, line):
    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    p = gptx("eval", ck, *args, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {line}"], p.stderr


def test_without_lm_eval_harness_says_how_to_install_it_and_the_rest_never_imports_it(tmp_path):
    import subprocess

    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    blocked = ("import sys; sys.modules['lm_eval'] = None  # what a missing package raises: ModuleNotFoundError\n"
               "from gptx.cli import main; sys.argv = ['gptx', 'eval', sys.argv[1], '--harness', 'tiny_mc']; main()")
    p = subprocess.run([sys.executable, "-c", blocked, str(ck)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "Error: gptx eval --harness needs lm-eval: pip install 'gptx[eval]'"], p.stderr
    plain = ("import sys; from click.testing import CliRunner; import gptx; from gptx.cli import cli\n"
             "r = CliRunner().invoke(cli, ['eval', '--help']); print(r.exit_code, 'lm_eval' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, cwd=tmp_path)
    assert p.stdout.split() == ["0", "False"], p.stdout + p.stderr


@pytest.mark.slow  # lm-eval indexes its thousands of own tasks before saying a name is none of them
def test_an_unknown_task_is_one_line(tmp_path, offline):
    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    write_tasks(tmp_path, ["x"] * len(PROMPTS))
    p = gptx("eval", ck, "--harness", "tiny_mc,no_such_task", "--include-path", tmp_path / "tasks", cwd=tmp_path, env=offline)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"Error: --harness: unknown task 'no_such_task': not one of lm-eval's tasks or in {tmp_path / 'tasks'}"), p.stderr


# ---- the same scores as lm-eval's hf backend on the export ---------------------------------

def harness_json(source, tasks: str, root, env) -> dict:
    p = gptx("eval", source, "--harness", tasks, "--include-path", root / "tasks", "--batch", "3", "--json", cwd=root, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def export_hf(ck, out, env) -> None:
    p = gptx("export", ck, "--format", "hf", "-o", out, cwd=out.parent, env=env)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow  # four lm-eval runs, transformers' import
def test_gpt2_layout_scores_exactly_what_the_hf_backend_scores_on_its_export(tmp_path, offline):
    ck = tiny_checkpoint(tmp_path / "run", "gpt2", **MODEL)
    write_tasks(tmp_path, greedy_answers(ck))
    export_hf(ck, tmp_path / "hf", offline)
    ours = harness_json(ck, "tiny_mc,tiny_ppl,tiny_gen", tmp_path, offline)
    theirs = harness_json(tmp_path / "hf", "tiny_mc,tiny_ppl,tiny_gen", tmp_path, offline)
    assert (ours["backend"], theirs["backend"]) == ("gptx", "hf")
    assert ours["results"] == theirs["results"]  # every float equal, not merely close
    assert ours["results"]["tiny_gen"]["exact_match,none"] == 0.5  # the greedy half, from transformers too


@pytest.mark.slow
def test_llama_layout_with_a_char_tokenizer_scores_what_the_hf_backend_scores_to_float32_rounding(tmp_path, offline):
    # no generation task: lm-eval's hf backend needs an end-of-text token to generate, which char has not
    ck = tiny_checkpoint(tmp_path / "run", "char", {"chars": chars()}, **(MODEL | LLAMA))
    write_tasks(tmp_path, ["x"] * len(PROMPTS))
    export_hf(ck, tmp_path / "hf", offline)
    ours = harness_json(ck, "tiny_mc,tiny_ppl", tmp_path, offline)
    theirs = harness_json(tmp_path / "hf", "tiny_mc,tiny_ppl", tmp_path, offline)
    assert ours["results"].keys() == theirs["results"].keys()
    for task, mine in ours["results"].items():
        other = theirs["results"][task]
        assert mine.keys() == other.keys()
        for key, value in mine.items():  # floats to float32 rounding (see the module's docstring), the rest equal
            assert value == (pytest.approx(other[key], rel=1e-6) if isinstance(value, float) else other[key]), (task, key)
    assert math.isfinite(ours["results"]["tiny_ppl"]["bits_per_byte,none"])


@pytest.mark.slow  # lm-eval's command line indexes all its tasks
def test_lm_evals_own_command_line_runs_the_gptx_model(tmp_path, offline):
    import os
    import subprocess

    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    write_tasks(tmp_path, ["x"] * len(PROMPTS))
    p = subprocess.run([sys.executable, "-m", "gptx.harness", "run", "--model", "gptx", "--model_args",
                        f"checkpoint={ck}", "--tasks", "tiny_mc", "--include_path", str(tmp_path / "tasks"),
                        "--limit", "2"], capture_output=True, text=True, cwd=tmp_path, env=os.environ | offline)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tiny_mc" in p.stdout and "acc_norm" in p.stdout
