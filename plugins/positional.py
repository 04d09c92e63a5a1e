"""Positional encodings: GPT-2's learned table, and the alternatives that act at the other
two points (rotating queries/keys: RoPE; biasing scores: ALiBi), or not at all."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

import gptx
from gptx.components import PositionalEncoding
from gptx.options import option


def inverse_frequencies(base: float, dim: int) -> torch.Tensor:
    """base^(-2i/dim) for i < dim/2: the angle per position of each (sin, cos) pair -> [dim/2]."""
    half = dim // 2
    return base ** (-torch.arange(half, dtype=torch.float32) / half)


class LearnedPositions(PositionalEncoding):
    """GPT-2: a learned [block_size, C] table added to the token embeddings."""

    def __init__(self, config, options):
        super().__init__(config, options)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    @classmethod
    def max_positions(cls, config, options):
        return config.block_size

    def embed(self, positions):
        return self.wpe(positions)  # [B, T] -> [B, T, C]


@dataclasses.dataclass(frozen=True)
class FrequencyOptions:
    """Options of the encodings built from sines and cosines of position * base^(-2i/dim)."""

    base: float = option(10000.0, low=1, high=1e12, low_open=True)  # long-context models raise it (Llama 3: 500,000)
    max_positions: Optional[int] = None  # the longest context the model is declared for; None: unbounded

    def __post_init__(self):
        if not self.base > 1:
            raise ValueError(("base", f"must be greater than 1, got {self.base}"))
        if self.max_positions is not None and self.max_positions < 1:
            raise ValueError(("max_positions", f"must be at least 1, got {self.max_positions}"))


class _DeclaredLimit:
    """The context limit is what ``options.max_positions`` declares (None: unbounded)."""

    @classmethod
    def max_positions(cls, config, options):
        return options.max_positions


@dataclasses.dataclass(frozen=True)
class SinusoidalOptions(FrequencyOptions):
    # amplitude of the sines/cosines. The paper adds amplitude 1 to token embeddings scaled up by
    # sqrt(C); gptx keeps GPT-2's token embeddings (std 0.02), which amplitude 1 drowns (a 4-layer
    # char model then sits at the unigram loss for hundreds of steps). 0.02 matches them.
    scale: float = option(0.02, low=0, high=100, low_open=True)

    def __post_init__(self):
        super().__post_init__()
        if not self.scale > 0:
            raise ValueError(("scale", f"must be positive, got {self.scale}"))


class SinusoidalPositions(_DeclaredLimit, PositionalEncoding):
    """"Attention is all you need": fixed sines and cosines added to the embeddings; no parameters,
    computed from the positions so any length works."""

    Options = SinusoidalOptions

    @classmethod
    def check(cls, model, options):
        if model.n_embd % 2:
            raise ValueError(("n_embd", f"sinusoidal positions need an even n_embd, got {model.n_embd}"))

    def __init__(self, config, options):
        super().__init__(config, options)
        self.register_buffer("inv_freq", inverse_frequencies(options.base, config.n_embd), persistent=False)  # [C/2]

    def embed(self, positions):
        angle = positions[..., None].float() * self.inv_freq  # [B, T, C/2]
        return self.options.scale * torch.cat([angle.sin(), angle.cos()], dim=-1)  # [B, T, C]


class RotaryPositions(_DeclaredLimit, PositionalEncoding):
    """RoPE (Su et al.), GPT-NeoX layout: rotate each pair (i, i + D/2) of q and k by a position-dependent angle."""

    Options = FrequencyOptions

    @classmethod
    def check(cls, model, options):
        if model.head_dim % 2:
            raise ValueError(("n_embd", f"rope needs an even head size, got n_embd / n_head = {model.head_dim}"))

    def __init__(self, config, options):
        super().__init__(config, options)
        self.register_buffer("inv_freq", inverse_frequencies(options.base, config.head_dim), persistent=False)  # [D/2]

    def rotate(self, q, k, positions):
        angle = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, T, D/2]
        cos, sin = angle.cos(), angle.sin()  # [B, 1, T, D/2]

        def turn(x):  # [B, heads, T, D]
            x1, x2 = x.float().chunk(2, dim=-1)  # [B, heads, T, D/2] x2
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)  # [B, heads, T, D]

        return turn(q), turn(k)


class AlibiPositions(PositionalEncoding):
    """ALiBi (Press et al.): no embedding; each head penalises attention linearly with distance."""

    def __init__(self, config, options):
        super().__init__(config, options)
        self.register_buffer("slopes", self.head_slopes(config.n_head), persistent=False)  # [H]

    @staticmethod
    def head_slopes(n_head: int) -> torch.Tensor:
        """The paper's geometric slopes; for a non-power-of-two n_head, interleave the next power's."""
        def powers(n):
            start = 2 ** (-8 / n)
            return [start ** (i + 1) for i in range(n)]

        closest = 2 ** math.floor(math.log2(n_head))
        slopes = powers(closest) + powers(2 * closest)[0::2][: n_head - closest]
        return torch.tensor(slopes, dtype=torch.float32)

    def score_bias(self, q_index, k_index):
        distance = (q_index[:, None] - k_index[None, :]).float()  # [T, S], >= 0 where attended
        return -self.slopes[:, None, None] * distance  # [H, T, S]


class NoPositions(PositionalEncoding):
    """No positional signal at all (NoPE): causal masking alone tells tokens apart."""


@gptx.hookimpl(trylast=True)
def register_positional(register):
    register("learned", LearnedPositions)
    register("sinusoidal", SinusoidalPositions)
    register("rope", RotaryPositions)
    register("alibi", AlibiPositions)
    register("none", NoPositions)
