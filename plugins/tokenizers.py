"""Tokenizers: GPT-2's BPE through tiktoken (offline, from files shipped with gptx), any other
tiktoken encoding by name, the character and byte vocabularies for small experiments, and any
Hugging Face tokenizer.json (``hf``). Each describes itself as a tokenizer.json where it can
(``Tokenizer.tokenizer_json``): the exports write that for runtimes outside gptx."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

import gptx
from gptx.base import Tokenizer
from gptx.errors import ConfigError, GptxError, first_line
from gptx.options import did_you_mean
from gptx.schemas import MAX_SIZE, Problem, Schema, shown

GPT2_FILES = {  # sha256 as tiktoken's own gpt2 encoding checks them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOT = 50256
EOT = "<|endoftext|>"


def gpt2_bpe_file(name: str, directory=None) -> str:
    """Path of a shipped GPT-2 BPE file (or of one in ``directory``), verified against its sha256."""
    base = resources.files("gptx.plugins") / "data" / "gpt2-bpe" if directory is None else Path(directory)
    path = base / name
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise GptxError(f"{path}: GPT-2 BPE file unreadable ({err.strerror or err}); reinstall gptx") from None
    if digest != GPT2_FILES[name]:
        raise GptxError(f"{path}: sha256 {digest} does not match GPT-2's {GPT2_FILES[name]}; reinstall gptx")
    return str(path)


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's ``gpt2`` Encoding, built from the shipped files without touching the network."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files as they are, no copy into a cache
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=gpt2_bpe_file("vocab.bpe"),
            encoder_json_file=gpt2_bpe_file("encoder.json"),
            vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
            encoder_json_hash=GPT2_FILES["encoder.json"],
        )
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


@functools.lru_cache(maxsize=1)
def _gpt2_described() -> str:
    """GPT-2's description as JSON text, built once from the shipped BPE files (encoder.json,
    vocab.bpe); it encodes exactly as tiktoken's ``gpt2`` (tests/test_export.py checks)."""
    vocab = json.loads(Path(gpt2_bpe_file("encoder.json")).read_text(encoding="utf-8"))
    lines = Path(gpt2_bpe_file("vocab.bpe")).read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line.strip()]  # line 0 is "#version: 0.2"
    if vocab.get(EOT) != GPT2_EOT:
        raise ValueError(f"encoder.json: {EOT} is not {GPT2_EOT}")
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": GPT2_EOT, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }, ensure_ascii=False)


def gpt2_tokenizer_json() -> dict:
    """GPT-2's byte-level BPE as a ``tokenizers`` description (a fresh copy: callers may edit it)."""
    return json.loads(_gpt2_described())


class _TiktokenBase(Tokenizer):
    encoding = None
    encodes_in_pieces = True  # byte-level BPE: the pre-tokenizer never joins text across a safe cut

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    @property
    def eot_id(self):
        return self.encoding.eot_token

    def encode(self, text):
        # special tokens written in the text are allowed: "<|endoftext|>" separates documents
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.encoding.decode(list(ids))

    def tokenizer_json(self):
        # GPT-2's encoding has one (from the shipped files); other tiktoken encodings none yet
        return gpt2_tokenizer_json() if self.encoding is gpt2_encoding() else None


def is_gpt2_bpe(tokenizer) -> bool:
    """Whether ``tokenizer`` encodes with GPT-2's BPE (``gpt2``, or ``tiktoken`` with encoding gpt2):
    formats that know GPT-2's tokenizer by name (GGUF's ``gpt2``) take it as such."""
    return isinstance(tokenizer, _TiktokenBase) and tokenizer.encoding is gpt2_encoding()


class GPT2Tokenizer(_TiktokenBase):
    """GPT-2's byte-level BPE (50,257 tokens, <|endoftext|> = 50256), exactly tiktoken's ``gpt2``."""

    def __init__(self, options, state=None):
        super().__init__(options, state)
        self.encoding = gpt2_encoding()


@dataclasses.dataclass(frozen=True)
class TiktokenOptions:
    encoding: str = "cl100k_base"  # any name tiktoken.get_encoding knows


