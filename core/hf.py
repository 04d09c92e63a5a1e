"""Import a Hugging Face GPT-2 checkpoint as a gptx checkpoint (``gptx import-hf``).

    HF_DIR/config.json + model.safetensors (or sharded model-*.safetensors with an index, or
    pytorch_model.bin read with ``torch.load(weights_only=True)``)
        -> OUT_DIR/checkpoints/step-000000/ (model.safetensors + gptx.json), loadable by
           ``gptx generate OUT_DIR`` and ``gptx.checkpoint.load``.

GPT-2 is gptx's default model, so the mapping is a renaming plus one transpose: HF's ``Conv1D``
stores weights as [in, out], ``nn.Linear`` as [out, in].

    transformer.wte / wpe          -> wte / positional.wpe
    transformer.h.i.ln_1 / ln_2    -> blocks.i.attn_norm.norm / blocks.i.mlp_norm.norm
    transformer.h.i.attn.c_attn    -> blocks.i.attn.c_attn   (q, k, v in the same order)
    transformer.h.i.attn.c_proj    -> blocks.i.attn.c_proj
    transformer.h.i.mlp.c_fc/c_proj -> blocks.i.mlp.c_fc / c_proj
    transformer.ln_f               -> ln_f
    lm_head                        -> lm_head (tied to wte unless tie_word_embeddings is false)

Options GPT-2 variants may set that gptx does not implement (attention scaled by the inverse
layer index, reordered/upcast attention, cross-attention, unscaled attention, exact GELU) are
refused with a clear message instead of producing a model that silently differs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

from gptx.errors import GptxError, first_line
from gptx.fsutil import publishable, read_regular, remove_stale_siblings, temp_sibling
from gptx.plugins.tokenizers import MAX_TOKENIZER_BYTES

# activation_function values that are GELU with the tanh approximation (GPT-2's gelu_new)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GPT2_VOCAB = 50257
# HF keys that hold no weights (old causal-mask buffers)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _fail(hf_dir: Path, problem: str) -> GptxError:
    return GptxError(f"{hf_dir}: {problem}")


def read_hf_config(hf_dir: Path) -> dict:
    """config.json as a dict, checked to describe a GPT-2 model gptx can represent exactly."""
    f = hf_dir / "config.json"
    try:
        cfg = json.loads(read_regular(f).decode("utf-8"))
    except FileNotFoundError:
        raise _fail(hf_dir, "no config.json: not a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptxError(f"{f}: corrupted ({err})") from None
    if not isinstance(cfg, dict):
        raise GptxError(f"{f}: corrupted (expected a JSON object)")
    model_type = cfg.get("model_type")
    if model_type == "llama":
        return read_llama_config(f, cfg)
    if model_type != "gpt2":
        raise GptxError(f"{f}: model_type is {model_type!r}; only GPT-2 ('gpt2') and Llama ('llama') checkpoints can be imported")

    def refuse(key: str, problem: str):
        raise GptxError(f"{f}: {key} = {json.dumps(cfg.get(key))} is not supported by gptx ({problem})")

    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        refuse("scale_attn_by_inverse_layer_idx", "attention scores scaled by 1/layer index")
    if cfg.get("reorder_and_upcast_attn", False):
        refuse("reorder_and_upcast_attn", "reordered fp32 attention")
    if not cfg.get("scale_attn_weights", True):
        refuse("scale_attn_weights", "attention without the 1/sqrt(head size) scaling")
    if cfg.get("add_cross_attention", False):
        refuse("add_cross_attention", "cross-attention layers")
    if cfg.get("activation_function", "gelu_new") not in TANH_GELU:
        refuse("activation_function", f"gptx's GPT-2 MLP uses GELU with the tanh approximation: {', '.join(TANH_GELU)}")
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise GptxError(f"{f}: {key} must be a positive integer, got {cfg.get(key)!r}")
    if not isinstance(cfg.get("n_positions", cfg.get("n_ctx")), int):
        raise GptxError(f"{f}: n_positions must be a positive integer, got {cfg.get('n_positions')!r}")
    for key, default, low in (("layer_norm_epsilon", 1e-5, 0.0), ("resid_pdrop", 0.1, None)):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (low is not None and value <= low) or (low is None and not 0 <= value < 1):
            raise GptxError(f"{f}: {key} must be a finite number{' above 0' if low is not None else ' in [0, 1)'}, "
                            f"got {value!r}")
    if cfg.get("n_inner") is not None and (not isinstance(cfg["n_inner"], int) or cfg["n_inner"] < 1):
        raise GptxError(f"{f}: n_inner must be a positive integer or null, got {cfg['n_inner']!r}")
    return cfg


def gptx_config_dict(cfg: dict) -> dict:
    """The gptx model config (plain data) that describes the HF model."""
    if cfg.get("model_type") == "llama":
        return llama_config_dict(cfg)
    drop = cfg.get("resid_pdrop", 0.1)  # checked by read_hf_config
    return {
        "model": {
            "n_layer": cfg["n_layer"],
            "n_head": cfg["n_head"],
            "n_embd": cfg["n_embd"],
            "block_size": cfg.get("n_positions", cfg.get("n_ctx")),
            "vocab_size": cfg["vocab_size"],
            "dropout": float(drop) if isinstance(drop, (int, float)) else 0.0,  # GPT-2 uses one rate everywhere
            "bias": True,
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
            "attention": {"kind": "causal"},
            "positional": {"kind": "learned"},
            "ffn": {"kind": "gelu", "hidden": cfg.get("n_inner")},
            "norm": {"kind": "layernorm", "eps": float(cfg.get("layer_norm_epsilon", 1e-5))},
            "block": {"kind": "sequential", "placement": "pre"},
        },
    }


# ---- Llama (LlamaForCausalLM): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases ----------

def read_llama_config(f: Path, cfg: dict) -> dict:
    """A Llama config.json checked to describe a model gptx represents exactly; anything it cannot
    (rope scaling, biases, another activation, a sliding window, ...) is one line naming the key."""
    def refuse(key: str, problem: str):
        raise GptxError(f"{f}: {key} = {json.dumps(cfg.get(key))} is not supported by gptx ({problem})")

    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise GptxError(f"{f}: {key} must be a positive integer, got {cfg.get(key)!r}")
    H, C = cfg["num_attention_heads"], cfg["hidden_size"]
    K = cfg.get("num_key_value_heads") or H
    if isinstance(K, bool) or not isinstance(K, int) or H % K:
        refuse("num_key_value_heads", f"must divide num_attention_heads = {H}")
    if C % H or cfg.get("head_dim", C // H) not in (None, C // H):
        refuse("head_dim", f"gptx's head size is hidden_size / num_attention_heads = {C / H:g}")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "gptx's SwiGLU gates with SiLU")
    for key, problem in (("rope_scaling", "scaled rotary positions"), ("sliding_window", "a sliding window"),
                         ("attention_bias", "attention biases"), ("mlp_bias", "MLP biases")):
        if cfg.get(key) not in (None, False):
            refuse(key, problem)
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        refuse("pretraining_tp", "sliced projections")
    for key, default, low in (("rope_theta", 10000.0, 1.0), ("rms_norm_eps", 1e-6, 0.0)):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
            raise GptxError(f"{f}: {key} must be a finite number above {low:g}, got {value!r}")
    return cfg


def llama_config_dict(cfg: dict) -> dict:
    H = cfg["num_attention_heads"]
    K = cfg.get("num_key_value_heads") or H
    return {
        "model": {
            "n_layer": cfg["num_hidden_layers"], "n_head": H, "n_embd": cfg["hidden_size"],
            "block_size": cfg["max_position_embeddings"], "vocab_size": cfg["vocab_size"], "dropout": 0.0, "bias": False,
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "attention": {"kind": "causal", "n_kv_heads": None if K == H else K},
            "positional": {"kind": "rope", "base": float(cfg.get("rope_theta", 10000.0))},
            "ffn": {"kind": "swiglu", "hidden": cfg["intermediate_size"]},
            "norm": {"kind": "rmsnorm", "eps": float(cfg.get("rms_norm_eps", 1e-6))},
            "block": {"kind": "sequential", "placement": "pre"},
        },
    }


def convert_llama_state_dict(hf_state: dict, cfg: dict, where: str) -> dict:
    """Llama's names -> gptx's: q, k, v concatenated into c_attn, gate and up into c_fc (gate first)."""
    import torch

    L, C, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    K, D, F = cfg.get("num_key_value_heads") or H, C // H, cfg["intermediate_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    used: set[str] = set()

    def take(name: str, shape: tuple) -> torch.Tensor:
        used.add(name)
        return checked_weight(hf_state, name, shape, where)

    out = {"wte.weight": take("model.embed_tokens.weight", (V, C)), "ln_f.weight": take("model.norm.weight", (C,))}
    if not tied:
        out["lm_head.weight"] = take("lm_head.weight", (V, C))
    for i in range(L):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[f"{b}attn.c_attn.weight"] = torch.cat([take(f"{h}self_attn.q_proj.weight", (H * D, C)),
                                                   take(f"{h}self_attn.k_proj.weight", (K * D, C)),
                                                   take(f"{h}self_attn.v_proj.weight", (K * D, C))])  # [(H+2K)*D, C]
        out[f"{b}attn.c_proj.weight"] = take(f"{h}self_attn.o_proj.weight", (C, H * D))
        out[f"{b}mlp.c_fc.weight"] = torch.cat([take(f"{h}mlp.gate_proj.weight", (F, C)),
                                                take(f"{h}mlp.up_proj.weight", (F, C))])  # [2F, C]
        out[f"{b}mlp.c_proj.weight"] = take(f"{h}mlp.down_proj.weight", (C, F))
        out[f"{b}attn_norm.norm.weight"] = take(f"{h}input_layernorm.weight", (C,))
        out[f"{b}mlp_norm.norm.weight"] = take(f"{h}post_attention_layernorm.weight", (C,))
    unexpected = sorted(k for k in hf_state if k not in used and not k.endswith("rotary_emb.inv_freq")
                        and not (k == "lm_head.weight" and tied))
    if unexpected:
        raise GptxError(f"{where}: weights that a Llama language model does not have: {', '.join(unexpected[:3])}"
                        + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    return {k: v.contiguous() for k, v in out.items()}


# ---- the tokenizer an HF folder carries ---------------------------------------------------------

def tokenizer_of(hf_dir: Path, cfg: dict) -> tuple[dict, Optional[dict]]:
    """(the gptx [tokenizer] table, its state) for ``hf_dir``'s tokenizer.json: GPT-2's BPE, or the
    char or byte tokenizer ``gptx export --format hf`` wrote. A GPT-2 folder without one is GPT-2's."""
    f = hf_dir / "tokenizer.json"
    if not f.is_file():
        if cfg.get("model_type") == "gpt2":
            return {"kind": "gpt2"}, None
        raise _fail(hf_dir, "no tokenizer.json: gptx needs the model's tokenizer (GPT-2 BPE, char or byte)")
    if f.stat().st_size > MAX_TOKENIZER_BYTES:
        raise GptxError(f"{f}: {f.stat().st_size:,} bytes; a tokenizer.json gptx reads is at most {MAX_TOKENIZER_BYTES:,}")
    try:
        described = json.loads(read_regular(f).decode("utf-8"))
        model, pre = described["model"], described.get("pre_tokenizer") or {}
        vocab = model["vocab"]
        if not all(isinstance(part, dict) for part in (model, pre, vocab)):
            raise TypeError("model, model.vocab and pre_tokenizer must be JSON objects")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise GptxError(f"{f}: corrupted ({type(err).__name__}: {first_line(err)})") from None
    from gptx.plugins.tokenizers import byte_tokenizer_json, char_tokenizer_json

    if described == byte_tokenizer_json():
        return {"kind": "byte"}, None
    chars = None
    if model.get("type") == "WordLevel" and all(type(i) is int for i in vocab.values()):
        chars = sorted(vocab, key=vocab.get)
    if chars is not None and described == char_tokenizer_json(chars):
        return {"kind": "char"}, {"chars": chars}
    if model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and vocab.get("<|endoftext|>") == GPT2_VOCAB - 1 \
            and len(vocab) == GPT2_VOCAB:
        return {"kind": "gpt2"}, None
    raise GptxError(f"{f}: a {model.get('type')} tokenizer gptx has no equivalent for (it reads GPT-2 BPE and "
                    "the char and byte tokenizers gptx exports)")


