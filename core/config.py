"""Experiment configuration: TOML in, a validated, typed ``ExperimentConfig`` out.

The file stores component *names* plus their options (as litgpt does); names resolve to classes
through the plugin registry at load time, and each component validates its own options. A
resolved config turns back into plain data (``to_dict``) for checkpoints and MLflow params.

Precedence: ``--set key.path=value`` > the file > the defaults below.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from gptx.errors import ConfigError, GptxError
from gptx.options import did_you_mean, parse, to_dict

# slot -> (registry kind, default component name)
COMPONENT_SLOTS = {
    "attention": ("attention", "causal"),
    "positional": ("positional", "learned"),
    "ffn": ("ffn", "gelu"),
    "norm": ("norm", "layernorm"),
}
DEFAULT_PLACEMENT = "pre"
DEFAULT_TOKENIZER = "gpt2"


@dataclasses.dataclass
class ComponentSpec:
    """A resolved component choice: registered name, the class it names, its parsed options."""

    kind: str
    options: Any
    cls: type = dataclasses.field(repr=False, compare=False, default=None)
    placement: Optional[str] = None  # norms only: the registered NormPlacement name
    placement_cls: type = dataclasses.field(repr=False, compare=False, default=None)

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        if self.placement is not None:
            out["placement"] = self.placement
        return out | to_dict(self.options)


@dataclasses.dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the longest context the model is trained (and allowed) to see
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms, as GPT-2
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix, as GPT-2
    # filled in by the loader from the [model.<slot>] tables
    attention: Optional[ComponentSpec] = None
    positional: Optional[ComponentSpec] = None
    ffn: Optional[ComponentSpec] = None
    norm: Optional[ComponentSpec] = None

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError((name, f"must be at least 1, got {getattr(self, name)}"))
        if self.n_embd % self.n_head:
            raise ValueError(("n_embd", f"{self.n_embd} is not divisible by n_head = {self.n_head}"))
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(("vocab_size", f"must be at least 1, got {self.vocab_size}"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(("dropout", f"must be in [0, 1), got {self.dropout}"))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in COMPONENT_SLOTS}
        for slot in COMPONENT_SLOTS:
            spec = getattr(self, slot)
            if spec is not None:
                out[slot] = spec.to_dict()
        return out


@dataclasses.dataclass
class DataConfig:
    path: str = "data/tinyshakespeare.txt"  # a text file or a directory of .txt files, relative to the experiment file
    val_fraction: float = 0.1  # the last fraction of the tokens is the validation split

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(("val_fraction", f"must be between 0 and 1, got {self.val_fraction}"))


@dataclasses.dataclass
class TrainingConfig:
    max_steps: int = 1000
    batch_size: int = 12  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the global batch, across all ranks)
    learning_rate: float = 6e-4
    min_lr: Optional[float] = None  # end of the cosine decay; None: learning_rate / 10
    warmup_steps: int = 100
    lr_decay_steps: Optional[int] = None  # None: max_steps
    weight_decay: float = 0.1  # applied to 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_steps: int = 20  # batches per validation estimate
    final_eval_tokens: int = 1_000_000  # after the last step: val loss over the validation split, tiled (0: skip)
    log_interval: int = 10
    checkpoint_interval: Optional[int] = None  # None: every eval_interval
    seed: int = 1337
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast on CPU and CUDA
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto: cuda when present, else cpu
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    threads: Optional[int] = None  # torch intra-op threads on CPU; None: torch's default
    out_dir: str = "runs"  # run directories go to <out_dir>/<experiment>/<run>; relative to the working directory
    sample_prompt: str = "\n"
    sample_tokens: int = 200  # tokens generated at the end of the run (0: none)
    sample_temperature: float = 0.8
    sample_top_k: Optional[int] = 200

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError((name, f"must be at least 1, got {getattr(self, name)}"))
        for name in ("warmup_steps", "sample_tokens", "final_eval_tokens"):
            if getattr(self, name) < 0:
                raise ValueError((name, f"must not be negative, got {getattr(self, name)}"))
        if not self.learning_rate > 0:
            raise ValueError(("learning_rate", f"must be positive, got {self.learning_rate}"))
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(("min_lr", f"must be between 0 and learning_rate, got {self.min_lr}"))
        if self.weight_decay < 0:
            raise ValueError(("weight_decay", f"must not be negative, got {self.weight_decay}"))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError((name, f"must be in [0, 1), got {getattr(self, name)}"))
        if self.grad_clip < 0:
            raise ValueError(("grad_clip", f"must not be negative, got {self.grad_clip}"))
        if self.checkpoint_interval is not None and self.checkpoint_interval < 1:
            raise ValueError(("checkpoint_interval", f"must be at least 1, got {self.checkpoint_interval}"))
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(("lr_decay_steps", f"must be at least 1, got {self.lr_decay_steps}"))
        if self.threads is not None and self.threads < 1:
            raise ValueError(("threads", f"must be at least 1, got {self.threads}"))
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"))
        if self.sample_temperature < 0:
            raise ValueError(("sample_temperature", "must not be negative"))

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr


@dataclasses.dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: Optional[str] = None  # MLflow experiment name; None: the experiment file's stem
    run_name: Optional[str] = None
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db)
    parent_run_id: Optional[str] = None  # nest this run under another (gptx sweep sets it)


@dataclasses.dataclass
class ExperimentConfig:
    model: ModelConfig
    tokenizer: ComponentSpec
    data: DataConfig
    training: TrainingConfig
    tracking: TrackingConfig
    source: Optional[Path] = None  # the experiment file, when loaded from one

    @property
    def name(self) -> str:
        return self.tracking.experiment or (self.source.stem if self.source else "default")

    @property
    def data_path(self) -> Path:
        base = self.source.parent if self.source else Path.cwd()
        return (base / os.path.expanduser(self.data.path)).resolve()

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "data": dataclasses.asdict(self.data) | {"path": str(self.data_path)},
            "training": dataclasses.asdict(self.training),
            "tracking": dataclasses.asdict(self.tracking) | {"experiment": self.name},
        }


SECTIONS = {"model": ModelConfig, "tokenizer": None, "data": DataConfig, "training": TrainingConfig, "tracking": TrackingConfig}


# ---- loading ---------------------------------------------------------------------------------

def read_toml(path: Path) -> dict:
    """Parse a TOML file; a missing, unreadable or malformed file is a ConfigError naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not an experiment file", file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", file=str(path)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as TOML, or the raw string if it is not TOML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected KEY.PATH=VALUE, got {item!r}", file="--set")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as rope: take it as a string
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """The file's dict with overrides applied, and {dotted key: original item} for error messages."""
    raw = copy.deepcopy(raw)
    origin: dict[str, str] = {}
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"'{'.'.join(path[: i + 1])}' is a value, not a table", ".".join(path), "--set")
            node = child
        node[path[-1]] = value
        origin[".".join(path)] = item
    return raw, origin


