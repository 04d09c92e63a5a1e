"""Blocks: how one layer wires attention, the feed-forward network and norms around the residual
stream. ``sequential`` is GPT-2's layer (attention, then FFN, each wrapped by a norm placement);
``parallel`` is GPT-J's and PaLM's (both branches read one normalised input)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch

import gptx
from gptx.components import AttentionOutput, Aux, Block, BlockOutput, FeedForwardOutput


class Captured:
    """A placement's branch: calls a component on [B, T, C], hands the placement its y [B, T, C]
    and keeps the whole typed output (an attention's present, anyone's Aux) for the block."""

    def __init__(self, call: Callable[[torch.Tensor], Union[AttentionOutput, FeedForwardOutput]]):
        self.call = call
        self.out: Optional[Union[AttentionOutput, FeedForwardOutput]] = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C]
        self.out = self.call(h)
        return self.out.y


@dataclasses.dataclass(frozen=True)
class SequentialOptions:
    # where the norms sit around each branch: pre (GPT-2), post (original Transformer), sandwich, or a plugin's
    placement: str = dataclasses.field(default="pre", metadata={"kind": "norm_placement"})


class SequentialBlock(Block):
    """GPT-2's layer: x = placement(x, attention); x = placement(x, ffn)."""

    Options = SequentialOptions

    def __init__(self, config, options: SequentialOptions, layer: int):
        super().__init__(config, options, layer)
        placement = config.block.refs["placement"].cls  # the NormPlacement class the option names
        self.attn = self.make_attention()
        self.mlp = self.make_ffn()
        self.attn_norm = placement(self.make_norm, None)  # owns the norm(s) around attention
        self.mlp_norm = placement(self.make_norm, None)  # owns the norm(s) around the MLP
        self.final_norm = placement.final_norm

    def forward(self, x, positions, positional, past, attention_mask):
        attention = Captured(
            lambda h: AttentionOutput.of(self.attn(h, positions, positional, past, attention_mask), self.attn))
        ffn = Captured(lambda h: FeedForwardOutput.of(self.mlp(h), self.mlp))
        x = self.attn_norm(x, attention)  # [B, T, C]
        x = self.mlp_norm(x, ffn)  # [B, T, C]
        return BlockOutput(x, attention.out.present, Aux.merged(attn=attention.out.aux, ffn=ffn.out.aux))


class ParallelBlock(Block):
    """GPT-J / PaLM (Chowdhery et al. 2022, sec. 2): x + attn(norm(x)) + ffn(norm(x)), one shared
    pre-norm; the model adds a final norm."""

    def __init__(self, config, options, layer: int):
        super().__init__(config, options, layer)
        self.attn = self.make_attention()
        self.mlp = self.make_ffn()
        self.norm = self.make_norm()

    def forward(self, x, positions, positional, past, attention_mask):
        h = self.norm(x)  # [B, T, C]
        a = AttentionOutput.of(self.attn(h, positions, positional, past, attention_mask), self.attn)  # y [B, T, C]
        m = FeedForwardOutput.of(self.mlp(h), self.mlp)  # y [B, T, C]
        return BlockOutput(x + a.y + m.y, a.present, Aux.merged(attn=a.aux, ffn=m.aux))  # x [B, T, C]


@gptx.hookimpl(trylast=True)
def register_block(register):
    register("sequential", SequentialBlock)
    register("parallel", ParallelBlock)
