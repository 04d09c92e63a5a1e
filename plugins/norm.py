"""Normalisation: the layer (LayerNorm, RMSNorm) and where it sits around each residual branch
(pre-norm as GPT-2, post-norm as the original Transformer and GPT-Lite, sandwich)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

import gptx
from gptx.components import Norm, NormPlacement
from gptx.options import option


@dataclasses.dataclass(frozen=True)
class NormOptions:
    eps: float = option(1e-5, low=0, high=1, low_open=True)
    bias: bool = True  # LayerNorm only: a learned shift, as GPT-2

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(("eps", f"must be positive, got {self.eps}"))


class LayerNorm(Norm):
    Options = NormOptions

    def __init__(self, dim, options: NormOptions):
        super().__init__(dim, options)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if options.bias else None

    def forward(self, x):
        return nn.functional.layer_norm(x, (self.dim,), self.weight, self.bias, self.options.eps)  # [..., C]


class RMSNorm(Norm):
    Options = NormOptions

    def __init__(self, dim, options: NormOptions):
        super().__init__(dim, options)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return nn.functional.rms_norm(x, (self.dim,), self.weight, self.options.eps)  # [..., C]


class PreNorm(NormPlacement):
    """GPT-2: x + branch(norm(x)); the model adds a final norm."""

    def __init__(self, make_norm, options):
        super().__init__(make_norm, options)
        self.norm = make_norm()

    def forward(self, x, branch):
        return x + branch(self.norm(x))  # [B, T, C]


class PostNorm(NormPlacement):
    """Original Transformer / GPT-Lite: norm(x + branch(x)); the stream leaves each block normalised."""

    final_norm = False

    def __init__(self, make_norm, options):
        super().__init__(make_norm, options)
        self.norm = make_norm()

    def forward(self, x, branch):
        return self.norm(x + branch(x))  # [B, T, C]


class SandwichNorm(NormPlacement):
    """x + norm_out(branch(norm_in(x))): pre-norm plus a norm on the branch output (CogView, Gemma)."""

    def __init__(self, make_norm, options):
        super().__init__(make_norm, options)
        self.norm_in, self.norm_out = make_norm(), make_norm()

    def forward(self, x, branch):
        return x + self.norm_out(branch(self.norm_in(x)))  # [B, T, C]


@gptx.hookimpl(trylast=True)
def register_norm(register):
    register("layernorm", LayerNorm)
    register("rmsnorm", RMSNorm)


@gptx.hookimpl(trylast=True)
def register_norm_placement(register):
    register("pre", PreNorm)
    register("post", PostNorm)
    register("sandwich", SandwichNorm)
