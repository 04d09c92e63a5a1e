"""Experiment configuration: TOML in, a validated, typed ``ExperimentConfig`` out.

The file stores component *names* plus their options (as litgpt does): every kind in
``gptx.kinds.KINDS`` has its table (``[model.attention]``, ``[training.optimizer]``,
``[data]``, ...) holding ``kind = "<name>"`` and that component's own options. Names resolve to
classes through the plugin registry at load time, and each component validates its own options.
A resolved config turns back into plain data (``to_dict``) for checkpoints and MLflow params.

Precedence: ``--set key.path=value`` > the file > the defaults below. Keys that moved to a
component's table in gptx 0.2 (``training.beta1`` -> ``training.optimizer.beta1``, ...) are
read at their new place, with a note.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from gptx.errors import ConfigError, GptxError
from gptx.numeric import int_or_none
from gptx.kinds import KINDS, Kind
from gptx.options import did_you_mean, fields_of, option, parse, to_dict

MAX_SEED = 2**63 - 1


@dataclasses.dataclass
class ComponentSpec:
    """A resolved component choice: its registered name (the table's ``kind`` key, e.g.
    ``"rope"``), the class it names, its parsed options, and the registry entries its options name
    (an option with ``metadata={"kind": ...}``, e.g. a placement): option name -> ``gptx.registry.Entry``."""

    name: str
    options: Any
    cls: type = dataclasses.field(repr=False, compare=False, default=None)
    refs: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def kind(self) -> str:
        """The old name of ``name`` (a kind is attention, ffn, ...; this is the component's name)."""
        import warnings

        warnings.warn("ComponentSpec.kind is now ComponentSpec.name", DeprecationWarning, stacklevel=2)
        return self.name

    def to_dict(self) -> dict:
        return {"kind": self.name} | to_dict(self.options)


def _spec_field():
    return dataclasses.field(default=None, metadata={"component": True})


def component_slots(section: str):
    """One ``ComponentSpec`` field per kind chosen in a ``[<section>.<kind>]`` table, taken from
    ``KINDS``: a new kind needs no edit here. The loader fills them (``from_dict``)."""
    def add_fields(cls):
        for kind in KINDS:
            if kind.path[:1] == (section,) and len(kind.path) == 2:
                cls.__annotations__[kind.path[1]] = "Optional[ComponentSpec]"
                setattr(cls, kind.path[1], _spec_field())
        return cls
    return add_fields


@dataclasses.dataclass
@component_slots("model")
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the longest context the model is trained (and allowed) to see
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    dropout: float = option(0.0, low=0, high=1, high_open=True)
    bias: bool = True  # biases in linear layers, as GPT-2 (a norm's own bias is its option)
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix, as GPT-2
    # + one field per [model.<kind>] table (attention, positional, ffn, norm, block): component_slots

    def __post_init__(self):
        for name, most in (("n_layer", 4096), ("n_head", 4096), ("n_embd", 1 << 20), ("block_size", 1 << 24)):
            check_range(name, getattr(self, name), 1, most)
        if self.n_embd % self.n_head:
            raise ValueError(("n_embd", f"{self.n_embd} is not divisible by n_head = {self.n_head}"))
        if self.vocab_size is not None:
            check_range("vocab_size", self.vocab_size, 1, 1 << 24)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def components(self) -> list[tuple[str, ComponentSpec]]:
        """(table, spec) of every component of the model: model.attention, ..., model.block."""
        return [(k.table, getattr(self, k.path[1])) for k in KINDS if k.path[:1] == ("model",)]

    def classes(self) -> list[tuple[str, str, type]]:
        """(key, name, class) of every class the model is built from: its components and the
        components their options name (the block's placement)."""
        out = []
        for table, spec in self.components():
            out.append((f"{table}.kind", spec.name, spec.cls))
            out += [(f"{table}.{field}", ref.name, ref.cls) for field, ref in spec.refs.items()]
        return out

    def to_dict(self) -> dict:
        return _section_dict(self)


@dataclasses.dataclass
@component_slots("training")
class TrainingConfig:
    max_steps: int = 1000
    batch_size: int = 12  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the global batch, across all ranks)
    learning_rate: float = option(6e-4, low=0, high=10, low_open=True)  # peak learning rate (every group of adamw; muon's non-matrix groups)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_steps: int = 20  # batches per validation estimate
    final_eval_tokens: int = 1_000_000  # after the last step: val loss over the validation split, tiled (0: skip)
    log_interval: int = 10
    checkpoint_interval: Optional[int] = None  # None: every eval_interval
    seed: int = 1337
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"  # bfloat16: autocast on CPU and CUDA; auto: bf16 on CUDA, fp32 on CPU (measured faster there)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto: cuda when present, else cpu
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    threads: Optional[int] = None  # torch intra-op threads on CPU; None: the CPUs free, following the load (gptx.threads)
    out_dir: str = "runs"  # run directories go to <out_dir>/<experiment>/<run>; relative to the working directory
    init_from: Optional[str] = None  # start from these weights: a checkpoint or run directory (relative to the file), runs:/<id>, or gptx import-hf output
    init_partial: bool = False  # with init_from: load the tensors that fit, start the rest from random init (said on one line); false: refuse unless every tensor fits
    target_val_loss: Optional[float] = None  # record steps/tokens/seconds to the first evaluation at or below it
    stop_at_target: bool = False  # and end the run there (needs target_val_loss)
    sample_prompt: str = "\n"
    sample_tokens: int = 200  # tokens generated at the end of the run (0: none)
    sample_temperature: float = option(0.8, low=0, high=1e4)  # gptx generate's --temperature range
    sample_top_k: Optional[int] = 200
    # + one field per [training.<kind>] table (optimizer, schedule): component_slots

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_steps", "log_interval"):
            check_range(name, getattr(self, name), 1, 1 << 40)
        for name in ("sample_tokens", "final_eval_tokens"):
            check_range(name, getattr(self, name), 0, 1 << 40)
        if self.grad_clip < 0:
            raise ValueError(("grad_clip", f"must not be negative (0 disables clipping), got {self.grad_clip}"))
        if self.checkpoint_interval is not None:
            check_range("checkpoint_interval", self.checkpoint_interval, 1, 1 << 40)
        check_range("seed", self.seed, 0, MAX_SEED)
        if self.threads is not None:
            check_range("threads", self.threads, 1, 4096)
        if not _valid_device(self.device):
            raise ValueError(("device", f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}"))
        if self.sample_temperature < 0:
            raise ValueError(("sample_temperature", f"must not be negative (0 is greedy), got {self.sample_temperature}"))
        if self.sample_top_k is not None:
            check_range("sample_top_k", self.sample_top_k, 1, 1 << 24)
        if self.target_val_loss is not None and not self.target_val_loss > 0:
            raise ValueError(("target_val_loss", f"must be positive, got {self.target_val_loss}"))
        if self.stop_at_target and self.target_val_loss is None:
            raise ValueError(("stop_at_target", "needs training.target_val_loss"))
        if self.init_partial and not self.init_from:
            raise ValueError(("init_partial", "needs training.init_from (the weights to load in part)"))

    def to_dict(self) -> dict:
        return _section_dict(self)


def check_range(name: str, value, low, high) -> None:
    """Raise the loader's ``ValueError((name, problem))`` unless low <= value <= high."""
    if value < low:
        raise ValueError((name, f"must be at least {low:,}, got {value}"))
    if value > high:
        raise ValueError((name, f"must be at most {high:,}, got {value}"))


def _valid_device(device: str) -> bool:
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu", "mps", "cuda"):
        return True
    return kind == "cuda" and index[:1].isascii() and index[:1].isdigit() and int_or_none(index, 0, 9999) is not None


@dataclasses.dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: Optional[str] = None  # MLflow experiment name; None: the experiment file's stem
    run_name: Optional[str] = None
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db)
    parent_run_id: Optional[str] = None  # nest this run under another (gptx sweep sets it)

    def __post_init__(self):
        from gptx.fsutil import path_name_problem

        for name in ("experiment", "run_name"):  # each names a folder: <out_dir>/<experiment>/<run_name>
            value = getattr(self, name)
            problem = path_name_problem(value) if value is not None else None
            if problem is None and value is not None and len(value) > 200:
                problem = "must be at most 200 characters"
            if problem:
                raise ValueError((name, f"{problem}, got {value[:60]!r}{'...' if len(value) > 60 else ''}"))


