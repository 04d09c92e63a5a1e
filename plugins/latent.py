"""Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, sec. 2.1): keys and values are
rebuilt from one low-rank latent per token, and that latent is all the cache keeps.

    c = W_dkv x                      [B, T, r]     the cached latent
    k_h = W_uk c,  v_h = W_uv c      [B, H, S, D]  per head, rebuilt from the latent
    q_h = W_q x                      [B, H, T, D]

Position: with an encoding that rotates queries and keys (RoPE), keys rebuilt from the latent
cannot carry it (the rotation would have to commute with W_uk), so positions ride on extra
"decoupled" dimensions: q_rope per head and one k_rope per token shared by the heads, rotated
and cached next to the latent (the paper's d_h^R). Encodings that add to the embeddings
(learned, sinusoidal) or bias the scores (ALiBi) need none.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import (
    BATCH, KV_CACHE, ONNX_EXPORT, SEQ, Attention, AttentionOutput, CacheTensor, PositionalEncoding, append_cache,
    attention_allowed, slot_indices,
)


def rotates(positional_cls) -> bool:
    """Whether a positional encoding acts by rotating queries and keys."""
    return positional_cls.rotate is not PositionalEncoding.rotate


@dataclasses.dataclass(frozen=True)
class LatentOptions:
    kv_rank: Optional[int] = None  # the cached latent's width r; None: n_embd / 4
    rope_dim: Optional[int] = None  # decoupled rotary dims per head; None: head_dim with a rotating encoding, else 0
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (the rebuilt part) before the dot product

    def __post_init__(self):
        if self.kv_rank is not None and self.kv_rank < 1:
            raise ValueError(("kv_rank", f"must be at least 1, got {self.kv_rank}"))
        if self.rope_dim is not None and self.rope_dim < 0:
            raise ValueError(("rope_dim", f"must not be negative, got {self.rope_dim}"))


class LatentAttention(Attention):
    """Multi-head latent attention: a [B, S, kv_rank] latent (and a [B, S, rope_dim] rotated key
    under RoPE) is the whole cache, instead of keys and values [B, H, S, D] x2."""

    Options = LatentOptions
    supports = frozenset({KV_CACHE, ONNX_EXPORT})  # its cache is declared, so the export follows it

    @classmethod
    def check(cls, model, options):
        rope_dim = cls.rope_dim_of(model, options)
        if rotates(model.positional.cls) and rope_dim != model.head_dim:
            raise ValueError(("attention.rope_dim", f"must equal the head size {model.head_dim} with positional "
                              f"'{model.positional.name}' (its rotation is sized by the head), got {rope_dim}"))
        if not rotates(model.positional.cls) and rope_dim:
            raise ValueError(("attention.rope_dim", f"positional '{model.positional.name}' does not rotate queries and "
                              "keys: leave rope_dim unset (0)"))

    @staticmethod
    def rope_dim_of(model, options) -> int:
        if options.rope_dim is not None:
            return options.rope_dim
        return model.head_dim if rotates(model.positional.cls) else 0

    def __init__(self, config, options: LatentOptions):
        super().__init__(config, options)
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.rank = options.kv_rank or max(1, config.n_embd // 4)
        self.rope_dim = self.rope_dim_of(config, options)
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        self.q_proj = nn.Linear(config.n_embd, H * (D + R), bias=config.bias)
        self.kv_down = nn.Linear(config.n_embd, self.rank + R, bias=config.bias)  # the latent and the rotated key
        self.kv_norm = nn.RMSNorm(self.rank, eps=1e-6)  # the paper normalises the latent
        self.k_up = nn.Linear(self.rank, H * D, bias=False)
        self.v_up = nn.Linear(self.rank, H * D, bias=False)
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if options.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(D, eps=1e-6), nn.RMSNorm(D, eps=1e-6)

    def cache_layout(self):
        latent = CacheTensor("latent", (BATCH, SEQ, self.rank))
        return (latent, CacheTensor("k_rope", (BATCH, SEQ, self.rope_dim))) if self.rope_dim else (latent,)

    def forward(self, x, positions, positional, past=None, attention_mask=None):
        B, T, C = x.shape
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, D + R).transpose(1, 2)  # [B, H, T, D+R]
        down = self.kv_down(x)  # [B, T, r+R]
        latent, k_rope = down[..., :self.rank], down[..., self.rank:]  # [B, T, r], [B, T, R]
        q_nope, q_rope = q[..., :D], q[..., D:]  # [B, H, T, D], [B, H, T, R]
        if R:
            q_rope, k_rope = positional.rotate(q_rope, k_rope[:, None], positions)  # [B, H, T, R], [B, 1, T, R]
            k_rope = k_rope[:, 0]  # [B, T, R]
        past_len = 0 if past is None else past[0].shape[1]
        present = append_cache(past, (latent, k_rope) if R else (latent,), (1, 1) if R else (1,))  # [B, S, r] (+ [B, S, R])
        c = self.kv_norm(present[0])  # [B, S, r]
        S = c.shape[1]
        k = self.k_up(c).view(B, S, H, D).transpose(1, 2)  # [B, H, S, D]
        v = self.v_up(c).view(B, S, H, D).transpose(1, 2)  # [B, H, S, D]
        if self.options.qk_norm:
            q_nope, k = self.q_norm(q_nope), self.k_norm(k)
        if R:
            q = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, T, D+R]
            k = torch.cat([k, present[1][:, None].expand(B, H, S, R)], dim=-1)  # [B, H, S, D+R]
        else:
            q = q_nope
        q_index, k_index = slot_indices(past_len, T, x.device)  # [T], [S]
        allowed = attention_allowed(q_index, k_index, attention_mask)  # [B|1, 1, T, S]
        bias = positional.score_bias(q_index, k_index)  # [H, T, S] or None
        mask = allowed if bias is None else bias.to(q.dtype)[None].masked_fill(~allowed, float("-inf"))
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1 / math.sqrt(D + R))  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H*D]
        return AttentionOutput(self.resid_dropout(self.c_proj(y)), present)  # [B, T, C], ([B, S, r] (, [B, S, R]))


@gptx.hookimpl(trylast=True)
def register_attention(register):
    register("latent", LatentAttention)
