"""Two components and a command, registered through gptx's hooks.

- ffn ``squared_relu``: Primer's (So et al. 2021) MLP, ``c_proj(relu(c_fc(x)) ** 2)``.
- positional ``relative_bias``: a learned per-head bias on attention scores for each distance
  up to ``max_distance`` (T5-style, without buckets). It declares KV_CACHE only, so ONNX export
  refuses it with a clear message instead of producing something unverified.
- norm ``scalenorm``: ScaleNorm (Nguyen & Salazar 2019), ``g * x / ||x||`` with one learned scalar.
- norm placement ``final_only``: no norm around the branches (``x + branch(x)``), only the final
  norm before the LM head: an ablation of per-block normalisation.
- tokenizer ``words``: words, spaces and punctuation as tokens, vocabulary learned from the
  training text (``requires_fit``) and saved with checkpoints through ``state()``.
- command ``gptx example-info``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import click
import torch
import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import KV_CACHE, FeedForward, Norm, NormPlacement, PositionalEncoding, Tokenizer
from gptx.errors import GptxError


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


@dataclasses.dataclass(frozen=True)
class ScaleNormOptions:
    eps: float = 1e-5

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(("eps", f"must be positive, got {self.eps}"))


class ScaleNorm(Norm):
    """g * x / max(||x||, eps) over the last dimension, g one learned scalar (init sqrt(C))."""

    Options = ScaleNormOptions

    def __init__(self, dim, options: ScaleNormOptions):
        super().__init__(dim, options)
        self.g = nn.Parameter(torch.tensor(math.sqrt(dim)))

    def forward(self, x):  # [..., C]
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp(min=self.options.eps)  # [..., C]


class FinalOnly(NormPlacement):
    """x + branch(x): no norm in the blocks; the model keeps its final norm (final_norm = True)."""

    final_norm = True

    def forward(self, x, branch):  # [B, T, C]
        return x + branch(x)  # [B, T, C]


class WordTokenizer(Tokenizer):
    """Runs of letters/digits, runs of whitespace and single other characters are tokens.
    Id 0 is <unk> (text outside the learned vocabulary)."""

    requires_fit = True
    PATTERN = re.compile(r"\w+|\s+|[^\w\s]")

    def __init__(self, options, state=None):
        super().__init__(options, state)
        self.words = list((state or {}).get("words", []))
        self.index = {w: i + 1 for i, w in enumerate(self.words)}

    def fit(self, text):
        self.words = sorted(set(self.PATTERN.findall(text)))
        self.index = {w: i + 1 for i, w in enumerate(self.words)}

    def state(self):
        return {"words": self.words} if self.words else {}  # {} until fitted: gptx then calls fit()

    @property
    def vocab_size(self):
        if not self.words:
            raise GptxError("the words tokenizer has no vocabulary yet: it is learned from the training data")
        return len(self.words) + 1

    def encode(self, text):
        return [self.index.get(w, 0) for w in self.PATTERN.findall(text)]

    def decode(self, ids):
        return "".join(self.words[i - 1] if i > 0 else "\ufffd" for i in ids)


@gptx.hookimpl
def register_norm(register):
    register("scalenorm", ScaleNorm)


@gptx.hookimpl
def register_norm_placement(register):
    register("final_only", FinalOnly)


@gptx.hookimpl
def register_tokenizer(register):
    register("words", WordTokenizer)


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
        click.echo("gptx-example-plugin: squared_relu (ffn), relative_bias (positional), scalenorm (norm), "
                   "final_only (norm placement), words (tokenizer)")
