"""One schema per file gptx stores and reads back, validated whole before anything uses it.

    gptx_data.json     ShardManifest     (gptx prepare's manifest, gptx.shards)
    gptx.json          CheckpointMeta    (a checkpoint's metadata, gptx.checkpoint; its ``config`` is
                                          an experiment, checked by gptx.config.from_dict)
    gptx_export.json   ExportMeta        (an ONNX export's metadata, gptx.export.runtime)
    trainer.pt         TrainerState      (what --resume reads back, gptx.checkpoint)
    tokenizer state    Tokenizer.State   (declared by each tokenizer; stored inside all three)

Every problem becomes the project's one-line error ``FILE: key.path: problem`` (exit 2).

Types are strict (``"3"`` is not 3, ``true`` is not 1, NaN and infinity are not numbers) and sizes
have ranges. Unknown keys are allowed and ignored: a later gptx may add a field without bumping the
file's ``format_version`` (an incompatible change bumps it, and a newer version is refused before
any schema runs), and a key this gptx does not know cannot change what it does, since it never
reads it. Torch-free: the onnxruntime runtime imports it.
"""
from __future__ import annotations

import json
import re
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptx.errors import GptxError
from gptx.export import BATCH, CACHE_DTYPES

MAX_SIZE = 1 << 31  # any model size or count: beyond it the file was altered
MAX_META_BYTES = 64 << 20  # a metadata file is kilobytes (a learned vocabulary: megabytes)
SHA256 = r"[0-9a-f]{64}"


class Problem(ValueError):
    """A validator's finding about one key (relative to the table it validates)."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


class Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, populate_by_name=True, frozen=True)


Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=0, le=MAX_SIZE)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
def _matching(pattern: str, what: str):
    """A check that a string matches ``pattern``, its message saying ``what`` was expected."""
    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise ValueError(f"expected {what}, got {shown(text)}")
        return text
    return AfterValidator(check)


Sha256 = Annotated[str, _matching(SHA256, "a sha256 (64 lowercase hex digits)")]
ClassPath = Annotated[str, _matching(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", "'module:Class'")]


# ---- reading and reporting -------------------------------------------------------------------

def read_json(path: Path, what: str) -> Any:
    """The parsed JSON of a stored metadata file. Missing, not a regular file (a directory, a FIFO
    that would block), too big, not UTF-8 or not JSON: a GptxError naming the file."""
    from gptx.fsutil import open_regular

    path = Path(path)
    try:
        with open_regular(path) as f:  # refuses a directory or a FIFO on the open descriptor: no race
            size = os.fstat(f.fileno()).st_size
            if size > MAX_META_BYTES:
                raise GptxError(f"{path}: {size:,} bytes, more than the {MAX_META_BYTES:,} a {what}'s metadata can be")
            text = f.read(MAX_META_BYTES + 1).decode("utf-8")
        return json.loads(text)  # NaN and Infinity parse; the schemas refuse them where they land
    except FileNotFoundError:
        raise GptxError(f"{path.parent}: not a {what} (no {path.name})") from None
    except OSError as err:
        raise GptxError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise GptxError(f"{path}: corrupted (not UTF-8 at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise GptxError(f"{path}: corrupted (not JSON: {err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise GptxError(f"{path}: corrupted (JSON nested too deeply)") from None


def validate(schema: type[BaseModel], data: Any, path: Path | str, prefix: str = ""):
    """``data`` checked against ``schema``; the first problem is a GptxError ``PATH: KEY: problem``
    (``prefix``: the key path of ``data`` inside the file)."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise GptxError(describe(err, path, prefix)) from None


def describe(err: ValidationError, path: Path | str, prefix: str = "") -> str:
    problems = err.errors(include_url=False)
    first = problems[0]
    loc = list(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Problem):
        loc += [part for part in re.split(r"\.(?![^\[]*\])", cause.key) if part]
        message = str(cause)
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] in ("value_error", "assertion_error"):
        message = str(cause) if cause is not None else first["msg"]
    else:
        message = f"{_lower(first['msg'])}, got {shown(first.get('input'))}"
    key = key_path([*([prefix] if prefix else []), *loc])
    more = len(problems) - 1
    more = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{path}: {key or '(top level)'}: {message}{more}"


