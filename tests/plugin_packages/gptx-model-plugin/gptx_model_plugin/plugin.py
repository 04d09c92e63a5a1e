"""The model side of gptx, extended from outside, through its hooks only:

- block ``rezero``: ReZero (Bachlechner et al. 2021, "ReZero is all you need"): no norms at all,
  each branch scaled by a learned scalar that starts at 0, so every layer starts as the identity.
- ffn ``sigmoid_moe``: a mixture of experts with DeepSeek-V3's sigmoid gating, built on the
  built-in ``moe`` (its load-balancing loss and metrics come along).
- block ``layerscale``: CaiT's LayerScale (Touvron et al. 2021): pre-norm, each branch scaled
  per channel by a learned vector that starts small. Its attention is ``self.mixer``, not
  ``self.attn``: the model finds a block's attention by type.
- attention ``token_major``: GPT-2's attention with its own cache layout, one [B, S, 2, K, D]
  tensor, declared through ``cache_layout()``.
- attention ``int8_values``: GPT-2's attention with a quantised cache of its own: keys kept in
  float, values as int8 codes with one absmax scale per token and head.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

import gptx
from gptx.components import AttentionOutput, Aux, Block, BlockOutput, FeedForwardOutput
from gptx.options import option


@dataclasses.dataclass(frozen=True)
class ReZeroOptions:
    init: float = 0.0  # the residual gates' initial value (the paper: 0)


class ReZeroBlock(Block):
    """x = x + a * attn(x); x = x + b * ffn(x), a and b learned scalars; no norm, no final norm."""

    Options = ReZeroOptions
    final_norm = False

    def __init__(self, config, options, layer):
        super().__init__(config, options, layer)
        self.attn = self.make_attention()
        self.mlp = self.make_ffn()
        self.gates = nn.Parameter(torch.full((2,), float(options.init)))  # [2]: attention, ffn

    def forward(self, x, positions, positional, past, attention_mask):
        # read the parts through .of: any installed attention or feed-forward, typed or not, fits
        a = AttentionOutput.of(self.attn(x, positions, positional, past, attention_mask), self.attn)  # y [B, T, C]
        x = x + self.gates[0] * a.y  # [B, T, C]
        m = FeedForwardOutput.of(self.mlp(x), self.mlp)  # y [B, T, C]
        return BlockOutput(x + self.gates[1] * m.y, a.present, Aux.merged(attn=a.aux, ffn=m.aux))  # x [B, T, C]


@dataclasses.dataclass(frozen=True)
class LayerScaleOptions:
    init: float = option(0.1, low=0, high=1)  # the per-channel scales' initial value (CaiT: 0.1 to 1e-6 by depth)


class LayerScaleBlock(Block):
    """x = x + s1 * mixer(norm(x)); x = x + s2 * ffn(norm(x)), s1 and s2 learned [C] vectors."""

    Options = LayerScaleOptions

    def __init__(self, config, options, layer):
        super().__init__(config, options, layer)
        # attribute names of our own: nothing in gptx reads block.attn (Block.attention() finds it by type)
        self.mixer, self.ffn = self.make_attention(), self.make_ffn()
        self.mixer_norm, self.ffn_norm = self.make_norm(), self.make_norm()
        self.scales = nn.Parameter(torch.full((2, config.n_embd), float(options.init)))  # [2, C]: mixer, ffn

    def forward(self, x, positions, positional, past, attention_mask):
        a = AttentionOutput.of(self.mixer(self.mixer_norm(x), positions, positional, past, attention_mask), self.mixer)
        x = x + self.scales[0] * a.y  # [B, T, C]
        m = FeedForwardOutput.of(self.ffn(self.ffn_norm(x)), self.ffn)  # y [B, T, C]
        # the parts' aux under the built-ins' part names: logged as aux/layer<i>.attn/... and .ffn/...
        return BlockOutput(x + self.scales[1] * m.y, a.present, Aux.merged(attn=a.aux, ffn=m.aux))  # x [B, T, C]


@gptx.hookimpl
def register_block(register):
    register("rezero", ReZeroBlock)
    register("layerscale", LayerScaleBlock)


# ---- a mixture-of-experts variant: sigmoid gating ------------------------------------------------

from gptx.plugins.moe import MoE  # noqa: E402  (a third-party component may build on a built-in)


class SigmoidMoE(MoE):
    """DeepSeek-V3's gating (Liu et al. 2024, sec. 2.1.2): each expert's affinity is the sigmoid
    of its router logit, independent of the others; the top-k affinities, renormalised, weight
    the chosen experts. Only the routing differs from the built-in ``moe``."""

    def route(self, x):  # x [N, C]
        logits = self.router(x).float()  # [N, E]
        affinity = logits.sigmoid()  # [N, E]
        weights, chosen = affinity.topk(self.options.top_k, dim=-1)  # [N, k] x2
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [N, k]
        probs = affinity / affinity.sum(dim=-1, keepdim=True)  # [N, E]: for the balance loss
        return logits, probs, weights, chosen


# ---- an attention with its own cache layout: token-major ------------------------------------------

from gptx.components import (BATCH, DEFAULT_SUPPORTS, SEQ, CacheTensor, append_cache, attention_allowed,  # noqa: E402
                             slot_indices)
from gptx.plugins.attention import CausalSelfAttention  # noqa: E402


class TokenMajorAttention(CausalSelfAttention):
    """GPT-2's attention with the cache stored token-major: one tensor [B, S, 2, K, D] (keys and
    values of each token side by side) instead of key and value [B, K, S, D]. The math is the
    built-in's; only the declared cache differs, which the model, the ONNX export, the
    onnxruntime generator, Node and the browser all follow."""

    supports = DEFAULT_SUPPORTS  # not the parent's fused-attention export: its forward is its own

    def cache_layout(self):
        return (CacheTensor("kv", (BATCH, SEQ, 2, self.n_kv, self.head_dim)),)

    def forward(self, x, positions, positional, past=None, attention_mask=None):
        import torch
        import torch.nn.functional as F

        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=2)  # [B, T, H*D], [B, T, K*D] x2
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = positional.rotate(q, k, positions)
        new = torch.stack([k.transpose(1, 2), v.view(B, T, K, D)], dim=2)  # [B, T, 2, K, D]
        past_len = None if past is None else past[0].shape[1]
        (packed,) = present = append_cache(past, (new,), (1,))  # [B, S, 2, K, D]
        k = packed[:, :, 0].transpose(1, 2)  # [B, K, S, D]
        v = packed[:, :, 1].transpose(1, 2)  # [B, K, S, D]
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # [B, H, S, D]
        mask = self._allowed_or_bias(positional, past_len, T, x.device, q.dtype, attention_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, T, D]
        return AttentionOutput(self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), present)  # [B, T, C]


# ---- an attention with a quantised cache of its own: int8 values -----------------------------------
# Written from docs/plugins.md alone: the Attention interface, CacheTensor with an integer dtype,
# append_cache, slot_indices and attention_allowed. The quantisation is its own few lines.

import torch.nn.functional as F  # noqa: E402

from gptx.components import Attention  # noqa: E402

VALUE_MAX = 127  # symmetric codes -127..127, so a code's negation is a code too


def quantize_values(v):
    """v [B, K, T, D] -> (codes int8 [B, K, T, D], scale [B, K, T, 1]), v ~ codes * scale. Per token:
    a token's scale is final when it is appended, so nothing earlier is re-quantised."""
    v32 = v.float()  # [B, K, T, D]; dividing in bf16 would round before the code does
    scale = v32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / VALUE_MAX  # [B, K, T, 1]; zeros stay finite
    codes = torch.round(v32 / scale).clamp(-VALUE_MAX, VALUE_MAX).to(torch.int8)  # [B, K, T, D]
    return codes, scale.to(v.dtype)


