"""``gptx export SOURCE --format gguf -o OUT``: a checkpoint as ``OUT/model.gguf`` for llama.cpp
(and transformers' GGUF loader), written with ggml's own writer (``gguf.GGUFWriter``).

The layout decision and the weight map are the Hugging Face export's (``hf_export.layout_of``,
``hf_export.hf_weights``); the GGUF names then come from the ``gguf`` package's own table of
Hugging Face names (``gguf.get_tensor_name_map``), as llama.cpp's convert_hf_to_gguf names them:
- ``GPT2LMHeadModel`` -> architecture ``gpt2`` (HF's Conv1D [in, out] weights transposed back);
- ``LlamaForCausalLM`` -> architecture ``llama`` (q/k rows reordered for llama.cpp's rotary pairs).
Tokenizers: GPT-2 BPE as ``tokenizer.ggml.model = "gpt2"`` (vocabulary, merges, ``<|endoftext|>``
as bos/eos); ``char`` and ``byte`` as a sentencepiece-style (``"llama"``) vocabulary that llama.cpp
encodes as gptx does (the differences are in docs/deploy.md and tests/test_gguf_export.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from gptx.errors import GptxError
from gptx.export.hf_export import builtin_view, check_export_dir, hf_weights, layout_of, write_folder

FILE = "model.gguf"
MARK = "gptx.exported_from"  # a metadata key llama.cpp ignores; marks the file as ours for a re-export
TYPES = ("f32", "f16", "q8_0")
SPACE = "\u2581"  # sentencepiece's spelling of " ": llama.cpp's "llama" tokenizer looks spaces up as it
# the GGUF architecture for each transformers class the layout decision names
ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
# HF's Conv1D stores [in, out]; GGUF, like gptx's Linear, [out, in] (convert_hf_to_gguf transposes these)
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gguf_tensors(model, m, arch: str) -> dict:
    """The model's tensors under their GGUF names, as float32 numpy arrays in GGUF's layout
    (``m``: the model's config as built-ins, ``hf_export.builtin_view``)."""
    import gguf

    n_kv = m.attention.options.n_kv_heads or m.n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[arch].upper()], m.n_layer)
    out = {}
    for hf_name, t in hf_weights(model, m, arch).items():
        if hf_name.endswith(CONV1D):
            t = t.t()  # [in, out] -> [out, in]
        elif hf_name.endswith("self_attn.q_proj.weight"):
            t = rotary_pairs(t, m.n_head)  # [H*D, C]
        elif hf_name.endswith("self_attn.k_proj.weight"):
            t = rotary_pairs(t, n_kv)  # [K*D, C]
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GptxError(f"--format gguf: the gguf package has no name for {hf_name}")  # a gguf release that renamed it
        out[name] = t.contiguous().numpy()
    return out


def rotary_pairs(w, n_heads: int):
    """Reorder a q/k projection's rows per head from rotate-half order (gptx, transformers: a
    dimension i turns with i + D/2) to llama.cpp's adjacent pairs (2i with 2i + 1): llama.cpp's
    ``permute`` in convert_hf_to_gguf, which transformers' GGUF loader undoes."""
    rows, cols = w.shape  # [n_heads*D, C]
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def encoded(name: str, data, gguf_type: str):
    """(array, GGML type) for one tensor: 1-D tensors (norms, biases) and the learned positions stay
    float32 as convert_hf_to_gguf keeps them; a q8_0 matrix whose rows are not whole 32-value blocks
    falls back to f16, as it does there."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    if gguf_type == "f32" or data.ndim == 1 or name.startswith("position_embd."):
        return data, Q.F32
    if gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, Q.Q8_0), Q.Q8_0
    return data.astype(np.float16), Q.F16


def write_hparams(w, ck, m, arch: str, gguf_type: str) -> None:
    """The hyperparameters llama.cpp's loader reads for ``gpt2`` / ``llama`` (``m``: the model's
    config as built-ins)."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    w.add_name(Path(ck.path).name)
    w.add_string(MARK, str(ck.path))
    w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                     "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(m.block_size)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_head_count(m.n_head)
    if arch == "GPT2LMHeadModel":
        w.add_feed_forward_length(m.ffn.options.hidden or 4 * m.n_embd)
        w.add_layer_norm_eps(m.norm.options.eps)
        return
    w.add_feed_forward_length(ck.model.blocks[0].mlp.c_proj.weight.shape[1])
    w.add_head_count_kv(m.attention.options.n_kv_heads or m.n_head)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)  # gptx turns the whole head
    w.add_rope_freq_base(m.positional.options.base)
    w.add_layer_norm_rms_eps(m.norm.options.eps)
    w.add_vocab_size(m.vocab_size)


