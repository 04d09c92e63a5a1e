"""ONNX export and the runtimes that read it.

An export directory (``gptx export SOURCE -o OUT_DIR``) holds:

    model.onnx          one decoder graph with a KV cache (the I/O contract below)
    gptx_export.json    gptx's metadata: resolved config, tokenizer (name, options, state, hash),
                        special tokens, I/O contract version, verification and quantization reports
    genai_config.json   onnxruntime-genai's description of the same graph ("type": "decoder")
    tokenizer.json      Hugging Face tokenizer (GPT-2 BPE tokenizers only)

This module is torch-free: the onnxruntime generator (``gptx.export.runtime``) imports it.
"""
from __future__ import annotations

IO_CONTRACT = "gptx.decoder"
IO_CONTRACT_VERSION = 1
EXPORT_FORMAT = "gptx.export"
EXPORT_FORMAT_VERSION = 1

MODEL_FILE = "model.onnx"
META_FILE = "gptx_export.json"
GENAI_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"

# Symbolic dimension names in the graph's inputs and outputs.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def input_names(n_layer: int) -> list[str]:
    """input_ids [B, T], attention_mask [B, P+T], position_ids [B, T], then per layer the past key and value [B, K, P, D]."""
    past = [name % i for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past]


def output_names(n_layer: int) -> list[str]:
    """logits [B, T, V], then per layer the present key and value [B, K, P+T, D]."""
    return [LOGITS, *(name % i for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE))]


def tokenizer_hash(kind: str, options: dict, state: dict) -> str:
    """sha256 of what defines a tokenizer's behaviour: its name, options and state (the GPT-2 BPE
    files are pinned by their own hashes in gptx.plugins.tokenizers)."""
    import hashlib
    import json

    blob = json.dumps({"kind": kind, "options": options, "state": state}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
