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


LLAMA = {"positional": {"kind": "rope"}, "ffn": {"kind": "swiglu"}, "norm": {"kind": "rmsnorm"}, "bias": False,
         "attention": {"kind": "causal", "n_kv_heads": 1}}


@pytest.mark.parametrize("model, tokenizer, line", [
    ({"positional": {"kind": "alibi"}}, "gpt2", "--format hf: model.positional 'alibi' has no transformers equivalent "
                                                 "(GPT2LMHeadModel needs 'learned', LlamaForCausalLM 'rope')"),
    ({"attention": {"kind": "causal", "n_kv_heads": 1}}, "gpt2", "--format hf: model.attention.n_kv_heads: GPT2LMHeadModel has no grouped-query attention"),
    ({"block": {"kind": "sequential", "placement": "post"}}, "gpt2", "--format hf: model.block.placement: GPT2LMHeadModel has no 'post' norms (it is pre-norm)"),
    (LLAMA | {"ffn": {"kind": "gelu"}}, "byte", "--format hf: model.ffn 'gelu' has no LlamaForCausalLM equivalent "
                                                "(LlamaForCausalLM needs model.ffn = 'swiglu' with model.positional = 'rope')"),
    (LLAMA | {"bias": True}, "byte", "--format hf: model.bias: LlamaForCausalLM has no biases (Llama's layers have none)"),
])
def test_what_transformers_cannot_hold_is_one_line_and_writes_nothing(tmp_path, model, tokenizer, line):
    ck = tiny_checkpoint(tmp_path / "run", tokenizer, **(MODEL | model))
    p = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {line}"], p.stderr
    assert not (tmp_path / "hf").exists()


