"""Datasets: ``text`` (a text file or a directory of .txt files, tokenized once and cached)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

import gptx
from gptx import data
from gptx.components import Dataset


@dataclasses.dataclass(frozen=True)
class TextOptions:
    path: str = dataclasses.field(default="data/tinyshakespeare.txt", metadata={"path": True})  # a file or a directory of .txt files, relative to the experiment file
    val_fraction: float = 0.1  # the last fraction of the tokens is the validation split

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(("val_fraction", f"must be between 0 and 1, got {self.val_fraction}"))


class TextDataset(Dataset):
    """UTF-8 text, tokenized once (cached by content and tokenizer), split nanoGPT's way: the
    first (1 - val_fraction) of the tokens train, the rest validate."""

    Options = TextOptions

    def prepare(self):
        text = data.read_text(self.base_dir / self.options.path)
        if self.tokenizer.requires_fit and not self.tokenizer.state():
            self.tokenizer.fit(text)
        tokens = data.tokenize_cached(text, self.tokenizer)
        self.splits = data.Splits(tokens, self.options.val_fraction, self.block_size)
        self.generator = torch.Generator().manual_seed(self.seed)

    def tokens(self, split):
        return len(self.splits.train if split == "train" else self.splits.val)

    def batch(self, count: int, rows: Optional[Sequence[int]] = None):
        x, y = self.splits.windows("train", count, self.generator)  # [count, T] x2
        return (x, y) if rows is None else (x[list(rows)], y[list(rows)])

    def windows(self, split, count, generator):
        return self.splits.windows(split, count, generator)

    def tiled_windows(self, split, max_tokens):
        return self.splits.tiled_windows(split, max_tokens)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@gptx.hookimpl(trylast=True)
def register_dataset(register):
    register("text", TextDataset)