class TiktokenTokenizer(_TiktokenBase):
    """Any tiktoken encoding by name. Outside ``gpt2`` their files come from the network the first
    time; offline, put them in TIKTOKEN_CACHE_DIR beforehand."""

    Options = TiktokenOptions

    def __init__(self, options: TiktokenOptions, state=None):
        super().__init__(options, state)
        if options.encoding == "gpt2":
            self.encoding = gpt2_encoding()
            return
        import tiktoken

        known = tiktoken.list_encoding_names()
        if options.encoding not in known:  # tiktoken's own message is three lines
            raise GptxError(f"tokenizer.encoding: unknown tiktoken encoding {options.encoding!r}{did_you_mean(options.encoding, known)}; "
                            f"available: {', '.join(sorted(known))}")
        try:
            self.encoding = tiktoken.get_encoding(options.encoding)
        except Exception as err:  # network failure while fetching the BPE file
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(unset)")
            raise GptxError(
                f"tokenizer.encoding: cannot load tiktoken encoding '{options.encoding}' offline "
                f"({type(err).__name__}); place its files in TIKTOKEN_CACHE_DIR (now {cache}) or use kind = \"gpt2\""
            ) from None


def char_tokenizer_json(chars: list[str]) -> dict:
    """A ``tokenizers`` description that encodes as gptx's ``char`` tokenizer: one id per code
    point, its index in ``chars``; a character outside them is an error (no unknown token), as in gptx."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)}, "unk_token": "\u0000<unk>"},
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as the ByteLevel pre-tokenizer maps them."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = shown[:], 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(shown, map(chr, chars)))


def byte_tokenizer_json() -> dict:
    """A ``tokenizers`` description that encodes as gptx's ``byte`` tokenizer: the UTF-8 bytes as
    ids 0-255 (byte-level symbols, no merges)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level}, "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {sym: b for b, sym in _bytes_to_unicode().items()}, "merges": []},
    }


class CharState(Schema):
    """The char tokenizer's learned vocabulary: distinct characters, one per id."""

    chars: list[str] = Field(min_length=1, max_length=MAX_SIZE)

    @field_validator("chars")
    @classmethod
    def _distinct_characters(cls, chars: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for i, ch in enumerate(chars):
            if len(ch) != 1 or "\ud800" <= ch <= "\udfff":
                raise Problem(f"[{i}]", f"expected one character, got {shown(ch)}")
            if ch in seen:
                raise Problem(f"[{i}]", f"{ch!r} is already id {seen[ch]}: a vocabulary lists each character once")
            seen[ch] = i
        return chars



class CharTokenizer(Tokenizer):
    """One token per character, the vocabulary learned from the training text (sorted characters,
    as nanoGPT's shakespeare_char) and saved with every checkpoint."""

    requires_fit = True
    encodes_in_pieces = True
    State = CharState

    def __init__(self, options, state=None):
        super().__init__(options, state)
        self.chars: list[str] = list((state or {}).get("chars", []))
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def fit(self, text):
        self.fit_pieces([text])

    def fit_pieces(self, pieces):
        seen: set[str] = set()
        for piece in pieces:
            seen.update(piece)
        self.chars = sorted(seen)
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def state(self):
        return {"chars": self.chars} if self.chars else {}  # {} until fitted

    @property
    def vocab_size(self):
        if not self.chars:
            raise GptxError("the char tokenizer has no vocabulary yet: it is learned from the training data")
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.index[ch] for ch in text]
        except KeyError as err:
            raise GptxError(f"character {err.args[0]!r} is not in this char tokenizer's vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def tokenizer_json(self):
        return char_tokenizer_json(self.chars) if self.chars else None  # None until fitted


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 text: no vocabulary to learn, nothing unknown."""

    encodes_in_pieces = True

    @property
    def vocab_size(self):
        return 256

    def encode(self, text):
        # surrogateescape: bytes that are not UTF-8 (a command-line argument keeps them as lone
        # surrogates) are encoded as the bytes they were; any other lone surrogate has no bytes
        try:
            return list(text.encode("utf-8", errors="surrogateescape"))
        except UnicodeEncodeError as err:
            raise GptxError(f"the text holds {text[err.start]!r} at character {err.start}, which is not Unicode text "
                            "the byte tokenizer can encode (a lone surrogate)") from None

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def tokenizer_json(self):
        return byte_tokenizer_json()

# ---- any Hugging Face tokenizer.json ------------------------------------------------------------

MAX_TOKENIZER_BYTES = 256 * 2**20  # GPT-2's tokenizer.json is 1.5 MB; the largest vocabularies' some tens


def hf_backend(described: Any):
    """The ``tokenizers`` library's Tokenizer for a description (a tokenizer.json's content); a
    ValueError saying why when it is not one."""
    from tokenizers import Tokenizer as Backend

    if not isinstance(described, dict) or not isinstance(described.get("model"), dict):
        raise ValueError("not a Hugging Face tokenizer.json (expected an object with a \"model\" object)")
    try:
        return Backend.from_str(json.dumps(described))
    except Exception as err:  # the library's own parse error (a Rust panic message, an unknown type)
        raise ValueError(f"not a Hugging Face tokenizer.json ({first_line(err)[:200]})") from None


def read_tokenizer_json(path: str) -> dict:
    """A tokenizer.json file's content, checked by the ``tokenizers`` library; a ConfigError on one
    line naming tokenizer.path (and, through the loader, the experiment file)."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}", "tokenizer.path")

    try:
        if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
            raise bad(f"{os.path.getsize(path):,} bytes; a tokenizer.json gptx reads is at most {MAX_TOKENIZER_BYTES:,}")
        with open(path, encoding="utf-8") as f:
            described = json.load(f)
    except OSError as err:
        raise bad(f"cannot read it ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise bad(f"not JSON ({first_line(err)})") from None
    try:
        hf_backend(described)
    except ValueError as err:
        raise bad(str(err)) from None
    return described


@dataclasses.dataclass(frozen=True)
class HFOptions:
    path: str = dataclasses.field(default="data/tokenizer.json", metadata={"path": True})  # a Hugging Face tokenizer.json, relative to the experiment file (read once: checkpoints keep its content)
    eot: str = EOT  # the end-of-text token (separates documents, ends generation); "" for none


class HFState(Schema):
    """The hf tokenizer's description, the tokenizer.json it was built from: a checkpoint keeps it,
    so it does not need the file any more."""

    tokenizer_json: dict[str, Any]

    @field_validator("tokenizer_json")
    @classmethod
    def _a_tokenizers_description(cls, described: dict) -> dict:
        try:
            hf_backend(described)
        except ValueError as err:
            raise Problem("", str(err)) from None
        return described


def _byte_level_bpe(described: dict) -> bool:
    """Whether the description splits as GPT-2's byte-level BPE does (ByteLevel's own regex, no
    normalizer, no prefix space): then encode(a + b) == encode(a) + encode(b) at gptx's safe cuts."""
    pre, model = described.get("pre_tokenizer") or {}, described.get("model") or {}
    return (described.get("normalizer") is None and model.get("type") == "BPE" and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) is True and not pre.get("add_prefix_space", False))