def load_experiment(path: str | os.PathLike, overrides: list[str] = (), registry=None, check_data: bool = True) -> ExperimentConfig:
    """Read, override, validate. Every problem is a ConfigError naming the file (or the --set
    item), the key path and the problem; nothing is created on disk."""
    path = Path(path)
    raw = read_toml(path)
    raw, origin = apply_overrides(raw, list(overrides))
    try:
        cfg = from_dict(raw, registry, source=path.resolve())
        if check_data:
            check_data_path(cfg)
        return cfg
    except ConfigError as err:
        key = err.key or ""  # the override that set this key, or one of its tables, is to blame
        item = next((v for k, v in origin.items() if key and (key == k or key.startswith(k + ".") or k.startswith(key + "."))), None)
        raise err.located(f"--set {item}" if item else str(path)) from None


def from_dict(raw: dict, registry=None, source: Optional[Path] = None) -> ExperimentConfig:
    """Validate a plain dict (a parsed experiment file, or a checkpoint's stored config)."""
    from gptx import registry as registry_mod

    reg = registry or registry_mod.registry()
    for section, value in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section{did_you_mean(section, SECTIONS)}", section)
        if not isinstance(value, dict):
            raise ConfigError("must be a table", section)

    model_raw = dict(raw.get("model", {}))
    slots = {slot: model_raw.pop(slot, {}) for slot in COMPONENT_SLOTS}
    model = parse(ModelConfig, model_raw, "model")
    for slot, (kind, default) in COMPONENT_SLOTS.items():
        setattr(model, slot, resolve_component(reg, kind, slots[slot], f"model.{slot}", default))
    for slot in COMPONENT_SLOTS:
        spec = getattr(model, slot)
        _check_component(spec.cls, model, spec.options, f"model.{slot}")
        if spec.placement_cls is not None:
            _check_component(spec.placement_cls, model, spec.options, f"model.{slot}")
    limit = model.positional.cls.max_positions(model, model.positional.options)
    if limit is not None and model.block_size > limit:
        raise ConfigError(
            f"{model.block_size} exceeds the {limit} positions that positional '{model.positional.kind}' supports",
            "model.block_size",
        )
    tokenizer = resolve_component(reg, "tokenizer", raw.get("tokenizer", {}), "tokenizer", DEFAULT_TOKENIZER)
    return ExperimentConfig(
        model=model,
        tokenizer=tokenizer,
        data=parse(DataConfig, raw.get("data"), "data"),
        training=parse(TrainingConfig, raw.get("training"), "training"),
        tracking=parse(TrackingConfig, raw.get("tracking"), "tracking"),
        source=source,
    )


