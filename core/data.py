"""Training data: text tokenized once into a cached token array, split into train/val, served
as random contiguous windows that are deterministic given the seed.

The cache lives in ``$GPTX_CACHE_DIR`` (default ``~/.cache/gptx``)/tokens, keyed by the sha256
of the text and the tokenizer's identity (name, options, learned state), stored as raw uint16
when the vocabulary fits (else uint32) and memory-mapped on use.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gptx.errors import ConfigError
from gptx.paths import cache_root


CACHE_FORMAT = "gptx-tokens-2"  # part of every cache key: bump when tokenization changes


def read_text(path: Path) -> str:
    """The text of a file, or of a directory's .txt files (sorted, joined by blank lines).
    Empty, binary or non-UTF-8 input is a ConfigError on ``data.path``."""
    files = sorted(f for f in path.rglob("*.txt") if f.is_file()) if path.is_dir() else [path]
    parts = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read {f}: {err.strerror}", "data.path") from None
        if b"\x00" in raw[:65536]:
            raise ConfigError(f"{f} looks binary (NUL bytes), expected UTF-8 text", "data.path")
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{f} is not UTF-8 text (invalid byte at offset {err.start})", "data.path") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise ConfigError(f"{path} holds no text", "data.path")
    return text


def split_for_bpe(text: str, lines_per_chunk: int = 2000) -> list[str]:
    """Chunks that encode to exactly the ids of the whole text. Byte-level BPE pre-tokenizes
    whitespace runs greedily ("\n\n" is one token), so a chunk may only end after a single
    newline that follows a non-space character and precede a non-space character."""
    lines = text.splitlines(keepends=True)
    chunks, start, i = [], 0, lines_per_chunk
    while i < len(lines):
        prev, nxt = lines[i - 1], lines[i]
        if prev.endswith("\n") and not prev.endswith(("\r\n", " \n", "\t\n", "\n\n")) and len(prev) > 1 \
                and nxt[:1] and not nxt[:1].isspace():
            chunks.append("".join(lines[start:i]))
            start, i = i, i + lines_per_chunk
        else:
            i += 1
    chunks.append("".join(lines[start:]))
    return chunks


def tokenizer_identity(spec, tokenizer) -> str:
    """What makes two tokenizers produce the same ids: name, options, learned state."""
    return json.dumps({"kind": spec.kind, "options": spec.to_dict(), "state": tokenizer.state()}, sort_keys=True)


def tokenize_cached(text: str, spec, tokenizer) -> np.ndarray:
    """Token ids of ``text`` (uint16/uint32), computed once per (text, tokenizer) and cached."""
    identity = f"{CACHE_FORMAT}\0{tokenizer_identity(spec, tokenizer)}"
    key = hashlib.sha256(text.encode("utf-8") + b"\0" + identity.encode()).hexdigest()[:32]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    root = cache_root() / "tokens"
    path = root / f"{key}.{np.dtype(dtype).name}"
    if path.is_file():
        return np.memmap(path, dtype=dtype, mode="r")
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:  # tiktoken encodes chunks on several threads
        ids = np.fromiter((t for part in encode_batch(split_for_bpe(text)) for t in part), dtype=np.int64)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    tokens = ids.astype(dtype)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=root)
        with os.fdopen(fd, "wb") as f:
            tokens.tofile(f)
        os.replace(tmp, path)  # concurrent writers produce the same bytes; the last rename wins
    except OSError:
        pass  # an unwritable cache only costs re-tokenizing next time
    return tokens


class Dataset:
    """Train and validation token arrays and deterministic random windows over them."""

    def __init__(self, tokens: np.ndarray, val_fraction: float, block_size: int):
        # nanoGPT's prepare.py split: the first int(n * (1 - val_fraction)) tokens train, so the
        # same seed draws the same windows in both tools (tests/test_nanogpt_parity.py)
        n_train = int(len(tokens) * (1.0 - val_fraction))
        self.train, self.val = tokens[:n_train], tokens[n_train:]
        self.block_size = block_size
        for name, split in (("training", self.train), ("validation", self.val)):
            if len(split) <= block_size:
                raise ConfigError(
                    f"the {name} split has {len(split)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                    "use more data, a smaller model.block_size or another data.val_fraction",
                    "data.path",
                )

    def windows(self, split: str, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random windows: inputs [count, block] and next-token targets [count, block] (int64)."""
        data = self.train if split == "train" else self.val
        T = self.block_size
        starts = torch.randint(len(data) - T, (count,), generator=generator).numpy()  # [count]
        rows = np.asarray(data[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # [count, T+1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def tiled_windows(self, split: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-overlapping windows that tile the split from its start (every one when they hold at
        most ``max_tokens`` tokens, else that many, evenly spaced): inputs and targets [N, block]."""
        data = self.val if split == "val" else self.train
        T = self.block_size
        n = (len(data) - 1) // T  # every window needs its next-token target
        starts = np.arange(n) * T
        if n * T > max_tokens:
            starts = starts[np.linspace(0, n - 1, max(1, max_tokens // T)).round().astype(np.int64)]
        rows = np.asarray(data[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # [N, T+1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def load_dataset(cfg, tokenizer, block_size: Optional[int] = None) -> Dataset:
    """Read, fit the tokenizer if it learns from data (on the whole text), tokenize (cached), split."""
    text = read_text(cfg.data_path)
    if tokenizer.requires_fit and not tokenizer.state():
        tokenizer.fit(text)
    tokens = tokenize_cached(text, cfg.tokenizer, tokenizer)
    return Dataset(tokens, cfg.data.val_fraction, block_size or cfg.model.block_size)