def _weight_files(hf_dir: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files), preferring safetensors; shards come from the index."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (hf_dir / single).is_file():
            return kind, [hf_dir / single]
        if (hf_dir / index).is_file():
            try:
                weight_map = json.loads(read_regular(hf_dir / index).decode("utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise GptxError(f"{hf_dir / index}: corrupted ({type(err).__name__}: {err})") from None
            files = [hf_dir / n for n in names]
            if any(os.sep in n or "/" in n or n.startswith(".") for n in names):
                raise GptxError(f"{hf_dir / index}: shard names must be plain file names")
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise _fail(hf_dir, f"missing weight shard(s) {', '.join(missing[:3])} named in {index}")
            return kind, files
    raise _fail(hf_dir, "no weights: expected model.safetensors or pytorch_model.bin")


def read_hf_weights(hf_dir: Path) -> dict:
    """name -> tensor from the checkpoint's weight files; never unpickles arbitrary objects."""
    import torch

    kind, files = _weight_files(hf_dir)
    state: dict = {}
    for f in files:
        try:
            if kind == "safetensors":
                from safetensors.torch import load_file

                part = load_file(str(f), device="cpu")
            else:
                # weights_only: tensors and plain containers only; any other pickled object is refused
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except Exception as err:  # truncated, not a weights file, or a pickle with arbitrary objects
            raise GptxError(f"{f}: corrupted or not loadable safely ({type(err).__name__}: {first_line(err)})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
            raise GptxError(f"{f}: not a state dict of named tensors")
        state.update(part)
    return state


def weight_plan(cfg: dict, prefix: str = "transformer.") -> dict[str, tuple[str, tuple, bool]]:
    """The one map between the two layouts: gptx name -> (HF name, HF shape, transposed), for an
    HF GPT-2 ``config.json`` dict (HF's Conv1D stores [in, out]; gptx's Linear [out, in])."""
    L, C, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    P = cfg.get("n_positions", cfg.get("n_ctx"))
    hidden = cfg.get("n_inner") or 4 * C
    plan: dict[str, tuple[str, tuple, bool]] = {
        "wte.weight": (f"{prefix}wte.weight", (V, C), False),
        "positional.wpe.weight": (f"{prefix}wpe.weight", (P, C), False),
        "ln_f.weight": (f"{prefix}ln_f.weight", (C,), False),
        "ln_f.bias": (f"{prefix}ln_f.bias", (C,), False),
    }
    for i in range(L):
        h, b = f"{prefix}h.{i}.", f"blocks.{i}."
        for hf_ln, ours in (("ln_1", "attn_norm.norm"), ("ln_2", "mlp_norm.norm")):
            plan[f"{b}{ours}.weight"] = (f"{h}{hf_ln}.weight", (C,), False)
            plan[f"{b}{ours}.bias"] = (f"{h}{hf_ln}.bias", (C,), False)
        for hf_lin, ours, n_in, n_out in (
            ("attn.c_attn", "attn.c_attn", C, 3 * C),
            ("attn.c_proj", "attn.c_proj", C, C),
            ("mlp.c_fc", "mlp.c_fc", C, hidden),
            ("mlp.c_proj", "mlp.c_proj", hidden, C),
        ):
            plan[f"{b}{ours}.weight"] = (f"{h}{hf_lin}.weight", (n_in, n_out), True)  # Conv1D: [in, out]
            plan[f"{b}{ours}.bias"] = (f"{h}{hf_lin}.bias", (n_out,), False)
    if not cfg.get("tie_word_embeddings", True):
        plan["lm_head.weight"] = ("lm_head.weight", (V, C), False)
    return plan


def to_hf_state_dict(model, m=None) -> dict:
    """A plain gptx GPT-2 model's weights in Hugging Face ``GPT2LMHeadModel`` names and layouts
    (``m``: its config as built-ins, ``gptx.equivalence.as_builtins``; the model's own by default)."""
    m = m or model.config
    cfg = {"n_layer": m.n_layer, "n_embd": m.n_embd, "vocab_size": m.vocab_size, "n_positions": m.block_size,
           "n_inner": m.ffn.options.hidden, "tie_word_embeddings": m.tie_embeddings}
    ours = dict(model.state_dict())
    out = {theirs: (ours[name].t() if transpose else ours[name]).detach().contiguous()
           for name, (theirs, _shape, transpose) in weight_plan(cfg).items()}
    out["lm_head.weight"] = model.lm_head.weight.detach()  # HF's head; tied or not, the model's own
    return out


def checked_weight(hf_state: dict, name: str, shape: tuple, where: str):
    """``hf_state[name]`` as float32, refused on one line when missing, of another shape than
    config.json implies, or not floating point."""
    import torch

    t = hf_state.get(name)
    if t is None:
        raise GptxError(f"{where}: missing weight {name}")
    if tuple(t.shape) != shape:
        raise GptxError(f"{where}: {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    if not t.is_floating_point():
        raise GptxError(f"{where}: {name} is {t.dtype}, expected floating point weights")
    return t.to(torch.float32)


def convert_state_dict(hf_state: dict, cfg: dict, where: str = "checkpoint") -> dict:
    """HF GPT-2 names/layouts -> gptx names/layouts (fp32), checking every shape."""
    import torch

    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
    plan = weight_plan(cfg, prefix)
    V, C = cfg["vocab_size"], cfg["n_embd"]
    tied = bool(cfg.get("tie_word_embeddings", True))

    out = {}
    for ours, (theirs, shape, transpose) in plan.items():
        t = checked_weight(hf_state, theirs, shape, where)
        out[ours] = (t.t() if transpose else t).contiguous()

    used = {theirs for theirs, _, _ in plan.values()}
    unexpected = []
    for k, t in hf_state.items():
        if k in used or k.endswith(IGNORED_SUFFIXES):
            continue
        if k == "lm_head.weight" and tied:
            # stored anyway by some savers; it must be the embedding it is tied to
            if tuple(t.shape) != (V, C) or not torch.equal(t.to(torch.float32), out["wte.weight"]):
                raise GptxError(f"{where}: lm_head.weight differs from wte.weight although tie_word_embeddings is true")
            continue
        unexpected.append(k)
    if unexpected:
        raise GptxError(
            f"{where}: weights that a GPT-2 language model does not have: {', '.join(sorted(unexpected)[:3])}"
            + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
        )
    return out


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, registry=None) -> Path:
    """Convert the Hugging Face GPT-2 model in ``hf_dir`` into a gptx checkpoint under ``out_dir``
    (a run directory: ``out_dir/checkpoints/step-000000``). Returns the checkpoint directory.
    Every problem with the input is a GptxError; nothing is written unless the import succeeds."""
    from gptx import checkpoint
    from gptx.config import from_dict
    from gptx.errors import ConfigError
    from gptx.model import GPT

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.exists():
        raise GptxError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise GptxError(f"{hf_dir}: not a directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GptxError(f"{out_dir}: already exists and is not an empty directory; choose a new output directory")

    cfg = read_hf_config(hf_dir)
    tokenizer_table, tokenizer_state = tokenizer_of(hf_dir, cfg)
    try:
        config = from_dict(gptx_config_dict(cfg) | {"tokenizer": tokenizer_table}, registry)
    except ConfigError as err:
        raise GptxError(f"{hf_dir / 'config.json'}: cannot be expressed as a gptx config: {err}") from None
    tokenizer = checkpoint.build_tokenizer(config.tokenizer, tokenizer_state)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise GptxError(f"{hf_dir / 'config.json'}: vocab_size = {config.model.vocab_size} is not supported by gptx "
                        f"(the {tokenizer_table['kind']} tokenizer needs at least {tokenizer.vocab_size} token ids)")
    convert = convert_llama_state_dict if cfg.get("model_type") == "llama" else convert_state_dict
    state = convert(read_hf_weights(hf_dir), cfg, where=str(hf_dir))

    model = GPT(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.model.tie_embeddings)]
    if missing or unexpected:  # the mapping above and the model disagree: a gptx bug, not the user's
        raise RuntimeError(f"HF import mapping out of date: missing {missing[:3]}, unexpected {unexpected[:3]}")
    extra = {"imported_from": {"format": f"huggingface-{cfg['model_type']}", "path": str(hf_dir.resolve()), "config": cfg}}
    # built beside OUT_DIR and renamed into place whole: a failed import (disk full) leaves nothing
    # that would block the retry
    final = out_dir.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = temp_sibling(final)
    try:
        checkpoint.save(tmp, 0, model, config, tokenizer, extra=extra, keep=1)
        if final.exists():
            final.rmdir()  # the empty directory checked above
        os.rename(publishable(tmp), final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint.complete_checkpoints(final / "checkpoints")[-1]
