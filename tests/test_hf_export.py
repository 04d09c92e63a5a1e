"""`gptx export --format hf`: a GPT-2-layout checkpoint as a Hugging Face folder that transformers
loads offline (GPT2LMHeadModel + the GPT-2 tokenizer), agreeing with gptx, and that `gptx
import-hf` reads back bit for bit; anything else is one line naming what has no equivalent."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import gptx, tiny_checkpoint

from gptx import checkpoint
from gptx.generate import generate_ids
from gptx.sampling import Sampler

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}
TEXTS = ["ROMEO: hello there, world", "<|endoftext|>  x\u0085y \ufeffz\n\n", "", "naïve café 🙂 '''s  \t end"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def exported(tmp_path, **model):
    ck = tiny_checkpoint(tmp_path / "run", "gpt2", **(MODEL | model))
    p = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    return ck, tmp_path / "hf"


@pytest.mark.slow  # transformers' import and two models
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_it_and_agrees_with_gptx(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck_dir, out = exported(tmp_path, tie_embeddings=tied)
    ck = checkpoint.load(ck_dir)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    for text in TEXTS:
        assert tok(text)["input_ids"] == ck.tokenizer.encode(text), repr(text)
    ids = ck.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        ours = ck.model.eval()(torch.tensor([ids]))[0]  # [1, T, V]
        theirs = hf(torch.tensor([ids])).logits  # [1, T, V]
    assert (ours - theirs).abs().max().item() < 1e-4
    greedy = generate_ids(ck.model, [ids[:4]], 12, Sampler(temperature=0), None).ids[0]
    hf_greedy = hf.generate(torch.tensor([ids[:4]]), max_new_tokens=12, do_sample=False, pad_token_id=50256)[0, 4:]
    assert hf_greedy.tolist() == greedy


@pytest.mark.slow
def test_export_then_import_gives_back_the_same_tensors(tmp_path):
    ck_dir, out = exported(tmp_path)
    p = gptx("import-hf", out, "-o", tmp_path / "back", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    before = checkpoint.load(ck_dir).model.state_dict()
    after = checkpoint.load(tmp_path / "back").model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_second_export_replaces_the_first_and_a_foreign_folder_is_refused(tmp_path):
    ck_dir, out = exported(tmp_path)
    again = gptx("export", ck_dir, "--format", "hf", "-o", out, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    p = gptx("export", ck_dir, "--format", "hf", "-o", foreign, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"Error: {foreign}: not empty and not a previous gptx --format hf export; choose another -o or pass --force to replace it"]
    assert os.listdir(foreign) == ["notes.txt"]


@pytest.mark.parametrize("model, tokenizer, line", [
    ({"positional": {"kind": "rope"}}, "gpt2", "--format hf: model.positional 'rope' has no transformers GPT-2 equivalent "
                                                "(GPT2LMHeadModel needs model.positional = 'learned')"),
    ({"attention": {"kind": "causal", "n_kv_heads": 1}}, "gpt2", "--format hf: model.attention.n_kv_heads: GPT2LMHeadModel has no grouped-query attention"),
    ({"block": {"kind": "sequential", "placement": "post"}}, "gpt2", "--format hf: model.block.placement: GPT2LMHeadModel has no 'post' norms (GPT-2 is pre-norm)"),
    ({}, "byte", "--format hf: tokenizer 'byte' has no Hugging Face tokenizer file yet (GPT-2 BPE has: tokenizer.kind = \"gpt2\")"),
])
def test_what_gpt2_cannot_hold_is_one_line_and_writes_nothing(tmp_path, model, tokenizer, line):
    ck = tiny_checkpoint(tmp_path / "run", tokenizer, **(MODEL | model))
    p = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {line}"], p.stderr
    assert not (tmp_path / "hf").exists()


def test_onnx_only_options_are_refused_with_hf(tmp_path):
    ck = tiny_checkpoint(tmp_path / "run", "gpt2", **MODEL)
    p = gptx("export", ck, "--format", "hf", "--quantize", "int8", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 2 and "--quantize applies to --format onnx only" in p.stderr
    assert not (tmp_path / "hf").exists()