def resolve_component(reg, kind: str, table, key: str, default: str) -> ComponentSpec:
    """``{"kind": name, **options}`` -> ComponentSpec, validated by the named component."""
    if not isinstance(table, dict):
        raise ConfigError("must be a table with a 'kind' key", key)
    table = dict(table)
    name = table.pop("kind", default)
    if not isinstance(name, str):
        raise ConfigError(f"expected a component name, got {name!r}", f"{key}.kind")
    try:
        entry = reg.get(kind, name)
    except GptxError as err:
        raise ConfigError(str(err), f"{key}.kind") from None
    spec = ComponentSpec(kind=name, options=None, cls=entry.cls)
    if kind == "norm":
        placement = table.pop("placement", DEFAULT_PLACEMENT)
        if not isinstance(placement, str):
            raise ConfigError(f"expected a placement name, got {placement!r}", f"{key}.placement")
        try:
            spec.placement_cls = reg.get("norm_placement", placement).cls
        except GptxError as err:
            raise ConfigError(str(err), f"{key}.placement") from None
        spec.placement = placement
    spec.options = parse(entry.cls.Options, table, key)
    return spec


def _check_component(cls, model: ModelConfig, options, key: str) -> None:
    try:
        cls.check(model, options)
    except ValueError as err:
        detail = err.args[0] if err.args else "incompatible with the model"
        field, problem = detail if isinstance(detail, tuple) else (None, str(detail))
        raise ConfigError(problem, f"model.{field}" if field else key) from None


def check_data_path(cfg: ExperimentConfig) -> None:
    """The data must exist and hold text; checked before anything is created."""
    p = cfg.data_path
    if not p.exists():
        raise ConfigError(f"data file not found: {p}", "data.path")
    if p.is_dir():
        if not any(f.is_file() for f in p.rglob("*.txt")):
            raise ConfigError(f"directory holds no .txt files: {p}", "data.path")
    elif p.stat().st_size == 0:
        raise ConfigError(f"data file is empty: {p}", "data.path")