@dataclasses.dataclass
class ExperimentConfig:
    model: ModelConfig
    tokenizer: ComponentSpec
    data: ComponentSpec
    training: TrainingConfig
    tracking: TrackingConfig
    source: Optional[Path] = None  # the experiment file, when loaded from one
    notes: list[str] = dataclasses.field(default_factory=list, compare=False)  # moved keys read at their new place
    explicit: frozenset = dataclasses.field(default=frozenset(), compare=False)  # dotted keys the file or --set wrote

    @property
    def name(self) -> str:
        return self.tracking.experiment or (self.source.stem if self.source else "default")

    @property
    def base_dir(self) -> Path:
        """What paths in the file are relative to: the file's folder."""
        return self.source.parent if self.source else Path.cwd()

    def component(self, kind: Kind) -> ComponentSpec:
        node = self
        for part in kind.path:
            node = getattr(node, part)
        return node

    def components(self) -> list[tuple[Kind, ComponentSpec]]:
        """Every configured component with its kind (the kinds chosen in a table)."""
        return [(k, self.component(k)) for k in KINDS if k.table]

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "data": self.data.to_dict(),
            "training": self.training.to_dict(),
            "tracking": dataclasses.asdict(self.tracking) | {"experiment": self.name},
        }


def _section_dict(section) -> dict:
    """A config section as plain data; its component specs as their tables."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("component"):
            if value is not None:
                out[f.name] = value.to_dict()
        else:
            out[f.name] = value
    return out


SECTIONS = {"model": ModelConfig, "tokenizer": None, "data": None, "training": TrainingConfig, "tracking": TrackingConfig}

# keys that moved into a component's table: old dotted key -> new dotted key
MOVED = {
    "training.beta1": "training.optimizer.beta1",
    "training.beta2": "training.optimizer.beta2",
    "training.weight_decay": "training.optimizer.weight_decay",
    "training.warmup_steps": "training.schedule.warmup_steps",
    "training.min_lr": "training.schedule.min_lr",
    "training.lr_decay_steps": "training.schedule.decay_steps",
    "model.norm.placement": "model.block.placement",
}


# ---- loading ---------------------------------------------------------------------------------

MAX_EXPERIMENT_BYTES = 4 << 20  # an experiment file is a few KB; anything this big is a wrong path


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a missing, unreadable, special or malformed file is a ConfigError naming it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError("no such file", file=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError("is a directory, not an experiment file", file=str(path))
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise ConfigError("is not a regular file", file=str(path))
    if st.st_size > MAX_EXPERIMENT_BYTES:
        raise ConfigError(f"is {st.st_size:,} bytes; an experiment file is a small TOML file", file=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=str(path)) from None
    return parse_toml(text, str(path))


def parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", file=where) from None
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply", file=where) from None


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
    except RecursionError:
        raise ConfigError(f"value nested too deeply in {item!r}", file="--set") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """The file's dict with overrides applied, and {dotted key: original item} for error messages."""
    raw = copy.deepcopy(raw)
    origin: dict[str, str] = {}
    for item in overrides:
        path, value = parse_override(item)
        path = MOVED.get(".".join(path), ".".join(path)).split(".")
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"'{'.'.join(path[: i + 1])}' is a value, not a table", ".".join(path), "--set")
            node = child
        node[path[-1]] = value
        origin[".".join(path)] = item
    return raw, origin


