"""The one table of component kinds. Everything that lists kinds iterates ``KINDS``: the hook
specs, the registry, the config loader, ``gptx components``, checkpoints, MLflow params and
tags, the export's capability check and ``gptx check-plugin``. A new kind is one entry here, its
interface class in ``gptx.components`` and a built-in plugin module in ``gptx.plugins`` (found by
name); tests/test_new_kind.py proves it. Torch-free (``gptx --help`` reads it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str  # "attention"; the hook is register_<name>
    interface: str  # the class in gptx.components every registered class must subclass
    table: Optional[str]  # where it is chosen: the dotted config table holding `kind` + its options;
    #                       None: chosen by name in another component's options (norm placements)
    default: str  # the built-in used when the table names no kind
    checked_with: str  # what its classmethod `check` receives next to its options: "model" or "training"
    doc: str  # one line: what the kind is

    @property
    def hook(self) -> str:
        return f"register_{self.name}"

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.table.split(".")) if self.table else ()


KINDS: tuple[Kind, ...] = (
    Kind("attention", "Attention", "model.attention", "causal", "model",
         "self-attention with a declared cache"),
    Kind("positional", "PositionalEncoding", "model.positional", "learned", "model",
         "where position enters: embeddings, rotated queries/keys or score biases"),
    Kind("ffn", "FeedForward", "model.ffn", "gelu", "model",
         "the position-wise network of a block"),
    Kind("norm", "Norm", "model.norm", "layernorm", "model",
         "the normalisation layer"),
    Kind("block", "Block", "model.block", "sequential", "model",
         "how one layer wires attention, FFN and norms around the residual stream"),
    Kind("norm_placement", "NormPlacement", None, "pre", "model",
         "where norms sit around a residual branch (the sequential block's `placement` option)"),
    Kind("tokenizer", "Tokenizer", "tokenizer", "gpt2", "model",
         "text <-> token ids"),
    Kind("dataset", "Dataset", "data", "text", "model",
         "training and validation token windows"),
    Kind("optimizer", "Optimizer", "training.optimizer", "adamw", "training",
         "builds the torch optimizer(s) from the model's parameters"),
    Kind("schedule", "Schedule", "training.schedule", "cosine", "training",
         "the learning-rate multiplier per step"),
)

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}
