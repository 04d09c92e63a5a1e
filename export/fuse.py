"""Operator fusion for onnxruntime, with onnxruntime's own transformer fusions (shipped in the
onnxruntime wheel): residual Add + LayerNormalization -> SkipLayerNormalization, the GELU
formula -> FastGelu/Gelu, bias adds folded into them. Batch-1 decoding runs a few hundred small
kernels per token besides the matrix products; fusing them makes decoding faster (the measured
gain is in docs/performance.md).

Only exact rewrites are enabled (no GELU approximation). The fused graph is verified against
PyTorch like any export, and ``export_checkpoint`` falls back to the plain graph when it is not
within tolerance, so a component whose pattern the fusions misread costs speed, never correctness.
"""
from __future__ import annotations

import logging

import onnx

from gptx.errors import first_line


class FusionFailed(Exception):
    """onnxruntime's fusion pass could not read the graph (the graph then stays unfused)."""


def fuse(proto: onnx.ModelProto, n_head: int, n_embd: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A fused copy of ``proto`` (left untouched) and the count of each fused operator; FusionFailed
    when onnxruntime's pass fails on it."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    fused = onnx.ModelProto()
    fused.CopyFrom(proto)
    options = FusionOptions("gpt2")
    options.enable_attention = False  # its patterns are HF GPT-2's past/present layout, not this contract's
    options.enable_embed_layer_norm = False  # keeps the token and position embeddings plain Gathers
    options.enable_rotary_embeddings = False  # RoPE stays the verified formula
    _gemms_as_matmuls(fused)
    out = _ort_fusion_pass(fused, n_head, n_embd, options)
    drop_identity_reshapes(out)
    before = contrib_ops(proto)
    counts = {op: n - before.get(op, 0) for op, n in contrib_ops(out).items() if n > before.get(op, 0)}
    for mine, theirs in ((out.graph.input, proto.graph.input), (out.graph.output, proto.graph.output)):
        del mine[:]  # the I/O contract as exported: it prunes inputs a graph does not read (position_ids with ALiBi)
        mine.extend(theirs)
    if any(n.domain == "com.microsoft" for n in out.graph.node) and \
            not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # onnx's checker and shape inference need it
    return out, counts


def _ort_fusion_pass(proto: onnx.ModelProto, n_head: int, n_embd: int, options) -> onnx.ModelProto:
    """onnxruntime's fusion pass over ``proto`` (in place). Its pattern matchers declare no error
    types: whatever they raise on a graph they cannot read (onnx shape inference, their own
    assertions and lookups) is that pass refusing the graph, FusionFailed; gptx's own code stays
    outside this guard, so its bugs are not mistaken for a refusal."""
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns that the producer is not "pytorch"
    try:
        return optimize_by_fusion(proto, "gpt2", num_heads=n_head, hidden_size=n_embd, optimization_options=options).model
    except Exception as err:  # noqa: BLE001 - onnxruntime's untyped refusal, see above
        raise FusionFailed(f"{type(err).__name__}: {first_line(err)}") from err
    finally:
        logger.setLevel(level)


def _gemms_as_matmuls(proto: onnx.ModelProto) -> int:
    """Every Gemm that onnxruntime's GPT-2 post-processing would misread, as MatMul (+ Add): the
    same product. That pass rewrites each Gemm after a norm and reads its bias and the Reshape after
    it unconditionally, so a bias-free 2-D Linear such as an MoE router failed the whole fusion
    (IndexError, AttributeError). Only Gemms with a weight initializer, alpha = beta = 1 and no
    transA are rewritten. Returns how many."""
    from onnx import helper, numpy_helper

    g = proto.graph
    weights = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    nodes, rewritten = [], 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        read_as_gpt2 = bias is not None and any(r.op_type == "Reshape" for r in readers.get(n.output[0], []))
        if n.op_type != "Gemm" or read_as_gpt2 or n.input[1] not in weights or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(weights[n.input[1]])  # [in, out], or [out, in] with transB
        name = f"{n.input[1]}.as_matmul"
        g.initializer.append(numpy_helper.from_array(w.T.copy() if attrs.get("transB", 0) else w, name))
        product = f"{n.output[0]}.product" if bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], name], [product], name=f"{n.name}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [n.output[0]], name=f"{n.name}.bias"))
        rewritten += 1
    del g.node[:]
    g.node.extend(nodes)
    still_read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in still_read]
    del g.initializer[:]
    g.initializer.extend(kept)
    return rewritten


def contrib_ops(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each onnxruntime (com.microsoft) operator ``proto`` holds."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def drop_identity_reshapes(proto: onnx.ModelProto) -> int:
    """Remove Reshape pairs that give a tensor back its own shape, ``Reshape(Reshape(x, s1), s2)``
    with s2 = shape(x) by the graph's (symbolic) shape annotations: attention's head views around a
    fused attention op, which cost a kernel launch each per layer and token. Returns the pairs removed."""
    g = proto.graph
    shapes = {v.name: _shape(v) for v in [*g.input, *g.value_info, *g.output]}
    made_by = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    drop, rename = set(), {}
    for outer in g.node:
        inner = made_by.get(outer.input[0]) if outer.op_type == "Reshape" else None
        if inner is None or inner.op_type != "Reshape" or readers.get(inner.output[0]) != 1 or outer.output[0] in outputs:
            continue
        source, target = shapes.get(inner.input[0]), shapes.get(outer.output[0])
        if source is not None and source == target:
            drop |= {id(inner), id(outer)}
            rename[outer.output[0]] = inner.input[0]
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
    del g.node[:]
    g.node.extend(keep)
    return len(rename)


def _shape(value: onnx.ValueInfoProto):
    """The dims as ints and symbol names, or None when any dim is unknown."""
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in value.type.tensor_type.shape.dim]
    return None if not value.type.tensor_type.HasField("shape") or None in dims or "" in dims else tuple(dims)
