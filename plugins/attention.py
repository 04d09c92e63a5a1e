"""Attention: GPT-2's causal multi-head attention (with grouped-query, sliding-window and int8
KV-cache options) and the GPT-Lite einsum attention."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import (BATCH, DEFAULT_SUPPORTS, KV, ONNX_FUSED_ATTENTION, SEQ, Attention, AttentionOutput, Cache,
                             CacheTensor, append_cache, append_kv, attention_allowed, slot_indices)
from gptx.export import attention as onnx_attention


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    n_kv_heads: Optional[int] = None  # key/value heads; None: n_head (multi-head), 1: multi-query
    window: Optional[int] = None  # sliding window: each query sees at most this many keys (itself included)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the dot product (OLMo 2, modded-nanogpt)

    def __post_init__(self):
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ValueError(("n_kv_heads", f"must be at least 1, got {self.n_kv_heads}"))
        if self.window is not None and self.window < 1:
            raise ValueError(("window", f"must be at least 1, got {self.window}"))


@dataclasses.dataclass(frozen=True)
class CausalAttentionOptions(AttentionOptions):
    # "int8": keys and values cached as int8 with one absmax scale per token and head (the
    # per-token scheme of KIVI's values, Liu et al. 2024, applied to keys too); the tokens of the
    # current call attend over their exact keys and values, so training and a prefill are unchanged
    kv_cache: Literal["float", "int8"] = "float"


INT8_MAX = 127  # symmetric codes -127..127: -128 is never produced, so negation is exact


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, K, T, D] -> (codes int8 [B, K, T, D], scale [B, K, T, 1]) with x ~ codes * scale: one
    symmetric absmax scale per head and position. Per token, not per channel (KIVI's keys), because
    a streaming cache appends one token at a time: a token's scale is final when it is written, and
    no group of earlier tokens has to be held in float and re-quantised."""
    x32 = x.float()  # in bf16, x / scale would round to 3 significant digits before the code does
    amax = x32.abs().amax(dim=-1, keepdim=True)  # [B, K, T, 1]
    scale = amax.clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [B, K, T, 1]; an all-zero vector gives codes 0
    codes = torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # [B, K, T, D]
    return codes, scale.to(x.dtype)  # the scale in the model's dtype, as the cache declares floats


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes int8 [B, K, P, D] and scale [B, K, P, 1] -> [B, K, P, D] in ``dtype``."""
    return codes.to(dtype) * scale.to(dtype)  # [B, K, P, D]


def int8_layout(kv_heads: int, head_dim: int) -> tuple[CacheTensor, ...]:
    """The int8 cache: key and value codes [B, K, S, D] int8, then their scales [B, K, S, 1]."""
    codes = (BATCH, kv_heads, SEQ, head_dim)
    scales = (BATCH, kv_heads, SEQ, 1)
    return (CacheTensor("key", codes, torch.int8), CacheTensor("value", codes, torch.int8),
            CacheTensor("key_scale", scales), CacheTensor("value_scale", scales))


def append_int8(past: Optional[Cache], k: torch.Tensor, v: torch.Tensor):
    """The int8 cache extended by the new keys and values k, v [B, K, T, D], and the keys and values
    to attend over [B, K, P+T, D]: the past's dequantised, then the new tokens' exact ones."""
    k_codes, k_scale = quantize_per_token(k)  # [B, K, T, D] int8, [B, K, T, 1]
    v_codes, v_scale = quantize_per_token(v)  # [B, K, T, D] int8, [B, K, T, 1]
    present = append_cache(past, (k_codes, v_codes, k_scale, v_scale), (2, 2, 2, 2))
    if past is None:
        return present, k, v
    pk, pv, pks, pvs = past  # the P cached entries (views that the append above leaves unchanged)
    k = torch.cat([dequantize(pk, pks, k.dtype), k], dim=2)  # [B, K, P+T, D]
    v = torch.cat([dequantize(pv, pvs, v.dtype), v], dim=2)  # [B, K, P+T, D]
    return present, k, v


def with_kv_cache(model, kv_cache: str):
    """``model`` (a GPT with the causal attention) rebuilt to store its KV cache as ``kv_cache``,
    the same weights (the cache format adds no parameters), in eval mode: one checkpoint decoded
    with either cache (``gptx eval --kv-cache``, ``gptx bench``'s torch-kv8 backend)."""
    from gptx.errors import GptxError
    from gptx.model import GPT

    cfg = copy.deepcopy(model.config)
    if cfg.attention.name != "causal":
        raise GptxError(f"kv_cache is an option of the 'causal' attention; this model's attention is '{cfg.attention.name}'")
    cfg.attention.options = dataclasses.replace(cfg.attention.options, kv_cache=kv_cache)
    rebuilt = GPT(cfg).to(model.wte.weight.device, model.wte.weight.dtype)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.eval()


class _HeadsMixin:
    Options = AttentionOptions
    n_kv: int  # set by the constructor: options.n_kv_heads or n_head

    def _make_qk_norms(self, config, options):
        """Learned per-channel gains shared by the heads, as Dehghani et al. 2023 / OLMo 2."""
        if options.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)

    def _qk_normed(self, q, k):  # q [B, H, T, D], k [B, K, T, D]
        if not self.options.qk_norm:
            return q, k
        return self.q_norm(q), self.k_norm(k)  # same shapes, each head's vector at unit RMS

    @property
    def n_kv_heads(self) -> int:
        return self.n_kv

    @classmethod
    def check(cls, model, options):
        if options.n_kv_heads is not None and model.n_head % options.n_kv_heads:
            raise ValueError(("attention.n_kv_heads", f"n_head = {model.n_head} is not divisible by n_kv_heads = {options.n_kv_heads}"))

    def _allowed_or_bias(self, positional, past_len, T, device, dtype, attention_mask):
        """None when plain causal attention is exact (no cache, padding, window or bias), else the
        mask: bool [B|1, 1, T, S] or additive float [B|1, H, T, S]."""
        q_index, k_index = slot_indices(0 if past_len is None else past_len, T, device)  # [T], [S]
        bias = positional.score_bias(q_index, k_index)  # [H, T, S] or None
        if past_len is None and attention_mask is None and self.options.window is None and bias is None:
            return None
        allowed = attention_allowed(q_index, k_index, attention_mask, self.options.window)  # [B|1, 1, T, S]
        if bias is None:
            return allowed
        return bias.to(dtype)[None].masked_fill(~allowed, float("-inf"))  # [B|1, H, T, S]