def key_path(parts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("["):
            out += str(part)
        else:
            out += f".{part}" if out else str(part)
    return out


def _lower(text: str) -> str:
    """pydantic's message in the project's words: lower case, 'table' for a JSON object."""
    text = re.sub(r"valid dictionary( or instance of \w+)?", "table (a JSON object)", text).replace(" after validation", "")
    return text[:1].lower() + text[1:]


def shown(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, ensure_ascii=False, default=repr)
    if isinstance(value, dict):
        text = "a table" if len(text) > 60 else text
    elif isinstance(value, list):
        text = f"a list of {len(value)}" if len(text) > 60 else text
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the tokenizer's state (inside every stored file) ---------------------------------------

def tokenizer_state(tokenizer_cls, state: Any, path: Path | str, key: str) -> dict:
    """A stored tokenizer state checked against its tokenizer's ``State`` schema (a Schema subclass
    the tokenizer declares; any JSON object when it declares none); returns it as a dict."""
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise GptxError(f"{path}: {key}: expected an object, got {shown(state)}")
    schema = getattr(tokenizer_cls, "State", None)
    if schema is not None:
        validate(schema, state, path, key)
    return state


# ---- gptx_data.json --------------------------------------------------------------------------

class TokenizerRecord(Schema):
    kind: Optional[Name]
    class_: ClassPath = Field(alias="class")
    options: dict[str, Any]
    state: dict[str, Any]
    sha256: Sha256

    @model_validator(mode="after")
    def _hash_matches(self):
        from gptx.export import tokenizer_hash

        if tokenizer_hash(self.kind, self.options, self.state) != self.sha256:
            raise Problem("sha256", "does not match the tokenizer's kind, options and state (altered)")
        return self


def _safe_file_name(name: str) -> str:
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"expected a file name inside the directory, got {name!r}")
    return name


class ShardRecord(Schema):
    file: Name
    tokens: Annotated[int, Field(ge=1, le=2**31 - 1)]
    bytes: Optional[Annotated[int, Field(ge=0)]] = None
    sha256: Optional[Sha256] = None

    _name = field_validator("file")(_safe_file_name)


class Splits(Schema):
    train: list[ShardRecord] = Field(min_length=1)
    val: list[ShardRecord] = Field(min_length=1)


class SplitCounts(Schema):
    train: Size
    val: Size


class ShardManifest(Schema):
    format: Literal["gptx.tokens"]
    format_version: Annotated[int, Field(ge=1)]
    gptx_version: Optional[str] = None
    tokenizer: TokenizerRecord
    vocab_size: Optional[Size] = None
    eot_id: Optional[Count] = None
    dtype: Literal["uint16", "uint32"]
    header: Optional[dict[str, int]] = None
    max_token_id: Annotated[int, Field(ge=0, le=2**32 - 1)]
    val_fraction: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    tokens: Optional[SplitCounts] = None
    shards: Splits
    source: Optional[dict[str, Any]] = None
    stats: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _agree(self):
        from gptx.shards import HEADER_BYTES, HEADERS

        itemsize = 2 if self.dtype == "uint16" else 4
        if self.dtype == "uint16" and self.max_token_id >= 2**16:
            raise Problem("max_token_id", f"{self.max_token_id} does not fit the shards' uint16 tokens")
        if self.vocab_size is not None and self.max_token_id >= self.vocab_size:
            raise Problem("max_token_id", f"{self.max_token_id} is beyond vocab_size {self.vocab_size}")
        if self.vocab_size is not None and self.eot_id is not None and self.eot_id >= self.vocab_size:
            raise Problem("eot_id", f"{self.eot_id} is beyond vocab_size {self.vocab_size}")
        if self.header is not None and self.header != dict(zip(("magic", "version"), HEADERS[self.dtype])):
            raise Problem("header", f"{self.header} is not the {self.dtype} shard header {HEADERS[self.dtype]}")
        names: set[str] = set()
        for split in ("train", "val"):
            for i, s in enumerate(getattr(self.shards, split)):
                if s.file in names:
                    raise Problem(f"shards.{split}[{i}].file", f"{s.file!r} is listed twice")
                names.add(s.file)
                if s.bytes is not None and s.bytes != HEADER_BYTES + s.tokens * itemsize:
                    raise Problem(f"shards.{split}[{i}].bytes", f"{s.bytes} is not the size of {s.tokens} {self.dtype} "
                                  f"tokens after the {HEADER_BYTES}-byte header")
            total = sum(s.tokens for s in getattr(self.shards, split))
            if self.tokens is not None and getattr(self.tokens, split) != total:
                raise Problem(f"tokens.{split}", f"{getattr(self.tokens, split)} is not the sum of its shards' tokens ({total})")
        return self


