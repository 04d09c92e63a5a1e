"""ONNX export and the runtimes that read it.

An export directory (``gptx export SOURCE -o OUT_DIR``) holds:

    model.onnx          one decoder graph with a KV cache (the I/O contract below)
    gptx_export.json    gptx's metadata: resolved config, tokenizer (name, options, state, hash),
                        special tokens, I/O contract version, verification and quantization reports
    genai_config.json   onnxruntime-genai's description of the same graph ("type": "decoder")
    tokenizer.json      Hugging Face tokenizer, where the tokenizer describes itself as one

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


# io_contract flag: the graph accepts a past that is a preallocated buffer longer than the
# attention mask (the mask's width S says how many slots are filled) and returns that buffer as the
# present with the new entries written at [S - T, S) when the caller binds the same tensor to both
# (onnxruntime-genai's past_present_share_buffer). Without it, a past holds exactly P = S - T slots.
SHARE_BUFFER = "past_present_share_buffer"


def shares_buffer(meta: dict) -> bool:
    return meta.get("io_contract", {}).get(SHARE_BUFFER) is True


# Each layer's cache: the tensors its attention declares (gptx_export.json's "cache"), GPT-2's key
# and value [batch_size, kv_heads, past_sequence_length, head_dim] when an export declares none.
DEFAULT_CACHE_NAMES = ("key", "value")
CACHE_DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")


def default_cache(kv_heads: int, head_dim: int) -> list[dict]:
    return [{"name": name, "dims": [BATCH, kv_heads, PAST, head_dim], "seq_axis": 2, "dtype": "float32"}
            for name in DEFAULT_CACHE_NAMES]


def cache_layout(meta: dict) -> list[dict]:
    """The cache tensors of every layer of an export: ``meta["cache"]`` or the default. (A stored
    gptx_export.json is checked whole by gptx.schemas.ExportMeta when it is read.)"""
    if meta.get("cache") is None:
        return default_cache(meta["model"]["kv_heads"], meta["model"]["head_dim"])
    return meta["cache"]


def _cache_names(cache) -> list[str]:
    return [c["name"] for c in cache] if cache else list(DEFAULT_CACHE_NAMES)


def input_names(n_layer: int, cache: list[dict] | None = None) -> list[str]:
    """input_ids [B, T], attention_mask [B, P+T], position_ids [B, T], then per layer each cache
    tensor's past (default: key and value [B, K, P, D])."""
    past = [f"past_key_values.{i}.{name}" for i in range(n_layer) for name in _cache_names(cache)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past]


def output_names(n_layer: int, cache: list[dict] | None = None) -> list[str]:
    """logits [B, T, V], then per layer each cache tensor's present (P+T entries on its sequence axis)."""
    return [LOGITS, *(f"present.{i}.{name}" for i in range(n_layer) for name in _cache_names(cache))]


def empty_past(cache: list[dict], n_layer: int, batch: int, capacity: int = 0) -> list:
    """Numpy zeros for every layer's past: ``capacity`` slots on the sequence axis (0: no tokens;
    more: a buffer for shared decoding, see ``SHARE_BUFFER``), ``batch`` on batch_size. Each
    tensor is its own array: a shared buffer is written in place, so no two may alias."""
    import numpy as np

    shapes = [[capacity if a == c["seq_axis"] else batch if d == BATCH else d for a, d in enumerate(c["dims"])] for c in cache]
    return [np.zeros(shape, dtype=c["dtype"]) for _ in range(n_layer) for shape, c in zip(shapes, cache)]


def tokenizer_hash(kind: str, options: dict, state: dict) -> str:
    """sha256 of what defines a tokenizer's behaviour: its name, options and state (the GPT-2 BPE
    files are pinned by their own hashes in gptx.plugins.tokenizers)."""
    import hashlib
    import json

    blob = json.dumps({"kind": kind, "options": options, "state": state}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
