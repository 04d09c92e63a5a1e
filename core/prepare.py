"""Streaming, parallel, exact tokenization: ``gptx prepare`` and the text dataset's token cache.

    source (text file | directory of .txt | .jsonl)  -- read in 1 MiB blocks, validated as read
      -> pieces cut only where the tokenizer's ids cannot change (``safe_cut``)
      -> encoded by N worker processes, a few pieces in flight (memory bounded by the pieces,
         not the corpus), results taken in order
      -> shards (``gptx.shards``) in a temporary directory, renamed into place when whole

Exact: the ids equal ``tokenizer.encode`` of the whole text. Byte-level BPE (GPT-2, tiktoken)
pre-splits text with a regex whose pieces never cross a boundary between a non-space character
and a newline or single space that is followed by another non-space character, and encodes each
piece alone; so the text may be cut there. Character and byte tokenizers may be cut anywhere.
A tokenizer declares this with ``encodes_in_pieces = True``; any other tokenizer gets the whole
text in one piece (exact, but neither bounded nor parallel).

jsonl: one JSON object per line with a ``text`` string; each document is preceded by the
tokenizer's end-of-text token (as llm.c's FineWeb shards), i.e. the ids of
``"<|endoftext|>" + doc1 + "<|endoftext|>" + doc2 ...``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from gptx import shards
from gptx.errors import GptxError, first_line
from gptx.fsutil import (directory_lock, first_missing, open_regular, refuse_foreign_files, refuse_to_replace, refused_write, remove_created_dirs,
                         remove_stale_siblings, replace_dir, temp_sibling, unwritable_ancestor)
from gptx.progress import bar, hms

READ_BYTES = 1 << 20  # bytes read per block
PIECE_CHARS = 1 << 20  # text per encoding task: ~0.1 s of tiktoken
MIN_SHARD_TOKENS = 1025  # one GPT-2 context (1024) plus its next-token target
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shards
MAX_WORKERS = 256
UPDATE_SECONDS = 0.25  # at most this often a status line

Piece = tuple[bool, str]  # (a document starts here: the end-of-text token comes first, its text)
StatusCallback = Optional[Callable[[str], None]]  # shows one status line (a StatusLine); None: quiet


# ---- where the text may be cut ---------------------------------------------------------------

def _safe_at(text: str, j: int) -> bool:
    """Whether the newline or space at ``j`` sits between two non-space characters."""
    return 0 < j < len(text) - 1 and not text[j - 1].isspace() and not text[j + 1].isspace()


def safe_cut(text: str, near: int) -> Optional[int]:
    """An index i (0 < i < len(text)), as close below ``near`` as there is one, else above it,
    where ``encode(text[:i]) + encode(text[i:]) == encode(text)`` for byte-level BPE: just after
    a newline between two non-space characters, else just before such a single space. None if
    the text has no such place."""
    for mark, after in (("\n", 1), (" ", 0)):
        j = min(near, len(text) - 1)
        while (j := text.rfind(mark, 0, j)) > 0:
            if _safe_at(text, j):
                return j + after
    for mark, after in (("\n", 1), (" ", 0)):
        j = near - 1
        while (j := text.find(mark, j + 1)) >= 0:
            if _safe_at(text, j):
                return j + after
    return None


class Chunker:
    """Buffers text and hands out pieces of about ``piece_chars`` cut at safe places
    (``piece_chars`` None: one piece, the whole text)."""

    def __init__(self, piece_chars: Optional[int]):
        self.piece_chars = piece_chars
        self.buffer = ""
        self.wanted = piece_chars  # wait for this much text before looking for a cut again

    def feed(self, text: str) -> Iterator[str]:
        self.buffer += text
        while self.piece_chars is not None and len(self.buffer) >= self.wanted:
            cut = safe_cut(self.buffer, self.piece_chars)
            if cut is None:  # no safe place yet (one huge word): read on, look again at twice the size
                self.wanted = 2 * len(self.buffer)
                return
            piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
            self.wanted = self.piece_chars
            yield piece

    def flush(self) -> Iterator[str]:
        if self.buffer:
            yield self.buffer
        self.buffer, self.wanted = "", self.piece_chars


# ---- sources -----------------------------------------------------------------------------------

class Source:
    """Text to tokenize: a UTF-8 file, a directory of .txt files (sorted, joined by blank lines,
    as ``gptx run`` always read them) or a .jsonl file of documents. Problems (missing, empty,
    binary, not UTF-8, a bad jsonl line) are GptxErrors naming the file, raised as it is read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise GptxError(f"data file not found: {self.path}")
        if self.path.is_dir():
            self.files = sorted(f for f in self.path.rglob("*.txt") if f.is_file())
            if not self.files:
                raise GptxError(f"directory holds no .txt files: {self.path}")
        else:
            open_regular(self.path).close()  # a FIFO or device is refused here, not read forever
            self.files = [self.path]
        self.jsonl = self.path.suffix == ".jsonl" and self.path.is_file()
        try:
            self.total_bytes = sum(f.stat().st_size for f in self.files)
        except OSError as err:
            raise GptxError(f"cannot read {err.filename}: {err.strerror}") from None
        if self.total_bytes == 0:
            raise GptxError(f"data file is empty: {self.path}")
        self.bytes_done = 0
        self.documents = 0

    @property
    def kind(self) -> str:
        return "jsonl" if self.jsonl else ("directory" if self.path.is_dir() else "text")

    def texts(self) -> Iterator[tuple[bool, str]]:
        """(a document starts, decoded text) in reading order; blocks of ~1 MiB."""
        self.bytes_done, self.documents, seen_text = 0, 0, False
        if self.jsonl:
            yield from self._documents()
            return
        for i, f in enumerate(self.files):
            if i:
                yield False, "\n\n"
            for text in self._decoded_blocks(f):
                seen_text = seen_text or (text != "" and not text.isspace())
                yield False, text
        if not seen_text:
            raise GptxError(f"{self.path} holds no text")

    def _decoded_blocks(self, f: Path) -> Iterator[str]:
        carry, offset = b"", 0  # undecoded bytes of a character cut by the block end; bytes read
        try:
            with open_regular(f) as fh:
                while block := fh.read(READ_BYTES):
                    if b"\x00" in block:
                        raise GptxError(f"{f} looks binary (NUL bytes), expected UTF-8 text")
                    data, start = carry + block, offset - len(carry)
                    end = _utf8_boundary(data)
                    yield _decode(data[:end], f, start)
                    carry, offset = data[end:], offset + len(block)
                    self.bytes_done += len(block)
        except OSError as err:
            raise GptxError(f"cannot read {f}: {err.strerror}") from None
        if carry:
            _decode(carry, f, offset - len(carry))

    def _documents(self) -> Iterator[tuple[bool, str]]:
        try:
            with open_regular(self.path) as fh:
                for number, raw in enumerate(fh, 1):
                    self.bytes_done += len(raw)
                    if not raw.strip():
                        continue
                    yield True, _document_text(raw, self.path, number)
                    self.documents += 1
        except OSError as err:
            raise GptxError(f"cannot read {self.path}: {err.strerror}") from None
        if not self.documents:
            raise GptxError(f"{self.path} holds no documents (one JSON object with a 'text' string per line)")

    def tasks(self, piece_chars: Optional[int]) -> Iterator[list[Piece]]:
        """Pieces grouped into tasks of about ``piece_chars`` characters (many short documents
        share a task). A document's pieces follow its end-of-text marker ``(True, "")``."""
        chunker, task, size = Chunker(piece_chars), [], 0
        for starts, text in self.texts():
            pieces = [(False, p) for p in chunker.flush()] + [(True, "")] if starts else []
            pieces += [(False, p) for p in chunker.feed(text)]
            for piece in pieces:
                task.append(piece)
                size += len(piece[1])
                if piece_chars is not None and size >= piece_chars:
                    yield task
                    task, size = [], 0
        task += [(False, p) for p in chunker.flush()]
        if task:
            yield task