# ---- gptx.json -------------------------------------------------------------------------------

class CheckpointMeta(Schema):
    format: Literal["gptx.checkpoint"]
    format_version: Annotated[int, Field(ge=1)]
    gptx_version: Optional[str] = None
    step: Annotated[int, Field(ge=0, le=2**63 - 1)]
    config: dict[str, Any]
    tokenizer_state: Optional[dict[str, Any]] = None
    tokenizer_state_sha256: Optional[Sha256] = None
    tokenizer_vocab_size: Optional[Size] = None
    mlflow_run_id: Optional[str] = None
    init_from: Optional[str] = None


# ---- trainer.pt (what --resume reads: tensors and numbers, torch.load(weights_only=True)) ------

class HistoryEntry(Schema):
    step: Count
    train_loss: Annotated[float, Field(allow_inf_nan=True)]
    val_loss: Annotated[float, Field(allow_inf_nan=True)]


class TrainerState(Schema):
    model_config = ConfigDict(arbitrary_types_allowed=True)  # tensors in torch_rng and the optimizer's state

    step: Annotated[int, Field(ge=0, le=2**63 - 1)]
    optimizer: dict[str, Any]
    dataset: dict[str, Any]
    torch_rng: Any
    history: list[HistoryEntry] = []  # stored as a JSON string
    seconds: Annotated[float, Field(ge=0)] = 0.0
    target: Optional[dict[str, Any]] = None  # stored as a JSON string, "" for none

    @field_validator("history", "target", mode="before")
    @classmethod
    def _json_text(cls, value):
        if not isinstance(value, str):
            raise ValueError(f"expected JSON text, got {shown(value)}")
        if value == "":
            return None
        try:
            return json.loads(value)
        except ValueError as err:
            raise ValueError(f"not JSON ({err})") from None


# ---- gptx_export.json ------------------------------------------------------------------------


class CacheTensor(Schema):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=64)]
    dims: list[Any] = Field(min_length=1, max_length=8)
    seq_axis: Annotated[int, Field(ge=0)]
    dtype: Literal[CACHE_DTYPES]  # type: ignore[valid-type]

    @field_validator("dims")
    @classmethod
    def _sizes_or_names(cls, dims: list) -> list:
        for i, d in enumerate(dims):
            size = type(d) is int and 0 <= d <= MAX_SIZE
            if not (size or (isinstance(d, str) and 0 < len(d) <= 64)):
                raise Problem(f"[{i}]", f"expected a size from 0 to {MAX_SIZE:,} or a dimension name, got {shown(d)}")
        return dims

    @model_validator(mode="after")
    def _axes(self):
        if self.seq_axis >= len(self.dims):
            raise Problem("seq_axis", f"{self.seq_axis} is not an axis of dims {self.dims}")
        unknown = [d for a, d in enumerate(self.dims) if isinstance(d, str) and d != BATCH and a != self.seq_axis]
        if unknown:
            raise Problem("dims", f"unknown symbolic dimension {unknown[0]!r} ({BATCH} or the sequence axis)")
        return self


