"""tokenizer.json and tokenizer_config.json beside an export, for the runtimes outside gptx that
read them (the Node example and the web page through @huggingface/tokenizers, transformers'
AutoTokenizer, onnxruntime-genai). The description is the tokenizer's own
(``Tokenizer.tokenizer_json``): this module only writes it, for any tokenizer that has one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gptx.export import TOKENIZER_FILE

CONFIG_FILE = "tokenizer_config.json"


def refusal(kind: str, what: str) -> str:
    """The one line saying that ``what`` (a runtime, an export) cannot run tokenizer ``kind``."""
    return (f"tokenizer '{kind}' has no tokenizer.json, which {what} needs "
            "(its Tokenizer.tokenizer_json() gives none)")


def tokenizer_config(described: dict, eot: Optional[str], block_size: int) -> dict:
    """The companion tokenizer_config.json: GPT-2's tokenizer class for byte-level BPE with GPT-2's
    split (onnxruntime-genai's tokenizer picks its reader by this class), the generic fast
    tokenizer otherwise; the end-of-text token as bos/eos/unk where there is one."""
    pre = described.get("pre_tokenizer") or {}
    gpt2_like = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True \
        and (described.get("model") or {}).get("type") == "BPE"
    config = {"tokenizer_class": "GPT2Tokenizer" if gpt2_like else "PreTrainedTokenizerFast"}
    if gpt2_like:
        config["add_prefix_space"] = bool(pre.get("add_prefix_space", False))
    if eot is not None:
        config |= {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    return config | {"model_max_length": block_size, "clean_up_tokenization_spaces": False}


def write(out_dir: Path, tokenizer, block_size: int) -> Optional[list[str]]:
    """Write tokenizer.json (+ tokenizer_config.json) for ``tokenizer``; the file names, or None
    when the tokenizer has no description."""
    described = tokenizer.tokenizer_json()
    if described is None:
        return None
    eot = None if tokenizer.eot_id is None else tokenizer.decode([tokenizer.eot_id])
    (out_dir / TOKENIZER_FILE).write_text(json.dumps(described, ensure_ascii=False), encoding="utf-8")
    (out_dir / CONFIG_FILE).write_text(json.dumps(tokenizer_config(described, eot, block_size), indent=2))
    return [TOKENIZER_FILE, CONFIG_FILE]
