"""The model side of gptx, extended from outside, through its hooks only:

- block ``rezero``: ReZero (Bachlechner et al. 2021, "ReZero is all you need"): no norms at all,
  each branch scaled by a learned scalar that starts at 0, so every layer starts as the identity.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

import gptx
from gptx.components import Aux, Block, split_aux


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
        (y, present), attn_aux = split_aux(self.attn(x, positions, positional, past, attention_mask), 2)  # [B, T, C]
        x = x + self.gates[0] * y  # [B, T, C]
        (m,), ffn_aux = split_aux(self.mlp(x), 1)  # [B, T, C]
        return x + self.gates[1] * m, present, Aux.merged(attn=attn_aux, ffn=ffn_aux)


@gptx.hookimpl
def register_block(register):
    register("rezero", ReZeroBlock)
