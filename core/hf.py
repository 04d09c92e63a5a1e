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

from gptx.errors import GptxError, first_line
from gptx.fsutil import publishable, read_regular, remove_stale_siblings, temp_sibling

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
    if model_type != "gpt2":
        raise GptxError(f"{f}: model_type is {model_type!r}; only GPT-2 ('gpt2') checkpoints can be imported")

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
    if cfg["vocab_size"] < GPT2_VOCAB:
        refuse("vocab_size", f"the gpt2 tokenizer needs at least {GPT2_VOCAB} token ids")
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
    """The gptx experiment config (plain data) that describes the HF model."""
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
        "tokenizer": {"kind": "gpt2"},
    }


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


def to_hf_state_dict(model) -> dict:
    """A plain gptx GPT-2 model's weights in Hugging Face ``GPT2LMHeadModel`` names and layouts."""
    m = model.config
    cfg = {"n_layer": m.n_layer, "n_embd": m.n_embd, "vocab_size": m.vocab_size, "n_positions": m.block_size,
           "n_inner": m.ffn.options.hidden, "tie_word_embeddings": m.tie_embeddings}
    ours = dict(model.state_dict())
    out = {theirs: (ours[name].t() if transpose else ours[name]).detach().contiguous()
           for name, (theirs, _shape, transpose) in weight_plan(cfg).items()}
    out["lm_head.weight"] = model.lm_head.weight.detach()  # HF's head; tied or not, the model's own
    return out


def convert_state_dict(hf_state: dict, cfg: dict, where: str = "checkpoint") -> dict:
    """HF GPT-2 names/layouts -> gptx names/layouts (fp32), checking every shape."""
    import torch

    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
    plan = weight_plan(cfg, prefix)
    V, C = cfg["vocab_size"], cfg["n_embd"]
    tied = bool(cfg.get("tie_word_embeddings", True))

    out = {}
    for ours, (theirs, shape, transpose) in plan.items():
        t = hf_state.get(theirs)
        if t is None:
            raise GptxError(f"{where}: missing weight {theirs}")
        if tuple(t.shape) != shape:
            raise GptxError(f"{where}: {theirs} has shape {list(t.shape)}, config.json implies {list(shape)}")
        if not t.is_floating_point():
            raise GptxError(f"{where}: {theirs} is {t.dtype}, expected floating point weights")
        t = t.to(torch.float32)
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
    try:
        config = from_dict(gptx_config_dict(cfg), registry)
    except ConfigError as err:
        raise GptxError(f"{hf_dir / 'config.json'}: cannot be expressed as a gptx config: {err}") from None
    state = convert_state_dict(read_hf_weights(hf_dir), cfg, where=str(hf_dir))

    model = GPT(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.model.tie_embeddings)]
    if missing or unexpected:  # the mapping above and the model disagree: a gptx bug, not the user's
        raise RuntimeError(f"HF import mapping out of date: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer = checkpoint.build_tokenizer(config.tokenizer)
    extra = {"imported_from": {"format": "huggingface-gpt2", "path": str(hf_dir.resolve()), "config": cfg}}
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