class CausalSelfAttention(_HeadsMixin, Attention):
    """GPT-2 attention on ``scaled_dot_product_attention`` (flash/efficient kernels when unmasked).
    Exports as onnxruntime's fused attention op when it has no sliding window and a float cache.
    ``kv_cache = "int8"`` stores the cache as int8 codes and per-token scales (``append_int8``)."""

    Options = CausalAttentionOptions
    supports = DEFAULT_SUPPORTS | {ONNX_FUSED_ATTENTION}

    def __init__(self, config, options: CausalAttentionOptions):
        super().__init__(config, options)
        if options.kv_cache != "float":  # onnxruntime's GroupQueryAttention keeps a float cache
            self.supports = DEFAULT_SUPPORTS
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.n_kv = options.n_kv_heads or config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._make_qk_norms(config, options)

    def forward(self, x, positions, positional, past: Optional[KV] = None, attention_mask=None):
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=2)  # [B, T, H*D], [B, T, K*D] x2
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = self._qk_normed(q, k)
        q, k = positional.rotate(q, k, positions)
        if self.options.window is None and onnx_attention.enabled(self, positional):
            y, present = onnx_attention.fused_attention(q, k, v, past, attention_mask)  # [B, T, C], cache
            return AttentionOutput(self.resid_dropout(self.c_proj(y)), present)  # [B, T, C], cache
        past_len = None if past is None else past[0].shape[2]
        present, k, v = self._cached(past, k, v)  # the declared cache; k, v [B, K, S, D]
        if K != H:  # grouped-query: each key/value head serves H // K query heads
            k = k.repeat_interleave(H // K, dim=1)  # [B, H, S, D]
            v = v.repeat_interleave(H // K, dim=1)  # [B, H, S, D]
        mask = self._allowed_or_bias(positional, past_len, T, x.device, q.dtype, attention_mask)
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return AttentionOutput(self.resid_dropout(self.c_proj(y)), present)  # [B, T, C], the declared cache

    def cache_layout(self) -> tuple[CacheTensor, ...]:
        if self.options.kv_cache == "int8":
            return int8_layout(self.n_kv, self.head_dim)
        return super().cache_layout()

    def _cached(self, past: Optional[Cache], k: torch.Tensor, v: torch.Tensor):
        """The present cache and the keys and values to attend over, each [B, K, S, D]."""
        if self.options.kv_cache == "int8":
            return append_int8(past, k, v)
        present = append_kv(past, k, v)  # ([B, K, S, D], [B, K, S, D])
        return (present, *present)


class EinsumAttention(_HeadsMixin, Attention):
    """GPT-Lite's attention: separate q/k/v projections, scores and mixing spelled out with einsum."""

    def __init__(self, config, options: AttentionOptions):
        super().__init__(config, options)
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.n_kv = options.n_kv_heads or config.n_head
        self.query = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.key = nn.Linear(config.n_embd, self.n_kv * self.head_dim, bias=config.bias)
        self.value = nn.Linear(config.n_embd, self.n_kv * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._make_qk_norms(config, options)

    def forward(self, x, positions, positional, past: Optional[KV] = None, attention_mask=None):
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q = self.query(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.key(x).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = self.value(x).view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = self._qk_normed(q, k)
        q, k = positional.rotate(q, k, positions)
        past_len = 0 if past is None else past[0].shape[2]
        present = append_kv(past, k, v)  # ([B, K, S, D], [B, K, S, D])
        k, v = present
        q = q.view(B, K, H // K, T, D)  # [B, K, G, T, D]: G query heads share one key/value head
        scores = torch.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(D)  # [B, K, G, T, S]
        scores = scores.reshape(B, H, T, -1)  # [B, H, T, S]
        q_index, k_index = slot_indices(past_len, T, x.device)  # [T], [S]
        bias = positional.score_bias(q_index, k_index)  # [H, T, S] or None
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        allowed = attention_allowed(q_index, k_index, attention_mask, self.options.window)  # [B|1, 1, T, S]
        att = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, H, T, S]
        att = self.attn_dropout(att).view(B, K, H // K, T, -1)  # [B, K, G, T, S]
        y = torch.einsum("bkgts,bksd->bkgtd", att, v).reshape(B, H, T, D)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return AttentionOutput(self.resid_dropout(self.c_proj(y)), present)  # [B, T, C], ([B, K, S, D], [B, K, S, D])


@gptx.hookimpl(trylast=True)
def register_attention(register):
    register("causal", CausalSelfAttention)
    register("einsum", EinsumAttention)
