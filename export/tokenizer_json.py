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


def char_tokenizer_json(chars: list[str]) -> dict:
    """A ``tokenizers`` description that encodes as gptx's ``char`` tokenizer: one id per code
    point, its index in ``chars``; a character outside them is an error (no unknown token), as in gptx."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)}, "unk_token": "\u0000<unk>"},
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as the ByteLevel pre-tokenizer maps them."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = shown[:], 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(shown, map(chr, chars)))


def byte_tokenizer_json() -> dict:
    """A ``tokenizers`` description that encodes as gptx's ``byte`` tokenizer: the UTF-8 bytes as
    ids 0-255 (byte-level symbols, no merges)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level}, "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {sym: b for b, sym in _bytes_to_unicode().items()}, "merges": []},
    }


def has_hf_files(kind: str, options: dict) -> bool:
    """Whether ``write_hf`` writes tokenizer files for this tokenizer: GPT-2 BPE, ``char``, ``byte``."""
    return is_gpt2_bpe(kind, options) or kind in ("char", "byte")


def write_hf(out_dir: Path, kind: str, options: dict, state: dict, block_size: int) -> Optional[list[str]]:
    """The tokenizer files transformers' AutoTokenizer reads (``has_hf_files``); None for a
    tokenizer that has none yet."""
    if not has_hf_files(kind, options):
        return None
    if is_gpt2_bpe(kind, options):
        return write(out_dir, kind, options, block_size)
    described = char_tokenizer_json(list(state["chars"])) if kind == "char" else byte_tokenizer_json()
    (out_dir / "tokenizer.json").write_text(json.dumps(described, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
