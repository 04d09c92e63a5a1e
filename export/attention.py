"""onnxruntime's fused attention in exported graphs (com.microsoft GroupQueryAttention, and
MultiHeadAttention where GroupQueryAttention cannot run), emitted while ``torch.onnx.export``
traces an attention that opts in.

The plain exported attention is a dozen small kernels per layer and token: transposes of q, k
and v, the concatenation of the cache, the mask arithmetic, two matmuls and a softmax. One fused
node does all of it and appends the new keys and values to the cache itself:

- ``GroupQueryAttention`` (any K dividing H, head_dim a multiple of 8, onnxruntime's own limit):
  the caller states every row's total length (``total_sequence_length`` = S, the attention
  mask's width; ``seqlens_k`` = S - 1 for every row, all equal under left padding) and the
  left-padding keys are masked with an additive ``attention_bias``. Because S comes from the
  mask and not from the past's length, a past that is a preallocated buffer longer than S works
  too: onnxruntime then writes the new keys and values into that buffer in place when the
  caller binds it as the present as well (``past_present_share_buffer``, what onnxruntime-genai
  does), instead of copying the whole cache every token.
- ``MultiHeadAttention`` with ``unidirectional=1`` (K == H with another head size): the past in
  the contract's [B, H, P, D] layout and the attention mask as an int32 ``key_padding_mask``.

Both keep the contract's past/present names and shapes. What differs from the plain graph is
only what padding rows hold: a left-padding query attends to itself in gptx's torch model and
to its (masked) keys here, so logits and presents at padding positions are unspecified; no real
token ever reads them. Verification compares real positions only.

An attention opts in by declaring ``ONNX_FUSED_ATTENTION`` in ``supports`` (its class's, or its
own when its options rule the op out) and calling
``fused_attention`` from its ``forward`` under ``torch.onnx.is_in_onnx_export()`` when
``enabled(self, positional)``. The export turns fusion on with ``fusing(model)`` around its
trace: an attribute on each of that model's attention modules, removed after, so a plain
``torch.onnx.export`` of the same model (or of another model meanwhile) stays plain.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from gptx.base import ONNX_FUSED_ATTENTION
from gptx.components import KV, Attention, PositionalEncoding

# The instance attribute ``fusing`` sets on each attention module of the model it traces: per
# module, not per process, so only that model's trace is affected.
_FUSE = "_gptx_export_fused_attention"
_ABSENT = object()


@contextlib.contextmanager
def fusing(model: torch.nn.Module, on: bool = True):
    """Within this block, the attentions of ``model`` that declare ONNX_FUSED_ATTENTION export
    the fused op (``on``); each module's attribute is put back as it was after the block."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    before = [m.__dict__.get(_FUSE, _ABSENT) for m in attentions]
    for m in attentions:
        setattr(m, _FUSE, on)
    try:
        yield
    finally:
        for m, value in zip(attentions, before):
            if value is _ABSENT:
                delattr(m, _FUSE)
            else:
                setattr(m, _FUSE, value)


def requested(attention) -> bool:
    """Whether the exporter asked this attention module for the fused op (``fusing``)."""
    return getattr(attention, _FUSE, False) is True


def enabled(attention, positional: PositionalEncoding) -> bool:
    """Whether ``attention`` should emit the fused op in the trace under way: the exporter asked
    this module for it (``requested``), the attention declares ONNX_FUSED_ATTENTION (an instance may
narrow its class's ``supports``: the causal attention's int8 cache, which the fused op cannot keep), it is
    not training (dropout), and the positional encoding adds no score bias (onnxruntime's ops
    would need it as a tensor). ``torch.compiler.is_exporting``, not ``torch.onnx.is_in_onnx_export``:
    torch.onnx.export captures with torch.export, non-strict then strict, and under the strict
    capture the latter reads False, which silently re-captured a fused branch that had failed as
    the plain attention (its error lost)."""
    return (requested(attention) and torch.compiler.is_exporting()
            and ONNX_FUSED_ATTENTION in attention.supports
            and not attention.training
            and type(positional).score_bias is PositionalEncoding.score_bias)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Optional[KV],
                    attention_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, KV]:
    """Causal attention of q [B, H, T, D] over the past [B, K, P, D] plus k, v [B, K, T, D], with
    left-padding ``attention_mask`` [B, P+T]; returns (y [B, T, H*D], present ([B, K, P+T, D] x2)).
    Export-time only: the result is onnxruntime's op, not a computation torch can run."""
    B, H, T, D = q.shape
    K = k.shape[1]
    if past is None:
        past = (k.new_zeros(B, K, 0, D), v.new_zeros(B, K, 0, D))  # [B, K, 0, D] x2
    q3 = q.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H*D]
    k3 = k.transpose(1, 2).reshape(B, T, K * D)  # [B, T, K*D]
    v3 = v.transpose(1, 2).reshape(B, T, K * D)  # [B, T, K*D]
    fused = _multi_head if K == H and D % 8 else _group_query
    y, pk, pv = fused(q3, k3, v3, past, attention_mask, H, K)  # [B, T, H*D], [B, K, S, D] x2
    return y, (pk, pv)


def _outputs(q3, past, T, K):
    """dtypes and shapes of (y [B, T, H*D], present key and value [B, K, P+T, D])."""
    B, _, HD = q3.shape
    S, D = past[0].shape[2] + T, past[0].shape[3]
    return {"dtypes": (q3.dtype,) * 3, "shapes": ([B, T, HD], [B, K, S, D], [B, K, S, D]), "version": 1}


def _multi_head(q3, k3, v3, past: KV, attention_mask, H: int, K: int):
    """MultiHeadAttention: causal (unidirectional), left padding as an int32 key_padding_mask [B, S]."""
    mask = None if attention_mask is None else attention_mask.to(torch.int32)  # [B, S]
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::MultiHeadAttention",
        [q3, k3, v3, None, mask, None, past[0], past[1]],
        {"num_heads": H, "unidirectional": 1},
        **_outputs(q3, past, k3.shape[1], K),
    )


def _group_query(q3, k3, v3, past: KV, attention_mask, H: int, K: int):
    """GroupQueryAttention: every row holds S slots (left padding; S the mask's width, so a past
    buffer may be longer than P), all T new rows are real; left-padding keys are masked by an
    additive attention_bias [B, 1, T, S] of the dtype's minimum (finite, so a padding query's
    softmax stays finite too)."""
    B, T, _ = q3.shape
    S = past[0].shape[2] + T if attention_mask is None else attention_mask.shape[1]
    total = torch.full((), S, dtype=torch.int32)  # scalar
    seqlens_k = (total - 1).expand(B)  # [B]: the last slot index of each row
    bias = None
    if attention_mask is not None:
        blocked = attention_mask[:, None, None, :] == 0  # [B, 1, 1, S]
        bias = torch.zeros(blocked.shape, dtype=q3.dtype).masked_fill(blocked, torch.finfo(q3.dtype).min)
        bias = bias.expand(B, 1, T, S)  # [B, 1, T, S]
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [q3, k3, v3, past[0], past[1], seqlens_k, total, None, None, None, bias],
        {"num_heads": H, "kv_num_heads": K},
        **_outputs(q3, past, T, K),
    )