def migrate(raw: dict) -> tuple[dict, list[str], dict[str, str]]:
    """Keys of older files at their new place: (raw, notes, {new key: old key})."""
    raw = copy.deepcopy(raw)
    notes, moved = [], {}
    for old, new in MOVED.items():
        *old_table, old_key = old.split(".")
        table = _get(raw, old_table)
        if not isinstance(table, dict) or old_key not in table:
            continue
        *new_table, new_key = new.split(".")
        target = _get(raw, new_table, create=True)
        if not isinstance(target, dict):
            raise ConfigError(f"moved to {new}, but {'.'.join(new_table)} is not a table", old)
        if new_key in target:
            raise ConfigError(f"is now {new}, which is also set; remove {old}", old)
        target[new_key] = table.pop(old_key)
        notes.append(f"{old} is now {new} (read as that; update the file)")
        moved[new] = old
    return raw, notes, moved


def _get(raw: dict, path: list[str], create: bool = False):
    node = raw
    for part in path:
        if not isinstance(node, dict):
            return None
        if part not in node:
            if not create:
                return None
            node[part] = {}
        node = node[part]
    return node


def load_experiment(path: str | os.PathLike, overrides: list[str] = (), registry=None, check_data: bool = True) -> ExperimentConfig:
    """Read, override, validate. Every problem is a ConfigError naming the file (or the --set
    item), the key path and the problem; nothing is created on disk."""
    path = Path(path)
    return experiment_from(read_toml(path), path, overrides, registry, check_data)


