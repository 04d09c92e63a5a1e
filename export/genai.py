"""``genai_config.json``: how onnxruntime-genai (Python, C, C++, C#, Java) runs the export.

Type "decoder" with the contract's names; type "gpt2" would expect an older combined-cache layout.

The session options are gptx's own onnxruntime sessions' (``gptx.export.runtime.make_session``), so
genai decodes as fast as gptx's Python loop on the same graph (docs/deploy.md has the figures):

- ``intra_op_num_threads`` 0: onnxruntime's own default, one thread per physical core. Left
  unset, genai takes half the logical CPUs (it assumes two hardware threads per core), so on a
  machine without SMT it decodes on half the cores.
- no spinning: the file is written once for any machine, and a thread spinning on a CPU another
  process wants stalls both. gptx's own sessions spin only where each thread has a free CPU
  (``gptx.threads.spinning_pays``); on a machine of its own, overlay
  ``"session.intra_op.allow_spinning": "1"`` when loading (docs/deploy.md), as ``gptx bench`` does.
"""
from __future__ import annotations

from gptx.export import (
    ATTENTION_MASK, cache_layout, default_cache, INPUT_IDS, LOGITS, MODEL_FILE, PAST_KEY, PAST_VALUE, POSITION_IDS, PRESENT_KEY, PRESENT_VALUE,
    shares_buffer,
)


def reads(meta: dict) -> bool:
    """Whether onnxruntime-genai can run the export: its decoder knows GPT-2's key/value cache only."""
    m = meta["model"]
    return cache_layout(meta) == default_cache(m["kv_heads"], m["head_dim"])


# onnxruntime session options in genai_config.json (see the module's docstring for why)
SESSION_OPTIONS = {
    "intra_op_num_threads": 0,
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
}


def genai_config(meta: dict) -> dict:
    m = meta["model"]
    eot = meta.get("special_tokens", {}).get("eot")
    # without an end-of-text token no id ends generation (an empty list; genai requires every id to
    # be in the vocabulary): it stops at max_length, as gptx does; padding is masked, any id serves
    eos = eot["id"] if eot else []
    pad = eot["id"] if eot else 0
    return {
        "model": {
            "type": "decoder",
            "context_length": m["context_length"],
            "vocab_size": m["vocab_size"],
            "bos_token_id": pad,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", **SESSION_OPTIONS, "provider_options": []},
                "head_size": m["head_dim"],
                "hidden_size": m["n_embd"],
                "num_attention_heads": m["n_head"],
                "num_key_value_heads": m["kv_heads"],
                "num_hidden_layers": m["n_layer"],
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": m["context_length"],
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_buffer(meta),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
