"""`gptx export --format gguf`: model.gguf that llama.cpp (llama-cpp-python) and transformers' GGUF
loader read back to gptx's logits and greedy ids, for the GPT-2 and the Llama layout; f16 and q8_0
stay close; what GGUF cannot hold is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import gptx, tiny_checkpoint

from gptx import checkpoint

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}
LLAMA = {"positional": {"kind": "rope"}, "ffn": {"kind": "swiglu"}, "norm": {"kind": "rmsnorm"}, "bias": False,
         "attention": {"kind": "causal", "n_kv_heads": 1}}
LAYOUTS = {"gpt2": {}, "llama": LLAMA}
CHARS = sorted(set("ROMEO: What say you, my lord?\n\u0085é🙂\t"))
TEXT = "ROMEO: What say you, my lord?"
# measured on these tiny models (max |logit difference| to gptx): f16 2e-4, q8_0 5e-3
CLOSE = {"f16": 2e-3, "q8_0": 2e-2}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def exported(tmp_path, layout="gpt2", tokenizer="gpt2", gguf_type=None, name="gguf"):
    state = {"chars": CHARS} if tokenizer == "char" else None
    ck = tiny_checkpoint(tmp_path / "run", tokenizer, state, **(MODEL | LAYOUTS[layout]))
    p = gptx("export", ck, "--format", "gguf", *(["--gguf-type", gguf_type] if gguf_type else []),
             "-o", tmp_path / name, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return ck, tmp_path / name / "model.gguf"


def test_the_file_holds_llama_cpps_names_and_the_gpt2_tokenizer(tmp_path):
    from gguf import GGUFReader

    _, path = exported(tmp_path, "llama")
    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.attention.head_count_kv") == 1
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == 50257 and field("tokenizer.ggml.merges")[0] == "Ġ t"
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.bos_token_id") == 50256
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_gate.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names  # a tied head is the embedding, as llama.cpp expects


def hf_logits(tmp_path, ck, layout, ids, gguf_file=None):
    """transformers' logits [T, V] for the --format hf export of ``ck`` (or, with ``gguf_file``, for that file)."""
    from transformers import AutoModelForCausalLM

    if gguf_file is None:
        assert gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path).returncode == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    else:  # transformers reads gpt2's context length into n_ctx, not n_positions: say it (docs/deploy.md)
        extra = {"n_positions": MODEL["block_size"]} if layout == "gpt2" else {}
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, **extra)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]  # [T, V]


@pytest.mark.slow  # transformers' import and three models per layout
@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_transformers_reads_f32_back_to_the_hf_exports_logits_and_f16_q8_0_close(tmp_path, layout):
    ck, path = exported(tmp_path, layout)
    ids = checkpoint.load(ck).tokenizer.encode(TEXT)
    want = hf_logits(tmp_path, ck, layout, ids)
    assert (hf_logits(tmp_path, ck, layout, ids, path) - want).abs().max().item() < 1e-5
    for gguf_type, tolerance in CLOSE.items():
        _, smaller = exported(tmp_path, layout, gguf_type=gguf_type, name=gguf_type)
        assert smaller.stat().st_size < path.stat().st_size
        assert (hf_logits(tmp_path, ck, layout, ids, smaller) - want).abs().max().item() < tolerance, gguf_type


def llama_cpp_model(path, **kw):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=MODEL["block_size"], n_threads=1, verbose=False, **kw)


@pytest.mark.slow  # llama.cpp (llama-cpp-python: CI builds it, .ci/run)
@pytest.mark.parametrize("layout, tokenizer", [("gpt2", "gpt2"), ("llama", "gpt2"), ("llama", "char"), ("gpt2", "byte")])
def test_llama_cpp_encodes_and_decodes_greedily_as_gptx(tmp_path, layout, tokenizer):
    import numpy as np

    ck_dir, path = exported(tmp_path, layout, tokenizer)
    ck = checkpoint.load(ck_dir)
    ids = ck.tokenizer.encode(TEXT)
    llm = llama_cpp_model(path, logits_all=True)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == TEXT
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))  # [T, V]
        with torch.no_grad():
            ours = ck.model.eval()(torch.tensor([ids]))[0][0]  # [T, V]
        assert (ours - theirs).abs().max().item() < 1e-3  # llama.cpp's own float32 kernels: measured 8e-5
        prompt = TEXT[:8]
        p = gptx("generate", ck_dir, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0, "--json", cwd=tmp_path)
        greedy = json.loads(p.stdout)["ids"]
        decoded = llm.generate(ck.tokenizer.encode(prompt), top_k=1, temp=0.0, reset=True)
        assert [next(decoded) for _ in greedy] == greedy
    finally:
        llm.close()