class HFTokenizer(Tokenizer):
    """Any Hugging Face ``tokenizer.json`` through the ``tokenizers`` library: ``path`` is read
    when a run starts and its content kept in the state (checkpoints, exports), so it travels
    as it is to Node, the web page and the Hugging Face export."""

    Options = HFOptions
    State = HFState

    def __init__(self, options: HFOptions, state=None):
        super().__init__(options, state)
        self.described = (state or {}).get("tokenizer_json") or read_tokenizer_json(options.path)
        try:
            self.backend = hf_backend(self.described)
        except ValueError as err:  # a state handed in directly, not checked by its schema
            raise GptxError(f"tokenizer state: {err}") from None
        self.encodes_in_pieces = _byte_level_bpe(self.described)
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        if self._vocab_size == 0:
            raise GptxError(f"tokenizer.path: {options.path}: the vocabulary is empty")
        self._eot = vocab.get(options.eot) if options.eot else None
        if options.eot and self._eot is None:
            raise GptxError(f"tokenizer.eot: {options.eot!r} is not a token of {options.path} "
                            "(name one of its tokens, or \"\" for none)")

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def eot_id(self):
        return self._eot

    def encode(self, text):
        try:  # no special tokens added: gptx separates documents with eot itself
            return self.backend.encode(text, add_special_tokens=False).ids
        except Exception as err:  # text Rust cannot take (a lone surrogate)
            raise GptxError(f"the hf tokenizer cannot encode this text ({first_line(err)[:200]})") from None

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)  # eot shows, as with gpt2

    def state(self):
        return {"tokenizer_json": self.described}

    def tokenizer_json(self):
        return self.described


@gptx.hookimpl(trylast=True)
def register_tokenizer(register):
    register("gpt2", GPT2Tokenizer)
    register("tiktoken", TiktokenTokenizer)
    register("char", CharTokenizer)
    register("byte", ByteTokenizer)
    register("hf", HFTokenizer)
