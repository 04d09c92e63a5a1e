"""Tokenizers: GPT-2's BPE through tiktoken (offline, from files shipped with gptx), any other
tiktoken encoding by name, and the character and byte vocabularies for small experiments."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from importlib import resources

from pydantic import Field, field_validator

import gptx
from gptx.base import Tokenizer
from gptx.errors import GptxError
from gptx.options import did_you_mean
from gptx.schemas import MAX_SIZE, Problem, Schema, shown

GPT2_FILES = {  # sha256 as tiktoken's own gpt2 encoding checks them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOT = 50256


def gpt2_bpe_file(name: str, directory=None) -> str:
    """Path of a shipped GPT-2 BPE file (or of one in ``directory``), verified against its sha256."""
    from pathlib import Path

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


@gptx.hookimpl(trylast=True)
def register_tokenizer(register):
    register("gpt2", GPT2Tokenizer)
    register("tiktoken", TiktokenTokenizer)
    register("char", CharTokenizer)
    register("byte", ByteTokenizer)
