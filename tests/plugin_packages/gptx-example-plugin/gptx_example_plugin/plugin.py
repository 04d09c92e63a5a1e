"""Two components and a command, registered through gptx's hooks.

- ffn ``squared_relu``: Primer's (So et al. 2021) MLP, ``c_proj(relu(c_fc(x)) ** 2)``.
- positional ``relative_bias``: a learned per-head bias on attention scores for each distance
  up to ``max_distance`` (T5-style, without buckets). It declares KV_CACHE only, so ONNX export
  refuses it with a clear message instead of producing something unverified.
- command ``gptx example-info``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import click
import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import KV_CACHE, FeedForward, PositionalEncoding


@dataclasses.dataclass(frozen=True)
class SquaredReluOptions:
    hidden: Optional[int] = None  # hidden width; None: 4 * n_embd

    def __post_init__(self):
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(("hidden", f"must be at least 1, got {self.hidden}"))


class SquaredReluMLP(FeedForward):
    """Linear(C, hidden) -> relu(.)^2 -> Linear(hidden, C)."""

    Options = SquaredReluOptions

    def __init__(self, config, options: SquaredReluOptions):
        super().__init__(config, options)
        hidden = options.hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)  # c_proj: GPT-2's scaled init

    def forward(self, x):  # [B, T, C]
        return self.c_proj(F.relu(self.c_fc(x)).square())  # [B, T, C]


@dataclasses.dataclass(frozen=True)
class RelativeBiasOptions:
    max_distance: Optional[int] = None  # distances from this one on share one bias; None: block_size

    def __post_init__(self):
        if self.max_distance is not None and self.max_distance < 1:
            raise ValueError(("max_distance", f"must be at least 1, got {self.max_distance}"))


class RelativeBias(PositionalEncoding):
    """A learned bias per head and key distance, added to the attention scores."""

    Options = RelativeBiasOptions
    supports = frozenset({KV_CACHE})  # not checked against the ONNX contract: export refuses it

    @classmethod
    def check(cls, model, options):
        if options.max_distance is not None and options.max_distance > model.block_size:
            raise ValueError(("positional.max_distance", f"{options.max_distance} exceeds block_size = {model.block_size}"))

    def __init__(self, config, options: RelativeBiasOptions):
        super().__init__(config, options)
        self.max_distance = options.max_distance or config.block_size
        self.bias = nn.Embedding(self.max_distance, config.n_head)

    def score_bias(self, q_index, k_index):  # [T], [S] slots
        distance = (q_index[:, None] - k_index[None, :]).clamp(0, self.max_distance - 1)  # [T, S]
        return self.bias(distance).permute(2, 0, 1)  # [H, T, S]


@gptx.hookimpl
def register_ffn(register):
    register("squared_relu", SquaredReluMLP)


@gptx.hookimpl
def register_positional(register):
    register("relative_bias", RelativeBias)


@gptx.hookimpl
def register_commands(cli):
    @cli.command(name="example-info")
    def example_info():
        """Say hello from the example plugin."""
        click.echo("gptx-example-plugin: squared_relu (ffn), relative_bias (positional)")