def _utf8_boundary(data: bytes) -> int:
    """The length of ``data`` without a trailing, incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # the last character's lead byte (or ASCII)
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


def _decode(data: bytes, f: Path, start: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptxError(f"{f} is not UTF-8 text (invalid byte at offset {start + err.start})") from None


def _document_text(raw: bytes, path: Path, number: int) -> str:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptxError(f"{path}: line {number}: not valid JSON ({first_line(err)})") from None
    text = doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise GptxError(f"{path}: line {number}: expected an object with a 'text' string")
    return text


# ---- encoding, in worker processes -------------------------------------------------------------

_worker_tokenizer = None
# Linux: fork. The workers run only the tokenizer (no torch, no threads of their own), and a
# forked worker does not re-import the caller's __main__ as a spawned one does: a script without
# an ``if __name__ == "__main__":`` guard would run again in every worker. Elsewhere fork is
# unsafe (macOS) or missing (Windows): spawn, and such scripts need that guard.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _init_worker(parent_pid: int, cls, options, state) -> None:
    global _worker_tokenizer
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the pool)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    _worker_tokenizer = cls(options, state or None)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when its parent dies, even by kill -9, which runs none
    of the parent's clean-up (a worker blocked on the task queue would otherwise live on)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, so that every clean-up (``finally``) runs as for
    Ctrl-C. ``published``: whether the output had been put in place when it came."""

    published = False


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs, SIGTERM raises ``Terminated`` (the default would end the process at
    once, leaving its temporary directory and its workers behind)."""
    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done: the output is replaced whole or not at all."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _encode_in_worker(task: list[Piece]) -> np.ndarray:
    return encode_task(_worker_tokenizer, task)


def encode_task(tokenizer, task: list[Piece]) -> np.ndarray:
    """The ids of a task's pieces, concatenated (int64)."""
    parts = []
    for starts, text in task:
        if starts:
            parts.append(np.array([tokenizer.eot_id], dtype=np.int64))
        if text:
            parts.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def encoded(tasks: Iterator[list[Piece]], tokenizer, workers: int) -> Iterator[np.ndarray]:
    """The ids of each task, in order; with workers > 1 encoded by that many processes, at most
    2 * workers tasks in flight (the memory bound)."""
    if workers == 1:
        for task in tasks:
            yield encode_task(tokenizer, task)
        return
    ctx = multiprocessing.get_context(_START_METHOD)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(), type(tokenizer), tokenizer.options, tokenizer.state()))
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.submit(_encode_in_worker, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:  # a worker was killed from outside (the OOM killer, a signal to it alone)
        _stop_workers(pool)
        raise GptxError(f"a tokenizing worker process died (killed by a signal or out of memory); "
                        f"try fewer --workers (now {workers})") from None
    except BaseException:  # an error, Ctrl-C, SIGTERM: the workers' tasks are no longer wanted
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's processes now rather than after their current task (up to a second each)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):  # already gone
            pass


def piece_chars_for(tokenizer) -> Optional[int]:
    return PIECE_CHARS if getattr(tokenizer, "encodes_in_pieces", False) else None


def default_workers(source: Source) -> int:
    """Processes for tokenizing ``source``: one for small text (no start-up cost), else the CPUs."""
    if source.total_bytes < 16 << 20:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def fit(tokenizer, source: Source, progress: StatusCallback = None) -> None:
    """Fit a tokenizer that learns its vocabulary, from the text as a stream of pieces
    (``fit_pieces``: the char tokenizer collects its characters without holding the text)."""
    meter = Meter(source, progress, "learning the vocabulary from")

    def pieces() -> Iterator[str]:
        for _, text in source.texts():
            yield text
            meter.add(0)

    tokenizer.fit_pieces(pieces())
    if progress:
        progress(f"learned the {type(tokenizer).__name__} vocabulary ({tokenizer.vocab_size} tokens) "
                 f"from {source.total_bytes / 1e6:,.1f} MB in {meter.summary()['seconds']:.1f} s")


class Meter:
    """Bytes read, tokens made, MB/s and ETA, as one status line."""

    def __init__(self, source: Source, progress: StatusCallback, verb: str = "tokenizing"):
        self.source, self.progress, self.verb = source, progress, verb
        self.tokens, self.start, self.last = 0, time.perf_counter(), 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if self.progress and now - self.last >= UPDATE_SECONDS:
            self.last = now
            done, total = self.source.bytes_done, self.source.total_bytes
            rate = done / max(now - self.start, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            tokens = f"{self.tokens:,} tokens, " if self.tokens else ""
            self.progress(f"{self.verb} {self.source.path.name} {bar(done / total)} {100 * done / total:5.1f}% "
                          f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB, {tokens}{rate / 1e6:,.1f} MB/s, ETA {hms(eta)}")

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {"bytes": self.source.total_bytes, "tokens": self.tokens, "seconds": round(seconds, 3),
                "mb_per_s": round(self.source.total_bytes / 1e6 / max(seconds, 1e-9), 2)}

    def finish(self, where: str) -> dict:
        s = self.summary()
        if self.progress:
            self.progress(f"tokenized {self.source.path.name}: {s['bytes'] / 1e6:,.1f} MB -> {s['tokens']:,} tokens "
                          f"in {s['seconds']:.1f} s ({s['mb_per_s']:,.1f} MB/s){where}")
        return s


def require_eot(source: Source, tokenizer, name: str) -> None:
    """Each jsonl document starts with the end-of-text token (``encode_task``): refuse a tokenizer
    without one on one line, before any worker would fail on ``None``. ``name`` names it to the user."""
    if source.jsonl and tokenizer.eot_id is None:
        raise GptxError(f"{source.path}: {name} has no end-of-text token to separate jsonl documents")


def token_stream(source: Source, tokenizer, workers: int, meter: Meter) -> Iterator[np.ndarray]:
    """The source's ids in order, as arrays of the shard dtype; checks every id is in the vocabulary."""
    require_eot(source, tokenizer, f"tokenizer {type(tokenizer).__name__}")  # the text dataset reaches here directly
    vocab = tokenizer.vocab_size
    dtype = shards.token_dtype(vocab)
    piece_chars = piece_chars_for(tokenizer)
    for ids in encoded(source.tasks(piece_chars), tokenizer, workers if piece_chars else 1):  # one piece: one process
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.max() if ids.max() >= vocab else ids.min())
            raise GptxError(f"the tokenizer produced id {bad}, outside its vocabulary of {vocab}")
        meter.add(len(ids))
        yield ids.astype(dtype)


def tokenize_to_shard(source: Source, tokenizer, path: Path, workers: int, progress: StatusCallback = None) -> Path:
    """All of the source's ids in one shard at ``path`` (written at a temporary name, renamed
    when whole): the text dataset's cache entry."""
    meter = Meter(source, progress)
    writer = shards.ShardWriter(path, shards.token_dtype(tokenizer.vocab_size))
    try:
        for ids in token_stream(source, tokenizer, workers, meter):
            writer.write(ids)
        out = writer.close()
    except BaseException as err:
        writer.discard()
        refused = refused_write(err, path, "the tokenized data cache ($GPTX_CACHE_DIR)")
        if refused is not None:
            raise refused from None
        raise
    meter.finish("")
    return out


# ---- gptx prepare ------------------------------------------------------------------------------

@dataclasses.dataclass
class PrepareArgs:
    """``gptx prepare``'s numbers, checked before anything is read or written."""

    val_fraction: float = 0.1
    workers: Optional[int] = None  # None: ``default_workers`` of the source
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    def check(self) -> None:
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise GptxError(f"--val-fraction: must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.workers is not None and not 1 <= self.workers <= MAX_WORKERS:
            raise GptxError(f"--workers: must be between 1 and {MAX_WORKERS}, got {self.workers}")
        if not MIN_SHARD_TOKENS <= self.shard_tokens <= shards.MAX_SHARD_TOKENS:
            raise GptxError(f"--shard-tokens: must be between {MIN_SHARD_TOKENS:,} and {shards.MAX_SHARD_TOKENS:,} "
                            f"(the header's int32 count), got {self.shard_tokens}")


def check_out_dir(out: Path, force: bool = False, protected: tuple[Path, ...] = ()) -> None:
    """OUT_DIR may be new, an empty directory or an earlier prepare's output holding only the files
    that prepare wrote (then replaced); anything else only with ``force``. Never a directory that
    holds one of ``protected`` (the source, the working directory) or the home directory, whose
    replacement would delete them."""
    refuse_to_replace(out, protected)
    blocked = unwritable_ancestor(out.parent)
    if blocked is not None:
        raise GptxError(f"{out}: {blocked} is not a writable directory")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    refuse_foreign_files(out, shards.MANIFEST, _written_by_prepare(out), "written by gptx prepare",
                         "an earlier gptx prepare's output")


def _written_by_prepare(out: Path) -> set[str]:
    """The names an earlier prepare in ``out`` wrote: its manifest and the shards it lists."""
    try:
        meta = json.loads((out / shards.MANIFEST).read_text(encoding="utf-8"))
        listed = [s.get("file") for split in meta["shards"].values() for s in split]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        listed = []
    return {shards.MANIFEST} | {f for f in listed if isinstance(f, str)}


class Roller:
    """Writes a stream of ids into numbered shards of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, dtype: str, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.done: list[tuple[Path, int]] = []  # (path, tokens), in order
        self.writer: Optional[shards.ShardWriter] = None
        self.max_id = -1

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        while len(ids):
            if self.writer is None:
                self.writer = shards.ShardWriter(self.directory / f"part_{len(self.done):06d}.bin", self.dtype)
            room = self.shard_tokens - self.writer.count
            self.writer.write(ids[:room])
            ids = ids[room:]
            if self.writer.count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.done.append((self.writer.close(), self.writer.count))
            self.writer = None


def split_parts(parts: list[tuple[Path, int]], n_train: int, dtype: str) -> dict[str, list[tuple[Path, int]]]:
    """Rename the parts to train_*/val_* shards, the first ``n_train`` tokens training; the part
    that holds the boundary is rewritten as two shards."""
    out: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}

    def add(split: str, source: Path, tokens: int, first: Optional[int] = None) -> None:
        path = source.with_name(f"{split}_{len(out[split]):06d}.bin")
        if first is None:
            os.replace(source, path)
        else:
            shards.copy_tokens(source, first, tokens, path)
        out[split].append((path, tokens))

    start = 0
    for path, count in parts:
        if start + count <= n_train:
            add("train", path, count)
        elif start >= n_train:
            add("val", path, count)
        else:
            cut = n_train - start
            add("train", path, cut, 0)
            add("val", path, count - cut, cut)
            path.unlink()
        start += count
    return out


def prepare(source_path: str | os.PathLike, out_dir: str | os.PathLike, kind: str, tokenizer, args: PrepareArgs,
            progress: StatusCallback = None, force: bool = False) -> dict:
    """Tokenize ``source_path`` into shards in ``out_dir`` (see the module docstring) and return
    the manifest. ``tokenizer`` is registered as ``kind``; one that learns its vocabulary is fit
    on the source first. Everything is written into a temporary sibling directory that replaces
    ``out_dir`` only when complete, the manifest last. ``force``: replace ``out_dir`` even when it
    holds files gptx did not write."""
    args.check()
    out = Path(out_dir).expanduser().absolute()
    source_file = Path(source_path).expanduser()
    protected = (source_file, Path.cwd())
    check_out_dir(out, force, protected)
    source = Source(source_file)
    workers = args.workers or default_workers(source)
    require_eot(source, tokenizer, f"--tokenizer {kind}")  # before fitting a tokenizer that learns
    if tokenizer.requires_fit and not tokenizer.state():
        fit(tokenizer, source, progress)
    remove_stale_siblings(out)  # earlier prepares into out that were killed
    created = first_missing(out.parent)  # removed on failure, while still empty
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "partial")
    published = False
    try:
        manifest = _write_shards(source, tmp, kind, tokenizer, dataclasses.replace(args, workers=workers), progress)
        shards.write_manifest(tmp, manifest)
        with _signals_deferred(), directory_lock(out.parent):  # two prepares into one OUT_DIR: one at a time
            check_out_dir(out, force, protected)  # the user may have put a file there meanwhile
            replace_dir(tmp, out)  # an earlier prepare there is replaced whole
            published = True
    except BaseException as err:
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)  # only ever what this prepare wrote
            remove_created_dirs(out.parent, created)
        if isinstance(err, Terminated):
            err.published = published
        refused = refused_write(err, out, "the shards")  # a full disk names the folder, not our temporary
        if refused is not None:
            raise refused from None
        raise
    return manifest


def _write_shards(source: Source, tmp: Path, kind: str, tokenizer, args: PrepareArgs, progress: StatusCallback) -> dict:
    dtype = shards.token_dtype(tokenizer.vocab_size)
    meter = Meter(source, progress)
    roller = Roller(tmp, dtype, args.shard_tokens)
    for ids in token_stream(source, tokenizer, args.workers, meter):
        roller.write(ids)
    roller.close()
    total = meter.tokens
    n_train = int(total * (1.0 - args.val_fraction))  # the text dataset's (nanoGPT's) split
    if n_train < 1 or total - n_train < 1:
        raise GptxError(f"{source.path}: {total} tokens leave an empty split with --val-fraction {args.val_fraction}")
    splits = split_parts(roller.done, n_train, dtype)
    stats = meter.finish("")
    return {
        "format": shards.FORMAT,
        "format_version": shards.FORMAT_VERSION,
        "gptx_version": _gptx_version(),
        "tokenizer": shards.tokenizer_record(kind, tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype,
        "header": dict(zip(("magic", "version"), shards.HEADERS[dtype])),
        "source": {"path": str(source.path), "kind": source.kind, "bytes": source.total_bytes,
                   "files": len(source.files)} | ({"documents": source.documents} if source.jsonl else {}),
        "val_fraction": args.val_fraction,
        "max_token_id": roller.max_id,
        "tokens": {split: sum(n for _, n in parts) for split, parts in splits.items()},
        "shards": {split: [shards.shard_record(p, n) for p, n in parts] for split, parts in splits.items()},
        "stats": stats | {"workers": args.workers},
    }


def _gptx_version() -> str:
    from gptx import __version__

    return __version__
