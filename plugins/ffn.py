"""Feed-forward networks: GPT-2's GELU MLP, GPT-Lite's ReLU MLP, squared ReLU, the gated
SwiGLU/GEGLU, and a mixture of experts (``gptx.plugins.moe``)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import FeedForward


@dataclasses.dataclass(frozen=True)
class MLPOptions:
    hidden: Optional[int] = None  # hidden width; None: 4 * n_embd

    def __post_init__(self):
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(("hidden", f"must be at least 1, got {self.hidden}"))


@dataclasses.dataclass(frozen=True)
class GeluOptions(MLPOptions):
    approximate: str = "tanh"  # "tanh": GPT-2's GELU; "none": the exact erf GELU (nanoGPT's nn.GELU, faster on CPU: docs/performance.md)

    def __post_init__(self):
        super().__post_init__()
        if self.approximate not in ("tanh", "none"):
            raise ValueError(("approximate", f"must be 'tanh' or 'none', got {self.approximate!r}"))


class GeluMLP(FeedForward):
    """GPT-2: Linear(C, 4C) -> GELU (tanh approximation; ``approximate = "none"``: exact) -> Linear(4C, C)."""

    Options = GeluOptions

    def __init__(self, config, options: MLPOptions):
        super().__init__(config, options)
        hidden = options.hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def activation(self, x):
        return F.gelu(x, approximate=getattr(self.options, "approximate", "tanh"))

    def forward(self, x):
        h = self.activation(self.c_fc(x))  # [B, T, hidden]
        return self.dropout(self.c_proj(h))  # [B, T, C]


class ReluMLP(GeluMLP):
    """GPT-Lite: the same two layers with ReLU."""

    Options = MLPOptions
    activation = staticmethod(F.relu)


class Relu2MLP(GeluMLP):
    """Primer's squared ReLU (So et al. 2021), as in the modded-nanogpt speedrun: relu(x) ** 2."""

    Options = MLPOptions

    @staticmethod
    def activation(x):
        return F.relu(x).square()


@dataclasses.dataclass(frozen=True)
class GatedOptions:
    hidden: Optional[int] = None  # hidden width; None: 8/3 * n_embd rounded up to a multiple of 64 (same parameters as 4C)

    def __post_init__(self):
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(("hidden", f"must be at least 1, got {self.hidden}"))


class SwiGLU(FeedForward):
    """Shazeer's gated unit: c_proj(act(gate(x)) * up(x)), act = SiLU."""

    Options = GatedOptions
    activation = staticmethod(F.silu)

    def __init__(self, config, options: GatedOptions):
        super().__init__(config, options)
        hidden = options.hidden or -(-8 * config.n_embd // 3 // 64) * 64
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and up in one matmul
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # [B, T, hidden] x2
        return self.dropout(self.c_proj(self.activation(gate) * up))  # [B, T, C]


class GeGLU(SwiGLU):
    """The gated unit with GELU."""

    activation = staticmethod(F.gelu)


@gptx.hookimpl(trylast=True)
def register_ffn(register):
    register("gelu", GeluMLP)
    register("relu", ReluMLP)
    register("relu2", Relu2MLP)
    register("swiglu", SwiGLU)
    register("geglu", GeGLU)