def test_onnx_only_options_are_refused_with_hf(tmp_path):
    ck = tiny_checkpoint(tmp_path / "run", "gpt2", **MODEL)
    p = gptx("export", ck, "--format", "hf", "--quantize", "int8", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 2 and "--quantize applies to --format onnx only" in p.stderr
    assert not (tmp_path / "hf").exists()


CHARS = sorted(set("ROMEO: What say you, my lord?\n\u0085é🙂\t"))
ODD = ["ROMEO: What say you?\n\n", "", "é🙂\u0085\t  my lord", "\n"]


def llama_exported(tmp_path):
    ck = tiny_checkpoint(tmp_path / "run", "char", {"chars": CHARS}, **(MODEL | LLAMA))
    p = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 0 and "LlamaForCausalLM" in p.stdout, p.stdout + p.stderr
    return ck, tmp_path / "hf"


def test_char_and_byte_tokenizers_travel_as_a_tokenizer_json_that_encodes_as_gptx(tmp_path):
    from tokenizers import Tokenizer

    ck, out = llama_exported(tmp_path)
    theirs, ours = Tokenizer.from_file(str(out / "tokenizer.json")), checkpoint.load(ck).tokenizer
    for text in ODD:
        assert theirs.encode(text).ids == ours.encode(text), repr(text)
        assert theirs.decode(ours.encode(text)) == text
    with pytest.raises(Exception, match="Missing \\[UNK\\]"):  # a character outside the vocabulary: refused, as in gptx
        theirs.encode("ROMEO ~")
    byte_ck = tiny_checkpoint(tmp_path / "byte_run", "byte", **(MODEL | LLAMA))
    assert gptx("export", byte_ck, "--format", "hf", "-o", tmp_path / "byte_hf", cwd=tmp_path).returncode == 0
    byte_tok = Tokenizer.from_file(str(tmp_path / "byte_hf" / "tokenizer.json"))
    for text in ODD + ["\ufeff\x00 \u2028x", "a" * 300]:
        assert byte_tok.encode(text).ids == list(text.encode("utf-8")), repr(text)
        assert byte_tok.decode(list(text.encode("utf-8"))) == text


@pytest.mark.slow  # transformers' import
def test_the_llama_layout_loads_as_llama_and_agrees_with_gptx(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck_dir, out = llama_exported(tmp_path)
    ck = checkpoint.load(ck_dir)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 1
    for text in ODD:
        assert tok(text)["input_ids"] == ck.tokenizer.encode(text), repr(text)
    ids = ck.tokenizer.encode(ODD[0])
    with torch.no_grad():
        ours = ck.model.eval()(torch.tensor([ids]))[0]  # [1, T, V]
        theirs = hf(torch.tensor([ids])).logits  # [1, T, V]
    assert (ours - theirs).abs().max().item() < 1e-4
    greedy = generate_ids(ck.model, [ids[:6]], 12, Sampler(temperature=0), None).ids[0]
    assert hf.generate(torch.tensor([ids[:6]]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 6:].tolist() == greedy


@pytest.mark.parametrize("tokenizer, state, model", [
    ("char", {"chars": CHARS}, LLAMA),  # LlamaForCausalLM, grouped-query
    ("byte", None, LLAMA | {"attention": {"kind": "causal"}, "tie_embeddings": False}),  # multi-head, untied head
    ("byte", None, {}),  # GPT2LMHeadModel with the byte tokenizer
])
def test_import_hf_reads_both_layouts_back_bit_for_bit(tmp_path, tokenizer, state, model):
    ck_dir = tiny_checkpoint(tmp_path / "run", tokenizer, state, **(MODEL | model))
    assert gptx("export", ck_dir, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path).returncode == 0
    p = gptx("import-hf", tmp_path / "hf", "-o", tmp_path / "back", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    before, after = checkpoint.load(ck_dir), checkpoint.load(tmp_path / "back")
    resolved = lambda ck: ck.config.model.to_dict() | {"ffn": ck.model.blocks[0].mlp.c_proj.weight.shape}  # noqa: E731 (hidden None = its default width)
    assert resolved(after) == resolved(before)
    assert after.config.tokenizer.to_dict() == before.config.tokenizer.to_dict()
    assert after.tokenizer.state() == before.tokenizer.state()
    ours, theirs = before.model.state_dict(), after.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("key, value, line", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, 'rope_scaling = {"rope_type": "linear", "factor": 2.0} is not supported by gptx (scaled rotary positions)'),
    ("attention_bias", True, "attention_bias = true is not supported by gptx (attention biases)"),
    ("hidden_act", "gelu", 'hidden_act = "gelu" is not supported by gptx (gptx\'s SwiGLU gates with SiLU)'),
    ("num_key_value_heads", 3, "num_key_value_heads = 3 is not supported by gptx (must divide num_attention_heads = 2)"),
])
def test_a_llama_config_gptx_cannot_represent_is_one_line(tmp_path, key, value, line):
    import json

    _, out = llama_exported(tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {key: value}))
    p = gptx("import-hf", out, "-o", tmp_path / "back", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {out / 'config.json'}: {line}"], p.stderr
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.write_bytes(b""), "corrupted (JSONDecodeError"),
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "corrupted (JSONDecodeError"),
    (lambda f: f.write_text('{"model": {"type": "WordLevel", "vocab": ["a"]}}'), "corrupted (TypeError: model, model.vocab and pre_tokenizer must be JSON objects)"),
    (lambda f: f.write_text('{"model": {"type": "WordLevel", "vocab": {"a": 0, "b": "x"}}}'), "a WordLevel tokenizer gptx has no equivalent for"),
    (lambda f: os.truncate(f, 300 * 2**20), "bytes; a tokenizer.json gptx reads is at most 268,435,456"),
])
def test_a_damaged_tokenizer_json_is_one_line_and_imports_nothing(tmp_path, damage, problem):
    _, out = llama_exported(tmp_path)
    damage(out / "tokenizer.json")
    p = gptx("import-hf", out, "-o", tmp_path / "back", cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"Error: {out / 'tokenizer.json'}: ") \
        and problem in lines[0], p.stderr
    assert not (tmp_path / "back").exists()