def check_tokenizer(ck) -> None:
    """GPT-2 BPE, char and byte have a GGUF form; a char vocabulary holding sentencepiece's space
    sign cannot (llama.cpp reads that sign as a space)."""
    from gptx.plugins.tokenizers import is_gpt2_bpe

    tok = ck.config.tokenizer
    if not (is_gpt2_bpe(ck.tokenizer) or tok.name in ("char", "byte")):
        raise GptxError(f"--format gguf: tokenizer '{tok.name}' has no GGUF form yet (gpt2, char and byte have)")
    if tok.name == "char" and SPACE in ck.tokenizer.state()["chars"]:
        raise GptxError(f"--format gguf: the char vocabulary holds {SPACE!r} (U+2581), which llama.cpp's "
                        "sentencepiece vocabulary reads as a space; use --format hf")


def write_tokenizer(w, ck) -> None:
    """tokenizer.ggml.*: the vocabulary (padded to the model's rows as convert_hf_to_gguf pads:
    "[PAD<id>]", unused), merges for BPE, the special ids, no BOS added (gptx adds none)."""
    from gguf import TokenType

    from gptx.plugins.tokenizers import gpt2_tokenizer_json

    name, state = ck.config.tokenizer.name, ck.tokenizer.state()
    if name == "char":
        tokens = [SPACE if c == " " else c for c in state["chars"]]
    elif name == "byte":
        tokens = [SPACE if b == 0x20 else f"<0x{b:02X}>" for b in range(256)]
    else:
        described = gpt2_tokenizer_json()["model"]
        tokens = sorted(described["vocab"], key=described["vocab"].get)
    types = [TokenType.NORMAL] * len(tokens)
    if name == "byte":  # llama.cpp falls back to these "<0xXX>" tokens for every character it has no token for
        types = [TokenType.NORMAL if b == 0x20 else TokenType.BYTE for b in range(256)]
    eot = ck.tokenizer.eot_id
    if eot is not None:
        types[eot] = TokenType.CONTROL
    pad = range(len(tokens), ck.config.model.vocab_size)
    tokens, types = tokens + [f"[PAD{i}]" for i in pad], types + [TokenType.UNUSED] * len(pad)
    if name in ("char", "byte"):
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0] * len(tokens))  # no merges to rank: every token is one character or byte
        w.add_add_space_prefix(False)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(described["merges"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if eot is not None:
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_gguf(path: Path, ck, m, arch: str, gguf_type: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), ARCHS[arch])
    try:
        write_hparams(w, ck, m, arch, gguf_type)
        write_tokenizer(w, ck)
        for name, data in gguf_tensors(ck.model, m, arch).items():
            array, qtype = encoded(name, data, gguf_type)
            w.add_tensor(name, array, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _marked(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return MARK in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file, or a damaged one: not ours to replace
        return False


def check_out_dir(out_dir: Path, force: bool, protected: list[Path]) -> None:
    check_export_dir(out_dir, force, protected, FILE, {FILE}, _marked, "a previous gptx --format gguf export")


def export_gguf(source, out_dir, gguf_type: str = "f32", force: bool = False,
                log: Callable[[str], None] = print) -> list[str]:
    """Write ``out_dir/model.gguf`` for the checkpoint ``source``; built in a temporary sibling that
    replaces ``out_dir`` only when complete."""
    from gptx import checkpoint

    if gguf_type not in TYPES:
        raise GptxError(f"--gguf-type: {gguf_type!r} is not one of {', '.join(TYPES)}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force, [Path.cwd()])
    ck = checkpoint.load(source)
    m = builtin_view(ck.model, ck.config.model, fmt="gguf")
    arch = layout_of(m, "gguf")
    check_tokenizer(ck)
    check_out_dir(out_dir, force, [Path.cwd(), ck.path])
    log(f"exporting {ck.path} ({ck.model.num_params():,} parameters) as GGUF {ARCHS[arch]}, {gguf_type}, to {out_dir}")
    write_folder(out_dir, lambda tmp: write_gguf(tmp / FILE, ck, m, arch, gguf_type))
    log(f"wrote {out_dir / FILE} (load with llama.cpp, or transformers' from_pretrained(OUT, gguf_file=\"{FILE}\"))")
    return [FILE]