def experiment_from(raw: dict, path: Path, overrides: list[str] = (), registry=None,
                    check_data: bool = True) -> ExperimentConfig:
    """``load_experiment`` of an experiment already parsed: ``raw`` as if read from ``path`` (what
    its paths are relative to, and what errors not caused by a --set item name)."""
    origin: dict[str, str] = {}
    moved: dict[str, str] = {}
    try:
        raw, notes, moved = migrate(raw)
        raw, origin = apply_overrides(raw, list(overrides))
        kind_set = {k.rsplit(".", 1)[0] for k in origin if k.endswith(".kind")}
        cfg = from_dict(raw, registry, source=path.resolve(), kind_set=kind_set, set_keys=set(origin), notes=notes)
        cfg.explicit = frozenset(_dotted_keys(raw))
        check_name_from_file(cfg)
        start = cfg.training.init_from
        if "training.init_from" in origin and start and not start.startswith("runs:/"):  # typed in the current folder
            cfg.training = dataclasses.replace(cfg.training, init_from=str(Path(os.path.expanduser(start)).absolute()))
        if check_data:
            check_paths(cfg)
        return cfg
    except ConfigError as err:
        raise _locate(err, path, origin, moved) from None


def check_name_from_file(cfg: ExperimentConfig) -> None:
    """Without tracking.experiment the file's stem names the experiment's folder: a file named
    '...toml' (stem '..') must not put runs beside training.out_dir."""
    from gptx.fsutil import path_name_problem

    problem = path_name_problem(cfg.name) if cfg.tracking.experiment is None else None
    if problem:
        raise ConfigError(f"the file name {cfg.name!r} names the experiment's folder and {problem}; "
                          "set tracking.experiment", "tracking.experiment")


def _locate(err: ConfigError, path: Path, origin: dict[str, str], moved: dict[str, str]) -> ConfigError:
    """Name the --set item that set the key (or one of its tables), else the file; a key that
    moved is named as the file wrote it too."""
    key = err.key or ""
    item = next((v for k, v in origin.items() if key and (key == k or key.startswith(k + ".") or k.startswith(key + "."))), None)
    if item is None and key in moved:
        err = ConfigError(f"{err.problem} (written as {moved[key]})", key)
    return err.located(f"--set {item}" if item else str(path))


def from_dict(raw: dict, registry=None, source: Optional[Path] = None, kind_set: set[str] = frozenset(),
              set_keys: set[str] = frozenset(), notes: Optional[list[str]] = None) -> ExperimentConfig:
    """Validate a plain dict (a parsed experiment file, or a checkpoint's stored config).
    ``kind_set``: tables whose ``kind`` the command line changed: their options from the file
    that the new kind does not have are dropped (with a note) unless ``set_keys`` set them."""
    from gptx import registry as registry_mod

    reg = registry or registry_mod.registry()
    notes = notes if notes is not None else []
    for section, value in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section{did_you_mean(section, SECTIONS)}", section)
        if not isinstance(value, dict):
            raise ConfigError("must be a table", section)
    if any(k in MOVED for k in _dotted_keys(raw)):  # a stored config of an older gptx
        raw = migrate(raw)[0]
    raw = copy.deepcopy(raw)
    specs = {}
    base_dir = source.parent if source else Path.cwd()
    for kind in KINDS:
        if kind.table is None:
            continue
        *parent, key = kind.path
        container = _get(raw, parent, create=True) if parent else raw
        table = container.pop(key, {})
        specs[kind.name] = resolve_component(reg, kind, table, base_dir, kind.table in kind_set, set_keys, notes)
    model = parse(ModelConfig, raw.get("model"), "model")
    training = parse(TrainingConfig, raw.get("training"), "training")
    tracking = parse(TrackingConfig, raw.get("tracking"), "tracking")
    cfg = ExperimentConfig(model=model, tokenizer=specs["tokenizer"], data=specs["dataset"], training=training,
                           tracking=tracking, source=source, notes=notes)
    for kind in KINDS:
        if kind.table is not None and kind.path[0] in ("model", "training"):
            setattr(getattr(cfg, kind.path[0]), kind.path[1], specs[kind.name])
    for kind, spec in cfg.components():
        context = cfg.training if kind.checked_with == "training" else cfg.model
        _check_component(spec.cls, context, spec.options, kind)
        for ref in spec.refs.values():
            _check_component(ref.cls, context, spec.options, kind)
    limit = model.positional.cls.max_positions(model, model.positional.options)
    if limit is not None and model.block_size > limit:
        raise ConfigError(
            f"{model.block_size} exceeds the {limit} positions that positional '{model.positional.name}' supports",
            "model.block_size",
        )
    return cfg


