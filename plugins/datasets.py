"""Datasets: where training and evaluation batches come from.

``text``   a UTF-8 file or a directory of .txt files, tokenized on first use (streaming, in
           parallel, with progress) into a cached shard; the last ``val_fraction`` of the tokens
           validate (nanoGPT's split).
``tokens`` a directory of shards written by ``gptx prepare`` (llm.c's format), memory-mapped,
           for corpora far beyond memory.

Windows: a window is ``block_size + 1`` consecutive tokens of one array (a shard, or the text's
split); a random window is uniform over every such position of the split, i.e. a shard is drawn
with probability proportional to its number of window positions. Windows never cross a shard
boundary: shards are separate streams (a jsonl document boundary is an end-of-text token anyway).
With one array this is ``torch.randint(len - block_size)``, exactly what gptx always drew.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import gptx
from gptx.components import Dataset
from gptx.errors import ConfigError, GptxError
from gptx.options import option

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs [N, T], next-token targets [N, T], int64
SPLIT_NAMES = {"train": "training", "val": "validation"}


class TokenSplit:
    """One split as a list of token arrays; windows lie inside one array."""

    def __init__(self, arrays: list[np.ndarray], names: list[str], block_size: int):
        self.arrays, self.names, self.T = arrays, names, block_size
        self.positions = np.array([max(0, len(a) - block_size) for a in arrays], dtype=np.int64)  # window starts per array
        self.first = np.concatenate([[0], np.cumsum(self.positions)])  # [A + 1]

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)

    @property
    def longest(self) -> int:
        return max(len(a) for a in self.arrays)

    def draw(self, count: int, generator: torch.Generator) -> np.ndarray:
        """``count`` window positions, uniform over all of them: [count] int64."""
        return torch.randint(int(self.first[-1]), (count,), generator=generator).numpy()

    def gather(self, positions: np.ndarray) -> Batch:
        """Windows at global ``positions`` [N]: inputs and targets [N, T] int64."""
        which = np.searchsorted(self.first, positions, side="right") - 1  # [N] array index
        offsets = positions - self.first[which]  # [N] start inside that array
        return self._rows(which, offsets)

    def tiles(self, max_tokens: int) -> Batch:
        """Non-overlapping windows from the start of each array; over ``max_tokens``, that many
        tokens' worth of them, evenly spaced."""
        T = self.T
        counts = [(len(a) - 1) // T for a in self.arrays]  # every window needs its next-token target
        which = np.repeat(np.arange(len(self.arrays)), counts)  # [N]
        offsets = np.concatenate([np.arange(n) * T for n in counts])  # [N]
        n = len(which)
        if n * T > max_tokens:
            keep = np.linspace(0, n - 1, max(1, max_tokens // T)).round().astype(np.int64)
            which, offsets = which[keep], offsets[keep]
        return self._rows(which, offsets)

    def _rows(self, which: np.ndarray, offsets: np.ndarray) -> Batch:
        span = np.arange(self.T + 1)
        rows = np.empty((len(which), self.T + 1), dtype=np.int64)  # [N, T+1]
        for a in np.unique(which):
            sel = which == a
            rows[sel] = self.arrays[a][offsets[sel, None] + span]  # [n, T+1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class TokenArrayDataset(Dataset):
    """What both built-in datasets share once ``prepare()`` has set ``self.splits``."""

    def __init__(self, options, **kwargs):
        super().__init__(options, **kwargs)
        self.splits: dict[str, TokenSplit] = {}
        self.generator = torch.Generator().manual_seed(self.seed)

    def check_splits(self, key: str, split_option: str = "val_fraction") -> None:
        """Every split must hold at least one window (block_size + 1 tokens in one array); the
        message blames ``key`` and suggests another ``split_option`` (the option that splits)."""
        for split, data in self.splits.items():
            if data.longest <= self.block_size:
                where = "its longest shard has" if len(data.arrays) > 1 else "has"
                raise ConfigError(
                    f"the {SPLIT_NAMES[split]} split {where} {data.longest} tokens, fewer than block_size + 1 = "
                    f"{self.block_size + 1}; use more data, a smaller model.block_size or another {split_option}", key)

    def batch(self, count, rows=None):
        positions = self.splits["train"].draw(count, self.generator)  # [count], the same on every rank
        if rows is not None:  # this rank's rows: a slice or indices into the global batch
            positions = positions[rows if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)]
        return self.splits["train"].gather(positions)

    def windows(self, split, count, generator):
        return self.splits[split].gather(self.splits[split].draw(count, generator))

    def tiled_windows(self, split, max_tokens):
        return self.splits[split].tiles(max_tokens)

    def tokens(self, split):
        return len(self.splits[split])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ---- text ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextOptions:
    path: str = dataclasses.field(default="data/tinyshakespeare.txt", metadata={"path": True})  # a text file or a directory of .txt files, relative to the experiment file
    val_fraction: float = option(0.1, low=0, high=1, low_open=True, high_open=True)  # the last fraction of the tokens is the validation split


class TextDataset(TokenArrayDataset):
    """A text file (or directory of .txt files), tokenized once per tokenizer into the cache."""

    Options = TextOptions

    def prepare(self):
        from gptx.data import cached_tokens
        from gptx.prepare import Source, fit

        try:
            source = Source(self.base_dir / Path(self.options.path).expanduser())
            if self.tokenizer.requires_fit and not self.tokenizer.state():
                fit(self.tokenizer, source, self.progress)
            ids = cached_tokens(source, self.tokenizer, self.progress)
        except GptxError as err:
            raise ConfigError(str(err), "data.path") from None
        # nanoGPT's prepare.py split: the first int(n * (1 - val_fraction)) tokens train, so the
        # same seed draws the same windows in both tools (tests/test_nanogpt_parity.py)
        n_train = int(len(ids) * (1.0 - self.options.val_fraction))
        self.train, self.val = ids[:n_train], ids[n_train:]
        self.splits = {"train": TokenSplit([self.train], [str(source.path)], self.block_size),
                       "val": TokenSplit([self.val], [str(source.path)], self.block_size)}
        self.check_splits("data.path")


# ---- tokens ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokensOptions:
    path: str = dataclasses.field(default="data/tokens", metadata={"path": True})  # a directory written by gptx prepare, relative to the experiment file
    verify: Literal["size", "sha256"] = "size"  # check each shard's header and size, or also its sha256 (reads all)


class TokensDataset(TokenArrayDataset):
    """Shards written by ``gptx prepare``, memory-mapped; the split is the one prepare made."""

    Options = TokensOptions

    def prepare(self):
        from gptx import shards

        directory = self.base_dir / Path(self.options.path).expanduser()
        try:
            meta = shards.read_manifest(directory)
            self.tokenizer = self._matching_tokenizer(meta, directory / shards.MANIFEST)
            self.splits = {}
            for split in shards.SPLITS:
                arrays, paths = shards.open_split(directory, meta, split, self.options.verify)
                self.splits[split] = TokenSplit(arrays, [str(p) for p in paths], self.block_size)
        except GptxError as err:
            raise ConfigError(str(err), "data.path") from None
        self.check_splits("data.path")

    def _matching_tokenizer(self, meta: dict, manifest: Path):
        """The experiment's tokenizer, if it is the one the shards were made with; one that learns
        from data and is not fitted yet takes the manifest's learned state."""
        from gptx.schemas import tokenizer_state
        from gptx.shards import options_dict

        made, tok = meta["tokenizer"], self.tokenizer
        cls = type(tok)
        ours = {"class": f"{cls.__module__}:{cls.__qualname__}", "options": options_dict(tok.options)}
        if ours != {"class": made["class"], "options": made["options"]} or (tok.state() and tok.state() != made["state"]):
            learned = " and another learned vocabulary" if ours["class"] == made["class"] else ""
            raise GptxError(f"{manifest}: the shards were made with tokenizer '{made['kind']}' ({made['class']}, options "
                            f"{made['options']}){learned}; the experiment's is {ours['class']} with options {ours['options']}; "
                            f"set [tokenizer] to match or prepare the data again with its tokenizer")
        state = tokenizer_state(cls, made["state"], manifest, "tokenizer.state")
        if tok.requires_fit and not tok.state():
            tok = cls(tok.options, state)
        if meta.get("vocab_size") not in (None, tok.vocab_size):  # e.g. a char vocabulary shortened by hand
            raise GptxError(f"{manifest}: vocab_size: {meta['vocab_size']}, but its tokenizer has {tok.vocab_size} tokens")
        if meta["max_token_id"] >= tok.vocab_size:
            raise GptxError(f"{manifest}: token id {meta['max_token_id']} is beyond the tokenizer's vocabulary of {tok.vocab_size}")
        return tok

    def _check_ids(self, batch: Batch) -> Batch:
        x, y = batch
        top = max(int(x.max()), int(y.max())) if len(x) else 0
        if top >= self.tokenizer.vocab_size:  # a shard altered after its manifest was written
            raise GptxError(f"{self.options.path}: a shard holds token id {top}, beyond the vocabulary "
                            f"of {self.tokenizer.vocab_size}; prepare the data again")
        return x, y

    def batch(self, count, rows=None):
        return self._check_ids(super().batch(count, rows))

    def windows(self, split, count, generator):
        return self._check_ids(super().windows(split, count, generator))

    def tiled_windows(self, split, max_tokens):
        return self._check_ids(super().tiled_windows(split, max_tokens))


@gptx.hookimpl(trylast=True)
def register_dataset(register):
    register("text", TextDataset)
    register("tokens", TokensDataset)
