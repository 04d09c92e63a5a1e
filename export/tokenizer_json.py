"""Hugging Face ``tokenizer.json`` for GPT-2's byte-level BPE, built from the BPE files gptx ships
(encoder.json, vocab.bpe). onnxruntime-genai, transformers, the ``tokenizers`` library and the
Node example read it; it encodes exactly as tiktoken's ``gpt2`` (tests/test_export.py checks)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

EOT = "<|endoftext|>"


def gpt2_tokenizer_json() -> dict:
    from gptx.plugins.tokenizers import GPT2_EOT, gpt2_bpe_file

    vocab = json.loads(Path(gpt2_bpe_file("encoder.json")).read_text(encoding="utf-8"))
    lines = Path(gpt2_bpe_file("vocab.bpe")).read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line.strip()]  # line 0 is "#version: 0.2"
    if vocab.get(EOT) != GPT2_EOT:
        raise ValueError(f"encoder.json: {EOT} is not {GPT2_EOT}")
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": GPT2_EOT, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(block_size: int) -> dict:
    """The companion ``tokenizer_config.json`` (transformers' AutoTokenizer and onnxruntime-extensions read it)."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
    }


def is_gpt2_bpe(kind: str, options: dict) -> bool:
    """Whether a tokenizer (registry name + options) is GPT-2's BPE, which tokenizer.json describes."""
    return kind == "gpt2" or (kind == "tiktoken" and options.get("encoding") == "gpt2")


def write(out_dir: Path, kind: str, options: dict, block_size: int) -> Optional[list[str]]:
    """Write tokenizer.json (+ tokenizer_config.json) for GPT-2 BPE; the file names, or None for other tokenizers."""
    if not is_gpt2_bpe(kind, options):
        return None
    (out_dir / "tokenizer.json").write_text(json.dumps(gpt2_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(block_size), indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
