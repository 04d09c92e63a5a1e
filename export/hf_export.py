"""``gptx export SOURCE --format hf -o OUT``: a checkpoint as a Hugging Face model folder that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer`` load offline.

Two layouts have an exact transformers equivalent, chosen by the positional encoding:
- learned positions, LayerNorm, tanh GELU, multi-head attention, pre-norm, biases ->
  ``GPT2LMHeadModel``, the inverse of ``gptx import-hf`` (``gptx.hf.weight_plan`` is the one map),
  so export then import gives back the same tensors;
- RoPE, RMSNorm, SwiGLU, grouped-query or multi-head attention, pre-norm, no biases ->
  ``LlamaForCausalLM`` (gptx's fused q/k/v and gate/up projections split into Llama's).
A third-party component counts as the built-in it declares (``hf_equivalent``, gptx.equivalence).
Any other component or option is refused on one line naming it. The tokenizer travels as the
tokenizer.json it describes itself as (``Tokenizer.tokenizer_json``); one without is refused.

    OUT/config.json            GPT2Config or LlamaConfig (+ "gptx": marks the folder as a gptx export)
    OUT/model.safetensors      the weights in the transformers class's names
    OUT/tokenizer.json, OUT/tokenizer_config.json
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
# the transformers class for each positional encoding, and the component each slot must name
LAYOUTS = {
    "learned": ("GPT2LMHeadModel", {"model.attention": "causal", "model.ffn": "gelu", "model.norm": "layernorm",
                                    "model.block": "sequential"}),
    "rope": ("LlamaForCausalLM", {"model.attention": "causal", "model.ffn": "swiglu", "model.norm": "rmsnorm",
                                  "model.block": "sequential"}),
}


# how each format names the two layouts in its refusals: the transformers class, or the GGUF architecture
NAMES = {"hf": ("transformers", {"GPT2LMHeadModel": "GPT2LMHeadModel", "LlamaForCausalLM": "LlamaForCausalLM"}),
         "gguf": ("llama.cpp", {"GPT2LMHeadModel": "GGUF gpt2", "LlamaForCausalLM": "GGUF llama"})}


def builtin_view(model, model_cfg, reg=None, fmt: str = "hf"):
    """``model_cfg`` with each component that declares a built-in twin (``hf_equivalent``) in its
    place, after checking ``model``'s weights are the twin's (keys and shapes); one line otherwise."""
    from gptx.equivalence import as_builtins, differing_weights

    view = as_builtins(model_cfg, reg)
    declared = [(t, s) for (t, s), (_, v) in zip(model_cfg.components(), view.components()) if s.name != v.name]
    if declared:
        problem = differing_weights(model, view)
        if problem is not None:
            who = ", ".join(f"{t} '{s.name}' (hf_equivalent = '{s.cls.hf_equivalent}')" for t, s in declared)
            raise GptxError(f"--format {fmt}: {who}: the weights are not the built-in's: {problem}")
    return view


def layout_of(m, fmt: str = "hf", reg=None) -> str:
    """The transformers class that holds model config ``m`` (built-ins only: ``builtin_view``)
    exactly; a GptxError on one line naming the component or option that has no equivalent
    otherwise (in ``--format fmt``'s words)."""
    from gptx import registry as registry_mod

    reg = reg or registry_mod.registry()
    family, shown = NAMES[fmt]
    if m.positional.name not in LAYOUTS:
        raise GptxError(f"--format {fmt}: model.positional '{m.positional.name}' has no {family} equivalent "
                        f"({shown['GPT2LMHeadModel']} needs 'learned', {shown['LlamaForCausalLM']} 'rope')")
    arch, wanted = LAYOUTS[m.positional.name]
    name = shown[arch]
    for table, spec in m.components():
        if table in wanted and spec.name != wanted[table]:
            raise GptxError(f"--format {fmt}: {table} '{spec.name}' has no {name} equivalent ({name} needs "
                            f"{table} = '{wanted[table]}' with model.positional = '{m.positional.name}')")
        if not reg.get(table.split(".")[1], spec.name).plugin.builtin:  # a plugin's class under a built-in's name
            raise GptxError(f"--format {fmt}: {table} '{spec.name}' is {spec.cls.__module__}'s, not gptx's built-in, and "
                            "declares no hf_equivalent")
    attention, block = m.attention.options, m.block.options
    gpt2 = arch == "GPT2LMHeadModel"
    refused = [
        (gpt2 and attention.n_kv_heads not in (None, m.n_head), "model.attention.n_kv_heads", "grouped-query attention"),
        (attention.window is not None, "model.attention.window", "a sliding window"),
        (attention.qk_norm, "model.attention.qk_norm", "normed queries and keys"),
        (gpt2 and m.ffn.options.approximate != "tanh", "model.ffn.approximate", "the exact GELU (GPT-2's is the tanh approximation)"),
        (block.placement != "pre", "model.block.placement", f"'{block.placement}' norms (it is pre-norm)"),
        (gpt2 and not m.bias, "model.bias", "layers without biases (GPT-2's have them)"),
        (not gpt2 and m.bias, "model.bias", "biases (Llama's layers have none)"),
    ]
    for bad, key, what in refused:
        if bad:
            raise GptxError(f"--format {fmt}: {key}: {name} has no {what}")
    return arch


def hf_config(ck, m, arch: str) -> dict:
    """config.json for ``arch``, from ``m``: the checkpoint's model config as built-ins (``builtin_view``)."""
    eot = ck.tokenizer.eot_id
    common = {"architectures": [arch], "vocab_size": m.vocab_size, "bos_token_id": eot, "eos_token_id": eot,
              "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32", "use_cache": True,
              "initializer_range": 0.02, "gptx": {"exported_from": str(ck.path)}}  # "gptx": a re-export may replace it
    if arch == "GPT2LMHeadModel":
        return common | {
            "model_type": "gpt2", "n_positions": m.block_size, "n_ctx": m.block_size, "n_embd": m.n_embd,
            "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": m.ffn.options.hidden or 4 * m.n_embd,
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm.options.eps, "scale_attn_weights": True,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout}
    return common | {
        "model_type": "llama", "hidden_size": m.n_embd, "intermediate_size": _swiglu_hidden(ck.model),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
        "num_key_value_heads": m.attention.options.n_kv_heads or m.n_head, "head_dim": m.head_dim,
        "hidden_act": "silu", "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm.options.eps,
        "rope_theta": m.positional.options.base, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": m.dropout}


def _swiglu_hidden(model) -> int:
    return model.blocks[0].mlp.c_proj.weight.shape[1]


def hf_weights(model, m, arch: str) -> dict:
    """The model's tensors in ``arch``'s names (``m``: its config as built-ins); a tied head is
    stored once (transformers ties lm_head to the embedding on load, as safetensors stores no
    shared tensors)."""
    if arch == "GPT2LMHeadModel":
        from gptx.hf import to_hf_state_dict

        state = to_hf_state_dict(model, m)
    else:
        state = _llama_state_dict(model, m)
    if m.tie_embeddings:
        del state["lm_head.weight"]
    return {name: t.detach().float().contiguous().clone() for name, t in state.items()}


def _llama_state_dict(model, m) -> dict:
    """gptx's fused projections split into Llama's: c_attn [H*D + 2*K*D, C] -> q, k, v;
    the SwiGLU's c_fc [2*hidden, C] -> gate, up (gate first, as gptx chunks it)."""
    H, K, D = m.n_head, m.attention.options.n_kv_heads or m.n_head, m.head_dim
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["wte.weight"], "model.norm.weight": ours["ln_f.weight"],
           "lm_head.weight": ours["lm_head.weight"]}
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = ours[f"{b}attn.c_attn.weight"].split([H * D, K * D, K * D])  # [H*D, C], [K*D, C] x2
        gate, up = ours[f"{b}mlp.c_fc.weight"].chunk(2)  # [hidden, C] x2
        out |= {f"{h}self_attn.q_proj.weight": q, f"{h}self_attn.k_proj.weight": k, f"{h}self_attn.v_proj.weight": v,
                f"{h}self_attn.o_proj.weight": ours[f"{b}attn.c_proj.weight"],
                f"{h}mlp.gate_proj.weight": gate, f"{h}mlp.up_proj.weight": up,
                f"{h}mlp.down_proj.weight": ours[f"{b}mlp.c_proj.weight"],
                f"{h}input_layernorm.weight": ours[f"{b}attn_norm.norm.weight"],
                f"{h}post_attention_layernorm.weight": ours[f"{b}mlp_norm.norm.weight"]}
    return out


def check_tokenizer(ck) -> None:
    from gptx.export.tokenizer_json import refusal

    if ck.tokenizer.tokenizer_json() is None:
        raise GptxError(f"--format hf: {refusal(ck.config.tokenizer.name, 'transformers')}")


def check_out_dir(out_dir: Path, force: bool, protected: list[Path]) -> None:
    check_export_dir(out_dir, force, protected, CONFIG_FILE, set(FILES), _marked, "a previous gptx --format hf export")


def check_export_dir(out_dir: Path, force: bool, protected: list[Path], manifest: str, files: set[str],
                     marked: Callable[[Path], bool], ours: str) -> None:
    """OUT may be missing, empty, an earlier export of this format (``marked(OUT/manifest)``,
    holding only ``files``), or anything with ``force``; never a folder holding the source, the
    working directory or the home directory."""
    refuse_to_replace(out_dir, protected)
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not marked(out_dir / manifest):
        raise GptxError(f"{out_dir}: not empty and not {ours}; choose another -o or pass --force to replace it")
    refuse_foreign_files(out_dir, manifest, files, "a previous gptx export", ours)


def _marked(config: Path) -> bool:
    try:
        return isinstance(json.loads(config.read_text(encoding="utf-8")).get("gptx"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def write_folder(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Build ``out_dir`` by ``fill``-ing a temporary sibling, which replaces it only when complete;
    a refused write (full disk, read-only folder) is one line, and nothing half-written stays."""
    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir.resolve())
    tmp = temp_sibling(out_dir.resolve())
    try:
        fill(tmp)
        replace_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = refused_write(err, out_dir, "the export")
        if refused is not None:
            raise refused from None
        raise


def export_hf(source, out_dir, force: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Write the Hugging Face folder for the checkpoint ``source``; returns the file names. Built in
    a temporary sibling that replaces ``out_dir`` only when complete."""
    from safetensors.torch import save_file

    from gptx import checkpoint
    from gptx.export import tokenizer_json

    out_dir = Path(out_dir)
    check_out_dir(out_dir, force, [Path.cwd()])
    ck = checkpoint.load(source)
    m = builtin_view(ck.model, ck.config.model)
    arch = layout_of(m)
    check_tokenizer(ck)
    check_out_dir(out_dir, force, [Path.cwd(), ck.path])
    log(f"exporting {ck.path} ({ck.model.num_params():,} parameters) as a Hugging Face {arch} to {out_dir}")

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(ck, m, arch), indent=2))
        save_file(hf_weights(ck.model, m, arch), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer_json.write(tmp, ck.tokenizer, m.block_size)

    write_folder(out_dir, fill)
    log(f"wrote {out_dir}: {', '.join(FILES)} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return list(FILES)