def _dotted_keys(raw: dict, prefix: str = ""):
    for k, v in raw.items():
        yield prefix + k
        if isinstance(v, dict):
            yield from _dotted_keys(v, prefix + k + ".")


def resolve_component(reg, kind: Kind, table, base_dir: Path, kind_changed: bool = False,
                      set_keys: set[str] = frozenset(), notes: Optional[list[str]] = None) -> ComponentSpec:
    """``{"kind": name, **options}`` -> ComponentSpec, validated by the named component; options
    that name other components are resolved too, and path options made absolute."""
    key = kind.table
    if not isinstance(table, dict):
        raise ConfigError("must be a table with a 'kind' key", key)
    table = dict(table)
    name = table.pop("kind", kind.default)
    if not isinstance(name, str):
        raise ConfigError(f"expected a component name, got {name!r}", f"{key}.kind")
    try:
        entry = reg.get(kind.name, name)
    except GptxError as err:
        raise ConfigError(str(err), f"{key}.kind") from None
    fields = fields_of(entry.cls.Options)
    if kind_changed:  # the command line chose another kind: the file's options of the old one go
        dropped = [k for k in table if k not in fields and f"{key}.{k}" not in set_keys]
        for k in dropped:
            del table[k]
        if dropped and notes is not None:
            notes.append(f"{key}: {name} has no option {', '.join(dropped)}; dropped the file's value"
                         f"{'s' if len(dropped) > 1 else ''} (replace the whole table with --set '{key}={{kind=\"{name}\"}}')")
    options = parse(entry.cls.Options, table, key)
    refs = {}
    for f in fields.values():
        value = getattr(options, f.name)
        if f.metadata.get("kind") and value is not None:
            try:
                refs[f.name] = reg.get(f.metadata["kind"], value)
            except GptxError as err:
                raise ConfigError(str(err), f"{key}.{f.name}") from None
        if f.metadata.get("path") and isinstance(value, str):  # from --set: typed in the current folder
            base = Path.cwd() if f"{key}.{f.name}" in set_keys else base_dir
            absolute = str((base / os.path.expanduser(value)).absolute())
            options = dataclasses.replace(options, **{f.name: absolute})
    return ComponentSpec(name=name, options=options, cls=entry.cls, refs=refs)


def _check_component(cls, context, options, kind: Kind) -> None:
    try:
        cls.check(context, options)
    except ValueError as err:
        detail = err.args[0] if err.args else "incompatible with the model"
        field, problem = detail if isinstance(detail, tuple) else (None, str(detail))
        section = "training" if kind.checked_with == "training" else "model"
        raise ConfigError(problem, f"{section}.{field}" if field else kind.table) from None


def check_paths(cfg: ExperimentConfig) -> None:
    """Every path a component's options name must exist (the data, first of all); the deep
    checks of the data (readable, text, long enough) run when the dataset is prepared."""
    for kind, spec in cfg.components():
        for f in fields_of(type(spec.options)).values():
            value = getattr(spec.options, f.name)
            if f.metadata.get("path") and isinstance(value, str) and not Path(value).exists():
                what = "data file" if kind.name == "dataset" else "file"
                raise ConfigError(f"{what} not found: {value}", f"{kind.table}.{f.name}")
