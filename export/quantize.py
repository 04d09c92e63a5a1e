"""``--quantize int8`` and ``--quantize int4``: weight quantization of the exported graph, and how
far it moves the output from fp32.

- int8: dynamic int8 quantization (onnxruntime ``quantize_dynamic``): MatMul/Gemm with a constant
  weight run on int8 weights with activations quantized on the fly; the embedding tables for
  Gather are stored int8 and only the gathered rows are dequantized.
- int4: 4-bit block quantization (onnxruntime ``MatMulNBitsQuantizer``): every constant-weight
  MatMul becomes ``MatMulNBits`` (symmetric, one scale per block of ``INT4_BLOCK_SIZE`` inputs,
  fewer when the model is narrower; int8 compute: ``accuracy_level`` 4) and the embedding tables
  ``GatherBlockQuantized``. Blocks of 128 rather than 32: on GPT-2 124M they decoded and
  prefilled faster and moved the logits about as much as blocks of 32 on the models measured
  (the figures: docs/performance.md).

The trap: in the fp32 export the LM head reads the tied embedding through a
Transpose. Quantizing that as it is leaves the head in fp32 (its B input is not a constant), or,
if the Gather is quantized too, dequantizes the whole matrix every step. So the quantized copy
gives the head its own [C, V] initializer (``untie_transposed_weights``) before either scheme
runs: the tied matrix is then stored twice, each copy quantized (int8: ~2 bytes per tied
parameter instead of 4; int4: ~1).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gptx.export.onnx_export import save
from gptx.export.verify import abs_diff

SCHEMES = ("int8", "int4")
INT4_BLOCK_SIZE = 128  # inputs per scale (at most); see docs/performance.md for 32 vs 128
QUANTIZED_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits")
WEIGHTS = {
    "int8": "int8 per-tensor: MatMul/Gemm with constant weights (dynamic activation quantization) and Gather tables",
    "int4": "int4 symmetric blocks: MatMulNBits (int8 compute) for constant-weight MatMuls, "
            "GatherBlockQuantized for the embedding tables",
}


def untie_transposed_weights(proto: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) nodes by a transposed initializer; returns how many."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    keep, n = [], 0
    for node in g.node:
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            w = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), node.output[0]))
            n += 1
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return n


def quantize(scheme: str, fp32_path: Path, out_path: Path, work_dir: Path) -> dict:
    """Write the ``scheme`` (int8 | int4) quantization of ``fp32_path`` to ``out_path``, keeping its
    metadata; returns facts for the export report."""
    proto = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in proto.metadata_props}
    untied = untie_transposed_weights(proto)
    t0 = time.perf_counter()
    root, quant = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    levels = root.level, quant.level
    root.setLevel(logging.ERROR)  # both quantizers log hints and per-node progress
    quant.setLevel(logging.ERROR)
    try:
        q = _int8(proto, Path(work_dir)) if scheme == "int8" else _int4(proto)
    finally:
        root.setLevel(levels[0])
        quant.setLevel(levels[1])
    seconds = time.perf_counter() - t0
    block = next((a.i for n in q.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"), None)
    onnx.helper.set_model_props(q, {**{p.key: p.value for p in q.metadata_props}, **props})
    save(q, out_path)
    ops = [n.op_type for n in q.graph.node]
    return {
        "weights": WEIGHTS[scheme],
        "untied_transposes": untied,
        "quantized_matmuls": sum(op in QUANTIZED_MATMULS for op in ops),
        "fp32_matmuls_left": ops.count("MatMul"),
        **({"block_size": block} if block else {}),
        "seconds": round(seconds, 2),
    }


def _int8(proto: onnx.ModelProto, work_dir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staged, out = work_dir / "untied.onnx", work_dir / "int8.onnx"
    save(proto, staged)
    try:
        quantize_dynamic(
            str(staged), str(out),
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out))
    finally:
        for f in (staged, out, Path(str(out) + ".data")):
            f.unlink(missing_ok=True)


def _int4(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        proto, bits=4, block_size=_int4_block_size(proto), is_symmetric=True, accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


def _int4_block_size(proto: onnx.ModelProto) -> int:
    """INT4_BLOCK_SIZE, or the largest power of two (at least 16) within the narrowest weight's
    input size: a block longer than its column is padded, which only wastes space (tiny models)."""
    inits = {t.name: t for t in proto.graph.initializer}
    widths = [inits[n.input[1]].dims[0] for n in proto.graph.node
              if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    narrowest = min(widths, default=INT4_BLOCK_SIZE)
    return max(16, min(INT4_BLOCK_SIZE, 1 << (max(narrowest, 1).bit_length() - 1)))


def compare(fp32_session, quantized_session, meta: dict, scheme: str, prompts: int = 3, prompt_len: int = 16,
            new_tokens: int = 32, seed: int = 0) -> dict:
    """Agreement of the quantized graph with fp32 on a few random prompts (max abs logits
    difference over the prompts' logits, greedy tokens in common before the first difference) and
    the decoding speed of both (batch 1, tokens/s after each prefill, over all prompts)."""
    m = meta["model"]
    rng = np.random.default_rng(seed)
    ctx = m["context_length"]
    prompt_len = max(1, min(prompt_len, ctx // 2))
    new_tokens = max(1, min(new_tokens, ctx - prompt_len))
    runs = []
    for _ in range(prompts):
        prompt = rng.integers(0, m["vocab_size"], prompt_len).tolist()
        runs.append((_greedy(fp32_session, meta, prompt, new_tokens), _greedy(quantized_session, meta, prompt, new_tokens)))
    same = [next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), new_tokens) for a, b in runs]
    fp32_rate, q_rate = (_rate([r[k] for r in runs]) for k in (0, 1))
    return {
        "prompt_logits_max_abs_diff": max(float(np.max(abs_diff(a["prompt_logits"], b["prompt_logits"]))) for a, b in runs),
        # the padding's -inf logits (a padded vocabulary) are not "logits up to inf"
        "prompt_logits_max_abs": max(float(np.max(np.abs(a["prompt_logits"]), where=np.isfinite(a["prompt_logits"]), initial=0.0)) for a, _ in runs),
        "greedy_tokens_identical_prefix": same,  # per prompt
        "greedy_tokens_compared": new_tokens,
        "fp32_tokens_per_s": fp32_rate,
        f"{scheme}_tokens_per_s": q_rate,
        "speedup": round(q_rate / fp32_rate, 2) if fp32_rate else None,
    }


def _rate(greedy_runs: list[dict]) -> float:
    tokens = sum(r["decoded"] for r in greedy_runs)
    seconds = sum(r["seconds"] for r in greedy_runs)
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def _greedy(session, meta: dict, prompt: list[int], new_tokens: int) -> dict:
    """Greedy ids, the prompt's logits [T, V], and the tokens decoded after the prompt and their seconds."""
    from gptx.export import cache_layout, shares_buffer
    from gptx.export.runtime import KVDecoder

    decoder = KVDecoder(session, meta["model"]["n_layer"], cache_layout(meta), shares_buffer(meta))
    logits = decoder.start([prompt], new_tokens)  # [1, T, V]
    first, ids, t_decode = logits[0], [], time.perf_counter()
    for _ in range(new_tokens):
        ids.append(int(logits[0, -1].argmax()))
        if len(ids) < new_tokens:
            logits = decoder.step(np.array(ids[-1:], dtype=np.int64))  # [1, 1, V]
    return {"ids": ids, "prompt_logits": first, "decoded": new_tokens - 1, "seconds": time.perf_counter() - t_decode}
