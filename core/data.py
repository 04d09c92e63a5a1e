"""The token cache of the ``text`` dataset: a text is tokenized once per tokenizer, streaming
(``gptx.prepare``), into one shard under ``$GPTX_CACHE_DIR`` (default ``~/.cache/gptx``)/tokens,
named by the sha256 of the text's bytes and the tokenizer's identity (class, options, learned
state), and memory-mapped on every later use. Torch-free (``gptx eval`` on onnxruntime uses it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from gptx import shards
from gptx.errors import GptxError
from gptx.fsutil import cache_root, open_regular
from gptx.prepare import StatusCallback, Source, default_workers, tokenize_to_shard

CACHE_FORMAT = "gptx-tokens-3"  # part of every cache key: bump when tokenization or the file format changes


def tokenizer_identity(tokenizer) -> str:
    """What makes two tokenizers produce the same ids: class, options, learned state."""
    cls = type(tokenizer)
    return json.dumps({"class": f"{cls.__module__}:{cls.__qualname__}", "options": shards.options_dict(tokenizer.options),
                       "state": tokenizer.state()}, sort_keys=True)


def cache_key(source: Source, tokenizer) -> str:
    """sha256 of the format, the tokenizer's identity and the source's bytes (files in order)."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{tokenizer_identity(tokenizer)}\0".encode())
    for f in source.files:
        try:
            with open_regular(f) as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        except OSError as err:
            raise GptxError(f"cannot read {f}: {err.strerror}") from None
        h.update(b"\0")  # a file boundary (text holds no NUL)
    return h.hexdigest()[:32]


def cached_tokens(source: Source, tokenizer, progress: StatusCallback = None, workers: Optional[int] = None) -> np.memmap:
    """The ids of ``source``, memory-mapped: from the cache, or tokenized into it first (one
    process at a time per entry: concurrent runs, e.g. DDP ranks, wait for the first). An
    unwritable cache only costs tokenizing again next time."""
    workers = workers or default_workers(source)
    root = cache_root() / "tokens"
    key = cache_key(source, tokenizer)
    path = root / f"{key}.bin"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{key}.lock", "a")
    except OSError:
        return _uncached(source, tokenizer, progress, workers)
    with lock, _exclusive(lock):
        if path.is_file():
            try:
                return shards.open_shard(path)
            except GptxError:  # damaged (disk trouble, a hand edit): make it again
                path.unlink(missing_ok=True)
        try:
            tokenize_to_shard(source, tokenizer, path, workers, progress)
        except PermissionError:
            return _uncached(source, tokenizer, progress, workers)
        return shards.open_shard(path)


@contextlib.contextmanager
def _exclusive(lock_file):
    """An exclusive lock on an open file while the block runs (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent runs may tokenize twice, each renaming a whole file
        yield
        return
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


def _uncached(source: Source, tokenizer, progress: StatusCallback, workers: int) -> np.memmap:
    """Tokenize into a temporary file that is deleted at once; the memory map keeps it readable."""
    with tempfile.TemporaryDirectory(prefix="gptx-tokens-") as tmp:
        path = tokenize_to_shard(source, tokenizer, Path(tmp) / "tokens.bin", workers, progress)
        return shards.open_shard(path)