class IoContract(Schema):
    name: Literal["gptx.decoder"]
    version: Annotated[int, Field(ge=1, le=1)]  # not Literal[1]: that accepts true
    inputs: Optional[list[str]] = None
    outputs: Optional[list[str]] = None
    past_present_share_buffer: bool = False


class ExportModel(Schema):
    n_layer: Size
    n_head: Size
    kv_heads: Size
    head_dim: Size
    n_embd: Size
    vocab_size: Size
    context_length: Size
    parameters: Optional[Count] = None


class ExportTokenizer(TokenizerRecord):
    vocab_size: Optional[Size] = None
    gpt2_bpe: bool = False  # written by exports before Tokenizer.tokenizer_json: they list tokenizer.json in files too


class SpecialToken(Schema):
    id: Count
    text: Optional[str] = None


class ExportSource(Schema):
    checkpoint: Optional[str] = None
    step: Optional[Annotated[int, Field(ge=0, le=2**63 - 1)]] = None


class ExportMeta(Schema):
    format: Literal["gptx.export"]
    format_version: Annotated[int, Field(ge=1)]
    gptx_version: Optional[str] = None
    io_contract: IoContract
    cache: Optional[list[CacheTensor]] = Field(default=None, min_length=1, max_length=16)
    model: ExportModel
    config: Optional[dict[str, Any]] = None
    tokenizer: ExportTokenizer
    special_tokens: dict[str, SpecialToken] = {}
    opset: Optional[Annotated[int, Field(ge=7, le=99)]] = None
    quantization: Optional[str] = None
    source: Optional[ExportSource] = None
    files: Optional[list[Name]] = None

    @field_validator("files")
    @classmethod
    def _file_names(cls, files):
        for i, name in enumerate(files or []):
            try:
                _safe_file_name(name)
            except ValueError as err:
                raise Problem(f"[{i}]", str(err)) from None
        return files

    @model_validator(mode="after")
    def _agree(self):
        from gptx.export import input_names, output_names

        m, tok = self.model, self.tokenizer
        if tok.vocab_size is not None and tok.vocab_size > m.vocab_size:
            raise Problem("tokenizer.vocab_size", f"{tok.vocab_size} is more than model.vocab_size {m.vocab_size}")
        vocab = tok.vocab_size or m.vocab_size
        for name, token in self.special_tokens.items():
            if token.id >= vocab:
                raise Problem(f"special_tokens.{name}.id", f"{token.id} is not an id of the tokenizer's {vocab} tokens")
        cache = [c.model_dump() for c in self.cache] if self.cache else None
        names = [c["name"] for c in cache or []]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise Problem("cache", f"tensor name {dup!r} is declared twice")
        io = self.io_contract
        if io.inputs is not None and io.inputs != input_names(m.n_layer, cache):
            raise Problem("io_contract.inputs", f"do not match model.n_layer {m.n_layer} and the cache's tensors")
        if io.outputs is not None and io.outputs != output_names(m.n_layer, cache):
            raise Problem("io_contract.outputs", f"do not match model.n_layer {m.n_layer} and the cache's tensors")
        return self


def graph_mismatch(stored: dict, graph: dict) -> Optional[str]:
    """The first key where ``stored`` (gptx_export.json) and ``graph`` (the metadata the exporter
    wrote into model.onnx) disagree on what the runtimes read, as ``key: stored vs graph``."""
    def walk(a, b, key):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                found = walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
                if found:
                    return found
            return None
        return None if a == b else f"{key}: {shown(a)} here, {shown(b)} in the graph"

    for key in ("model", "cache", "tokenizer", "special_tokens", "io_contract"):
        if key in graph:
            found = walk({key: stored.get(key)}, {key: graph[key]}, "")
            if found:
                return found
    return None
