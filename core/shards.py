"""Token shards (llm.c's format) and the manifest of a prepared directory. Torch-free.

A shard is a 256 x int32 little-endian header, then the tokens:

    header[0]  magic    20240520 (uint16 tokens) or 20240801 (uint32 tokens, llm.c's header for
                        vocabularies beyond 65,536 ids)
    header[1]  version  1 (uint16) or 7 (uint32), as llm.c writes them
    header[2]  the number of tokens that follow; the rest of the header is zero

A prepared directory (``gptx prepare``) holds ``train_NNNNNN.bin`` and ``val_NNNNNN.bin``
shards and ``gptx_data.json``, the manifest, written last: format, tokenizer (name, class,
options, state, sha256), token dtype, counts per split and per shard, each shard's size and
sha256, the largest token id.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from gptx.errors import GptxError, read_format_json
from gptx.fsutil import open_regular
from gptx.schemas import ShardManifest, validate

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HEADERS = {"uint16": (20240520, 1), "uint32": (20240801, 7)}  # token dtype -> (magic, version)
MAX_SHARD_TOKENS = 2**31 - 1  # the header's count is an int32

MANIFEST = "gptx_data.json"
FORMAT = "gptx.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (GPT-2's 50,257), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Appends tokens to a shard at a temporary name; ``close()`` writes the count into the
    header and renames the file into place, so a shard under its final name is always whole."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = Path(path), np.dtype(dtype).newbyteorder("<")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.file.write(bytes(HEADER_BYTES))  # the header, filled in by close()
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        if self.count + len(ids) > MAX_SHARD_TOKENS:
            raise GptxError(f"{self.path}: more than {MAX_SHARD_TOKENS:,} tokens do not fit one shard")
        self.file.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.count += len(ids)

    def close(self) -> Path:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (*HEADERS[self.dtype.name], self.count)
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def copy_tokens(source: Path, first: int, count: int, path: Path, block: int = 1 << 22) -> Path:
    """A new shard at ``path`` holding ``count`` tokens of shard ``source`` from ``first`` on,
    copied a block at a time (memory stays small whatever the shard's size)."""
    dtype = open_shard(source).dtype
    writer = ShardWriter(path, dtype.name)
    try:
        for i in range(first, first + count, block):
            n = min(block, first + count - i)
            writer.write(np.fromfile(source, dtype=dtype, count=n, offset=HEADER_BYTES + i * dtype.itemsize))
        return writer.close()
    except BaseException:
        writer.discard()
        raise


def open_shard(path: Path) -> np.memmap:
    """The tokens of a shard, memory-mapped read-only. A file that is not a whole shard (too short
    for its header, another magic or version, a size that disagrees with the count) is a GptxError."""
    path = Path(path)
    try:
        with open_regular(path) as f:  # np.fromfile on a FIFO would wait forever
            size = os.fstat(f.fileno()).st_size
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as err:
        raise GptxError(f"{path}: cannot read ({err.strerror or err})") from None
    if size < HEADER_BYTES:
        raise GptxError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, count = (int(v) for v in header[:3])
    dtype = next((name for name, mv in HEADERS.items() if mv == (magic, version)), None)
    if dtype is None:
        known = ", ".join(f"{m}/{v}" for m, v in HEADERS.values())
        raise GptxError(f"{path}: not a token shard (magic/version {magic}/{version}; expected one of {known})")
    itemsize = np.dtype(dtype).itemsize
    if count < 1 or size != HEADER_BYTES + count * itemsize:
        held = (size - HEADER_BYTES) / itemsize
        raise GptxError(f"{path}: its header says {count} tokens but the file holds {held:g} (truncated or altered)")
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---- the manifest ----------------------------------------------------------------------------

def write_manifest(directory: Path, manifest: dict) -> Path:
    """Write gptx_data.json atomically (temporary name, fsync, rename)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path) -> dict:
    """A prepared directory's manifest, validated whole (gptx.schemas.ShardManifest); a missing,
    corrupted, foreign or inconsistent one is a GptxError naming the file and the key."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise GptxError(f"{directory}: no such directory of prepared shards" if not directory.exists()
                        else f"{directory}: is a file, expected a directory written by gptx prepare")
    if not os.path.lexists(path):  # one that is there but not a file: read_format_json says what it is
        raise GptxError(f"{directory}: not a prepared data directory (no {MANIFEST}; write one with gptx prepare)")
    meta = read_format_json(path, FORMAT, FORMAT_VERSION, "prepared data directory")
    validate(ShardManifest, meta, path)  # the whole file: every shard record, counts, the tokenizer record
    return meta


def shard_record(path: Path, tokens: int) -> dict:
    return {"file": path.name, "tokens": int(tokens), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def open_split(directory: Path, meta: dict, split: str, verify: str = "size") -> tuple[list[np.memmap], list[Path]]:
    """Memory-map a split's shards, each checked against the manifest (format, token count, file
    size and no id above its max_token_id; with ``verify="sha256"`` also the contents' hash)."""
    arrays, paths = [], []
    for s in meta["shards"][split]:
        path = Path(directory) / s["file"]
        if not path.is_file():
            raise GptxError(f"{path}: missing (listed in {MANIFEST})")
        tokens = open_shard(path)
        if len(tokens) != s["tokens"] or tokens.dtype.name != meta["dtype"]:
            raise GptxError(f"{path}: holds {len(tokens)} {tokens.dtype.name} tokens, {MANIFEST} says "
                            f"{s['tokens']} {meta['dtype']} (altered or from another prepare)")
        if verify == "sha256" and file_sha256(path) != s.get("sha256"):
            raise GptxError(f"{path}: sha256 does not match {MANIFEST} (altered or damaged)")
        top = int(tokens.max())  # one pass at memory speed, here, before a run folder exists
        if top > meta["max_token_id"]:
            raise GptxError(f"{path}: holds token id {top}, above the max_token_id {meta['max_token_id']} "
                            f"{MANIFEST} declares (altered or from another prepare); prepare the data again")
        arrays.append(tokens)
        paths.append(path)
    return arrays, paths


def tokenizer_record(kind: Optional[str], tokenizer) -> dict:
    """What identifies a tokenizer in a manifest: registered name, class, options, learned state
    and their sha256 (the same hash an ONNX export records)."""
    from gptx.export import tokenizer_hash

    options = options_dict(tokenizer.options)
    state = tokenizer.state()
    cls = type(tokenizer)
    return {"kind": kind, "class": f"{cls.__module__}:{cls.__qualname__}", "options": options, "state": state,
            "sha256": tokenizer_hash(kind, options, state)}


def options_dict(options) -> dict:
    from gptx.options import to_dict

    return {} if options is None else to_dict(options)
