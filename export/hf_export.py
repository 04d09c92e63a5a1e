"""``gptx export SOURCE --format hf -o OUT``: a checkpoint as a Hugging Face model folder that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer`` load offline.

The GPT-2 layout (learned positions, LayerNorm, tanh GELU, causal multi-head attention, pre-norm,
biases) becomes ``GPT2LMHeadModel``: the inverse of ``gptx import-hf`` (``gptx.hf.weight_plan``
is the one map between the layouts), so export then import gives back the same tensors. Any
other component is refused on one line naming it. The GPT-2 BPE tokenizer travels as
tokenizer.json; other tokenizers have no Hugging Face file yet and are refused.

    OUT/config.json            GPT2Config (+ "gptx": where it came from: marks the folder as ours)
    OUT/model.safetensors      the weights in GPT2LMHeadModel's names ([in, out] Conv1D layouts)
    OUT/tokenizer.json         GPT-2's byte-level BPE, as the ONNX export writes it
    OUT/tokenizer_config.json
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from gptx.errors import GptxError
from gptx.fsutil import refuse_foreign_files, refuse_to_replace, refused_write, remove_stale_siblings, replace_dir, temp_sibling

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")
# GPT2LMHeadModel's layout: the component each slot must name, and the options it must have
GPT2_LAYOUT = {"model.attention": "causal", "model.positional": "learned", "model.ffn": "gelu",
               "model.norm": "layernorm", "model.block": "sequential"}


def check_gpt2_layout(cfg) -> None:
    """Refuse, on one line naming the component or option, a model GPT2LMHeadModel cannot hold."""
    m = cfg.model
    for table, spec in m.components():
        want = GPT2_LAYOUT.get(table)
        if spec.name != want:
            raise GptxError(f"--format hf: {table} '{spec.name}' has no transformers GPT-2 equivalent "
                            f"(GPT2LMHeadModel needs {table} = '{want}')")
    attention, ffn, block = m.attention.options, m.ffn.options, m.block.options
    refused = [
        (attention.n_kv_heads not in (None, m.n_head), "model.attention.n_kv_heads", "grouped-query attention"),
        (attention.window is not None, "model.attention.window", "a sliding window"),
        (attention.qk_norm, "model.attention.qk_norm", "normed queries and keys"),
        (ffn.approximate != "tanh", "model.ffn.approximate", "the exact GELU (GPT-2's is the tanh approximation)"),
        (block.placement != "pre", "model.block.placement", f"'{block.placement}' norms (GPT-2 is pre-norm)"),
        (not m.bias, "model.bias", "no biases (GPT-2's layers have them)"),
    ]
    for bad, key, what in refused:
        if bad:
            raise GptxError(f"--format hf: {key}: GPT2LMHeadModel has no {what}")
    if not is_gpt2_tokenizer(cfg):
        raise GptxError(f"--format hf: tokenizer '{cfg.tokenizer.name}' has no Hugging Face tokenizer file yet "
                        "(GPT-2 BPE has: tokenizer.kind = \"gpt2\")")


def is_gpt2_tokenizer(cfg) -> bool:
    from gptx.export.tokenizer_json import is_gpt2_bpe
    from gptx.options import to_dict

    return is_gpt2_bpe(cfg.tokenizer.name, to_dict(cfg.tokenizer.options))


def gpt2_config(ck) -> dict:
    """GPT2Config as config.json holds it, from the checkpoint's model config."""
    m = ck.config.model
    eot = ck.tokenizer.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_ctx": m.block_size,
        "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": m.ffn.options.hidden or 4 * m.n_embd,
        "activation_function": "gelu_new", "layer_norm_epsilon": m.norm.options.eps,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32",
        "gptx": {"exported_from": str(ck.path)},  # marks the folder as a gptx export (a re-export may replace it)
    }


def hf_weights(model) -> dict:
    """The model's tensors in GPT2LMHeadModel's names; a tied head is stored once (transformers
    ties lm_head to wte on load, as safetensors stores no shared tensors)."""
    from gptx.hf import to_hf_state_dict

    state = to_hf_state_dict(model)
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    return {name: t.float().contiguous().clone() for name, t in state.items()}


def check_out_dir(out_dir: Path, force: bool, protected: list[Path]) -> None:
    """OUT may be missing, empty, an earlier ``--format hf`` export, or anything with ``force``;
    never a folder holding the source, the working directory or the home directory."""
    refuse_to_replace(out_dir, protected)
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not _marked(out_dir / CONFIG_FILE):
        raise GptxError(f"{out_dir}: not empty and not a previous gptx --format hf export; choose another -o "
                        "or pass --force to replace it")
    refuse_foreign_files(out_dir, CONFIG_FILE, set(FILES), "a previous gptx export", "a previous gptx --format hf export")


def _marked(config: Path) -> bool:
    try:
        return isinstance(json.loads(config.read_text(encoding="utf-8")).get("gptx"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def export_hf(source, out_dir, force: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Write the Hugging Face folder for the checkpoint ``source``; returns the file names. Built in
    a temporary sibling that replaces ``out_dir`` only when complete."""
    from safetensors.torch import save_file

    from gptx import checkpoint
    from gptx.export import tokenizer_json
    from gptx.options import to_dict

    out_dir = Path(out_dir)
    check_out_dir(out_dir, force, [Path.cwd()])
    ck = checkpoint.load(source)
    check_gpt2_layout(ck.config)
    check_out_dir(out_dir, force, [Path.cwd(), ck.path])
    log(f"exporting {ck.path} ({ck.model.num_params():,} parameters) as a Hugging Face GPT2LMHeadModel to {out_dir}")
    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir.resolve())
    tmp = temp_sibling(out_dir.resolve())
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(gpt2_config(ck), indent=2))
        save_file(hf_weights(ck.model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tok = ck.config.tokenizer
        tokenizer_json.write(tmp, tok.name, to_dict(tok.options), ck.config.model.block_size)
        replace_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = refused_write(err, out_dir, "the export")
        if refused is not None:
            raise refused from None
        raise
    log(f"wrote {out_dir}: {', '.join(FILES)} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return list(FILES)