class Int8ValuesAttention(Attention):
    """Causal multi-head attention whose cache keeps keys in float (attention scores are the most
    sensitive to key error, KIVI's observation) and values as int8 codes plus per-token scales:
    about 0.6x the float cache. The new tokens attend over their exact values; only what is stored
    is quantised, so training and a prefill are plain attention."""

    def __init__(self, config, options):
        super().__init__(config, options)
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def cache_layout(self):
        heads = ("batch", self.n_head, "seq", self.head_dim)
        return (CacheTensor("key", heads),  # float: the model's dtype
                CacheTensor("value", heads, torch.int8),
                CacheTensor("value_scale", ("batch", self.n_head, "seq", 1), torch.float32))

    def forward(self, x, positions, positional, past=None, attention_mask=None):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))  # [B, H, T, D] x3
        q, k = positional.rotate(q, k, positions)
        codes, scale = quantize_values(v)  # [B, H, T, D] int8, [B, H, T, 1]
        past_len = 0 if past is None else past[0].shape[2]
        present = append_cache(past, (k, codes, scale), (2, 2, 2))  # key [B, H, S, D], value codes, scales
        keys = present[0]  # [B, H, S, D]: the past's exact keys and the new ones
        values = v if past is None else torch.cat([past[1].to(v.dtype) * past[2].to(v.dtype), v], dim=2)  # [B, H, S, D]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask(positional, past_len, T, x, attention_mask),
                                           dropout_p=self.config.dropout if self.training else 0.0)  # [B, H, T, D]
        return AttentionOutput(self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), present)  # [B, T, C]

    @staticmethod
    def _mask(positional, past_len, T, x, attention_mask):
        """From slot indices (never is_causal: with a past it aligns top-left): bool [B|1, 1, T, S],
        or, with a positional score bias, additive float [B|1, H, T, S]."""
        q_index, k_index = slot_indices(past_len, T, x.device)  # [T], [S]
        allowed = attention_allowed(q_index, k_index, attention_mask)  # [B|1, 1, T, S]
        bias = positional.score_bias(q_index, k_index)  # [H, T, S] or None
        if bias is None:
            return allowed
        return bias.to(x.dtype)[None].masked_fill(~allowed, float("-inf"))  # [B|1, H, T, S]


@gptx.hookimpl
def register_ffn(register):
    register("sigmoid_moe", SigmoidMoE)


@gptx.hookimpl
def register_attention(register):
    register("token_major", TokenMajorAttention)
    register("int8_values", Int8ValuesAttention)