@pytest.mark.slow  # llama.cpp and transformers
@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_what_differs_for_char_and_byte_is_what_the_docs_say(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    ck_dir, path = exported(tmp_path, "llama", tokenizer)
    ours = checkpoint.load(ck_dir).tokenizer
    llm = llama_cpp_model(path, vocab_only=True)
    try:
        for text in ["ROMEO: What say you?\n\n", "", "é🙂\u0085\t  my lord", " my lord"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), repr(text)
        assert llm.token_eos() == 2  # sentencepiece's default end of text: GGUF cannot say "none"
        if tokenizer == "byte":
            assert llm.tokenize("a\u2581b".encode(), add_bos=False, special=False) == [97, 32, 98]
    finally:
        llm.close()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    space = ours.encode(" ")
    assert theirs(TEXT)["input_ids"] == space + ours.encode(TEXT)  # transformers prepends a space
    assert theirs(" " + TEXT)["input_ids"] == ours.encode(" " + TEXT)
    if tokenizer == "char":  # llama.cpp ends the process on a character outside the vocabulary
        code = f"import llama_cpp; llama_cpp.Llama(model_path={str(path)!r}, vocab_only=True, verbose=False).tokenize(b'~')"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == -6  # SIGABRT


@pytest.mark.parametrize("args, line", [
    (["--format", "gguf", "--gguf-type", "q4_0"], "Error: --gguf-type: 'q4_0' is not one of 'f32', 'f16', 'q8_0'."),
    (["--format", "onnx", "--gguf-type", "f16"], "Error: --gguf-type applies to --format gguf only"),
    (["--format", "hf", "--gguf-type", "f16"], "Error: --gguf-type applies to --format gguf only"),
    (["--format", "gguf", "--quantize", "int8"], "Error: --quantize applies to --format onnx only"),
])
def test_options_for_another_format_are_one_line(tmp_path, args, line):
    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL)
    p = gptx("export", ck, *args, "-o", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [line], p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, tokenizer, state, line", [
    ({"positional": {"kind": "alibi"}}, "byte", None,
     "--format gguf: model.positional 'alibi' has no llama.cpp equivalent (GGUF gpt2 needs 'learned', GGUF llama 'rope')"),
    (LLAMA | {"bias": True}, "byte", None, "--format gguf: model.bias: GGUF llama has no biases (Llama's layers have none)"),
    ({}, "char", {"chars": CHARS + ["\u2581"]}, "--format gguf: the char vocabulary holds '\u2581' (U+2581), which "
                                                 "llama.cpp's sentencepiece vocabulary reads as a space; use --format hf"),
])
def test_what_gguf_cannot_hold_is_one_line_and_writes_nothing(tmp_path, model, tokenizer, state, line):
    ck = tiny_checkpoint(tmp_path / "run", tokenizer, state, **(MODEL | model))
    p = gptx("export", ck, "--format", "gguf", "-o", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {line}"], p.stderr
    assert not (tmp_path / "out").exists()


def test_a_second_export_replaces_the_first_and_a_foreign_folder_is_refused(tmp_path):
    ck, path = exported(tmp_path, "gpt2", "byte")
    again = gptx("export", ck, "--format", "gguf", "--gguf-type", "q8_0", "-o", path.parent, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert os.listdir(path.parent) == ["model.gguf"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "model.gguf").write_text("not a gguf file")
    p = gptx("export", ck, "--format", "gguf", "-o", foreign, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"Error: {foreign}: not empty and not a previous gptx --format gguf export; choose another -o or pass --force to replace it"]
    assert (foreign / "model.gguf").read_text() == "not a gguf file"
