"""``--quantize int8``: dynamic int8 quantization of the weight matmuls, and how far it moves the
output from fp32.

The trap (see FIELD-NOTES): in the fp32 export the LM head reads the tied embedding through a
Transpose. Quantizing that as it is leaves the head in fp32 (its B input is not a constant), or,
if the Gather is quantized too, dequantizes the whole matrix every step. So the quantized copy
gives the head its own [C, V] initializer; MatMul/Gemm with a constant weight are quantized
(activations quantized on the fly), and the embedding tables for Gather are stored int8 and only
the gathered rows are dequantized. int8 weights then take ~2 bytes per tied parameter (embedding
and head each int8) instead of 4.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gptx.export.onnx_export import save


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


def quantize_int8(fp32_path: Path, out_path: Path, work_dir: Path) -> dict:
    """Write the int8 model to ``out_path``; returns facts for the export report."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in proto.metadata_props}
    untied = untie_transposed_weights(proto)
    staged = Path(work_dir) / "untied.onnx"
    save(proto, staged)
    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" hint on the root logger
    try:
        quantize_dynamic(
            str(staged), str(out_path),
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    seconds = time.perf_counter() - t0
    staged.unlink()
    q = onnx.load(str(out_path))
    onnx.helper.set_model_props(q, {**{p.key: p.value for p in q.metadata_props}, **props})
    save(q, out_path)
    ops = [n.op_type for n in q.graph.node]
    return {
        "weights": "int8 per-tensor: MatMul/Gemm with constant weights (dynamic activation quantization) and Gather tables",
        "untied_transposes": untied,
        "quantized_matmuls": sum(op in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for op in ops),
        "fp32_matmuls_left": ops.count("MatMul"),
        "seconds": round(seconds, 2),
    }


def compare(fp32_session, int8_session, meta: dict, prompt_len: int = 16, new_tokens: int = 32, seed: int = 0) -> dict:
    """Agreement of int8 with fp32 (max abs logits difference on a prompt, greedy tokens in common)
    and decoding speed of both (batch 1, tokens/s after the prefill)."""
    m = meta["model"]
    rng = np.random.default_rng(seed)
    ctx = m["context_length"]
    prompt_len = max(1, min(prompt_len, ctx // 2))
    new_tokens = max(1, min(new_tokens, ctx - prompt_len))
    prompt = rng.integers(0, m["vocab_size"], prompt_len).tolist()
    a = _greedy(fp32_session, m, prompt, new_tokens)
    b = _greedy(int8_session, m, prompt, new_tokens)
    same = 0
    for x, y in zip(a["ids"], b["ids"]):
        if x != y:
            break
        same += 1
    return {
        "prompt_logits_max_abs_diff": float(np.max(np.abs(a["prompt_logits"] - b["prompt_logits"]))),
        "prompt_logits_max_abs": float(np.max(np.abs(a["prompt_logits"]))),
        "greedy_tokens_identical_prefix": same,
        "greedy_tokens_compared": new_tokens,
        "fp32_tokens_per_s": a["tokens_per_s"],
        "int8_tokens_per_s": b["tokens_per_s"],
        "speedup": round(b["tokens_per_s"] / a["tokens_per_s"], 2) if a["tokens_per_s"] else None,
    }


def _greedy(session, m: dict, prompt: list[int], new_tokens: int) -> dict:
    from onnxruntime import OrtValue

    from gptx.export import input_names, output_names

    L, K, D = m["n_layer"], m["kv_heads"], m["head_dim"]
    ins, outs = input_names(L), output_names(L)
    ids = np.array([prompt], dtype=np.int64)
    past = [OrtValue.ortvalue_from_numpy(np.zeros((1, K, 0, D), np.float32)) for _ in range(2 * L)]
    pos = np.arange(len(prompt), dtype=np.int64)[None]
    out, first, t_decode = [], None, None
    for step in range(new_tokens):
        if step == 1:
            t_decode = time.perf_counter()
        mask = np.ones((1, len(prompt) + step), dtype=np.int64)
        feeds = [OrtValue.ortvalue_from_numpy(x) for x in (ids, mask, pos)] + past
        res = session.run_with_ort_values(outs, dict(zip(ins, feeds)))
        logits = res[0].numpy()
        if first is None:
            first = logits[0]
        past = res[1:]
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids, pos = np.array([[nxt]], dtype=np.int64), pos[:, -1:] + 1
    rate = (new_tokens - 1) / (time.perf_counter() - t_decode) if t_decode else 0.0
    return {"ids": out, "prompt_logits": first, "tokens_per_s": round(rate, 1)}
