"""The five component interfaces a gptx model is assembled from.

A plugin implements one of these classes and registers it under a name (see ``hookspecs``).
Shapes use: B batch, T new tokens, P cached (past) tokens, S = P + T keys, C = n_embd,
H = n_head, K = key/value heads (H for multi-head, fewer for grouped-query), D = C // H.

Contracts every component keeps:
- ``Options`` is a small dataclass owned by the component; experiment files set its fields
  next to ``kind``. Validate in ``__post_init__`` (raise ``ValueError("problem")`` or
  ``ValueError(("field", "problem"))``); check combinations with the model in ``check``.
- ``supports`` declares what the component can do (``KV_CACHE``, ``ONNX_EXPORT``); tools refuse
  with a clear message instead of producing something wrong.
- No Python branch on a tensor's size in ``forward``: exported ONNX graphs bake such branches
  in. Branch on options or on ``None`` only.
"""
from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import nn

from gptx.base import CAPABILITIES, DEFAULT_SUPPORTS, KV_CACHE, ONNX_EXPORT, ONNX_FUSED_ATTENTION, Component, Tokenizer

if TYPE_CHECKING:
    from gptx.config import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, K, P, D]


class KVBuffer(tuple):
    """A (key, value) past whose tensors are the first P slots of preallocated [B, K, capacity, D]
    buffers (``GPT.empty_cache(..., capacity=...)``, used by ``gptx.generate``): ``append_kv``
    writes each new entry in place instead of copying the whole cache every token. It is still a
    (key, value) tuple, so an attention that concatenates stays correct, only slower."""

    def __new__(cls, keys: torch.Tensor, values: torch.Tensor, length: int):  # buffers [B, K, capacity, D]
        kv = super().__new__(cls, (keys[:, :, :length], values[:, :, :length]))  # [B, K, P, D] views
        kv.buffers, kv.length = (keys, values), length
        return kv


def append_kv(past: Optional[KV], k: torch.Tensor, v: torch.Tensor) -> KV:
    """The cache extended by the new keys and values [B, K, T, D]: ([B, K, P+T, D], [B, K, P+T, D]).
    In place when ``past`` is a KVBuffer with room, else one concatenation (and in exported graphs)."""
    if past is None:
        return k, v
    if isinstance(past, KVBuffer) and past.length + k.shape[2] <= past.buffers[0].shape[2]:
        keys, values = past.buffers
        start, end = past.length, past.length + k.shape[2]
        keys[:, :, start:end] = k  # the slots after every earlier view: no view sees them change
        values[:, :, start:end] = v
        return KVBuffer(keys, values, end)
    return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, K, P+T, D] x2


__all__ = [
    "CAPABILITIES", "DEFAULT_SUPPORTS", "KV_CACHE", "ONNX_EXPORT", "ONNX_FUSED_ATTENTION", "KV", "KVBuffer", "append_kv", "Component",
    "PositionalEncoding", "Attention", "FeedForward", "Norm", "NormPlacement", "Tokenizer",
]


class PositionalEncoding(Component, nn.Module, abc.ABC):
    """Where position enters the model. One instance per model, shared by every layer.

    It may act at up to three points; the defaults do nothing there:
    ``embed`` adds to the token embeddings (called by the model), ``rotate`` turns queries and
    keys (called by attention), ``score_bias`` biases attention scores (called by attention).
    """

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options

    @classmethod
    def max_positions(cls, config: "ModelConfig", options) -> Optional[int]:
        """Longest sequence this encoding can represent; None when unbounded."""
        return None

    def embed(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """positions [B, T] (int64) -> [B, T, C] added to the token embeddings, or None."""
        return None

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> KV:
        """q [B, H, T, D], k [B, K, T, D], positions [B, T] -> rotated (q, k) of the same shapes."""
        return q, k

    def score_bias(self, q_index: torch.Tensor, k_index: torch.Tensor) -> Optional[torch.Tensor]:
        """q_index [T], k_index [S]: absolute slots in the sequence (keys 0..S-1, queries P..S-1).
        Returns [H, T, S] added to the attention scores, or None. Left padding keeps real tokens
        contiguous, so slot distances equal position distances."""
        return None


class Attention(Component, nn.Module, abc.ABC):
    """Self-attention with a key/value cache.

    ``forward`` takes the hidden states of T new tokens and the cache of the P tokens before
    them (P may be 0) and returns the output and the cache extended by the new tokens. The
    mask comes from slot indices (keys 0..S-1, queries P..S-1) and ``attention_mask``, never
    from ``is_causal`` when a past exists: a past makes ``is_causal`` top-left aligned, i.e. wrong.
    Name the output projection ``c_proj``: the model scales its initialisation as GPT-2 does.
    """

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options

    @property
    def n_kv_heads(self) -> int:
        """K, the number of key/value heads kept in the cache."""
        return self.config.n_head

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        positions: torch.Tensor,  # [B, T] int64 position ids of the new tokens
        positional: PositionalEncoding,
        past: Optional[KV] = None,  # ([B, K, P, D], [B, K, P, D]) or None for no cache
        attention_mask: Optional[torch.Tensor] = None,  # [B, S] 1 = real token, 0 = padding
    ) -> tuple[torch.Tensor, KV]:  # ([B, T, C], present ([B, K, S, D], [B, K, S, D]))
        ...


class FeedForward(Component, nn.Module, abc.ABC):
    """The position-wise network of a block: [B, T, C] -> [B, T, C].
    Name the output projection ``c_proj`` (see ``Attention``)."""

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options


class Norm(Component, nn.Module, abc.ABC):
    """A normalisation layer over the last dimension: [..., C] -> [..., C]."""

    def __init__(self, dim: int, options):
        super().__init__()
        self.dim, self.options = dim, options


class NormPlacement(Component, nn.Module, abc.ABC):
    """Where the norms sit around one residual branch (attention or feed-forward).

    ``make_norm()`` builds one norm layer of the configured kind; a placement owns the norms it
    makes. ``final_norm`` says whether the model applies one more norm before the LM head.
    """

    final_norm: ClassVar[bool] = True

    def __init__(self, make_norm: Callable[[], Norm], options):
        super().__init__()
        self.options = options

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x [B, T, C], branch maps [B, T, C] -> [B, T, C]; returns the new residual stream [B, T, C]."""


# ---- helpers shared by attention implementations -------------------------------------------

def slot_indices(past_len, new_len, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute slots of the new tokens [T] and of all keys [S]. Works on symbolic sizes."""
    k_index = torch.arange(past_len + new_len, device=device)  # [S]
    return k_index[past_len:], k_index  # [T], [S]


def attention_allowed(
    q_index: torch.Tensor,  # [T]
    k_index: torch.Tensor,  # [S]
    attention_mask: Optional[torch.Tensor] = None,  # [B, S]
    window: Optional[int] = None,
) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S]: True where a query may attend to a key (causal, optional
    sliding window of ``window`` keys including itself, padding keys masked out)."""
    allowed = k_index[None, :] <= q_index[:, None]  # [T, S]
    if window is not None:
        allowed = allowed & (q_index[:, None] - k_index[None, :] < window)  # [T, S]
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # [B, 1, T, S]
        # a left-padding query sees no real key before it; let it see itself so softmax stays finite
        allowed = allowed | (k_index[None, :] == q_index[:, None])[None, None]
    return allowed


def gpt2_init_std(config: "ModelConfig", residual: bool) -> float:
    """GPT-2's init: std 0.02, residual output projections scaled by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02
