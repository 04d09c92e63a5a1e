"""Everything a run checks before anything is created: ``plan_run(cfg)`` returns the Plan the
Trainer runs (device, tokenizer, data, the run to resume or the weights to start from)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from gptx import checkpoint as ckpt
from gptx import runs
from gptx.config import ExperimentConfig, from_dict
from gptx.errors import ConfigError, GptxError, first_line
from gptx.numeric import env_int
from gptx.training.machine import allocating, keep_freed_memory_wanted, pick_device, resolve_dtype
from gptx.training.step import BatchSplit, build_optimizer, build_schedule


@dataclasses.dataclass
class Plan:
    """What ``plan_run`` checked and built; the Trainer starts from it."""

    cfg: ExperimentConfig
    device: torch.device
    tokenizer: object
    dataset: object
    resume_dir: Optional[Path] = None
    init_from: Optional[Path] = None  # the checkpoint the weights start from
    init_weights: Optional[dict] = None  # init_from's tensors that fit the model (the Trainer loads them)
    init_not_loaded: str = ""  # with training.init_partial: what init_from did not cover ("" when it covered all)
    run_dir: Optional[Path] = None  # a new, empty directory the caller made for the run (gptx sweep)
    lock: Optional[object] = None  # rank 0's hold on resume_dir (runs.lock_run_dir): this process alone writes there


def plan_run(cfg: ExperimentConfig, resume: bool | Path = False, progress=None, outputs: bool = True) -> Plan:
    """Every check a run makes on its input, before anything is created: device, batch split,
    the run to resume or the weights to start from, tokenizer, data (read and tokenized here),
    the sample prompt, the memory the model needs and (``outputs``) where it writes: the output
    directory and the tracking store. ``gptx validate`` runs exactly this. Problems are
    ConfigErrors naming the key. What it resolves (the dtype, the vocabulary size, a model taken
    from training.init_from or the resumed run) goes into the Plan's own copy of the config,
    ``plan.cfg``: ``cfg`` itself is never changed."""
    from gptx import tracking

    cfg = copy.deepcopy(cfg)
    tc = cfg.training
    device = pick_device(tc)
    keep_freed_memory_wanted()  # a bad $GPTX_KEEP_FREED_MEMORY fails here, before anything is written
    tc.dtype = resolve_dtype(tc.dtype, device)  # the resolved choice is what checkpoints and MLflow record
    world = env_int("WORLD_SIZE", 1, 1)
    BatchSplit.plan(tc, 0, world)
    if world > 1 and tc.parallel == "fsdp" and not tc.optimizer.cls.sharded_ok:
        raise ConfigError(f"'{tc.optimizer.name}' cannot update FSDP-sharded parameters; use training.parallel = "
                          "\"ddp\" or another optimizer", "training.optimizer.kind")
    main = env_int("RANK", 0) == 0
    if isinstance(resume, Path):  # a run directory named by the caller (gptx sweep --resume)
        resume_dir, lock = resume, (runs.lock_run_dir(resume, "--resume") if main else None)
    else:
        resume_dir, lock = runs.find_resumable(cfg, ckpt.complete_checkpoints, lock=main) if resume else (None, None)
    source = _apply_init_from(cfg) if tc.init_from else None  # the model and tokenizer, resumed or not
    tokenizer_state = ckpt.read_meta(source).get("tokenizer_state") or None if source else None
    if resume_dir:
        tokenizer_state = _resume_checks(cfg, resume_dir)
    init_from = source if resume_dir is None else None  # the weights: a resumed run has its own
    tokenizer = ckpt.build_tokenizer(cfg.tokenizer, tokenizer_state)
    dataset = cfg.data.cls(cfg.data.options, base_dir=cfg.base_dir, tokenizer=tokenizer, block_size=cfg.model.block_size,
                           seed=tc.seed, progress=progress)
    dataset.prepare()
    tokenizer = dataset.tokenizer  # fitted, or taken from the prepared shards' manifest
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}", "model.vocab_size")
    if tc.sample_tokens:
        try:
            tokenizer.encode(tc.sample_prompt)
        except GptxError as err:
            raise ConfigError(f"{err}; choose a prompt the tokenizer can encode (or sample_tokens = 0)",
                              "training.sample_prompt") from None
    check_memory(cfg, device)
    init_weights, not_loaded = _init_weights(cfg, init_from) if init_from is not None else (None, "")
    check_buildable(cfg)
    if outputs:
        runs.check_writable(cfg)
        if cfg.tracking.enabled:
            tracking.check_store(tracking.store_uri(cfg.tracking.uri))  # the run starts MLflow in the background
    return Plan(cfg, device, tokenizer, dataset, resume_dir, init_from, init_weights, not_loaded, lock=lock)


def _resume_checks(cfg: ExperimentConfig, resume_dir: Path) -> Optional[dict]:
    """The run to resume must have the file's model and tokenizer; returns its tokenizer state."""
    meta = ckpt.read_meta(ckpt.complete_checkpoints(resume_dir / "checkpoints")[-1])
    stored = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    stored = from_dict(stored).to_dict() if stored else {}
    mine = cfg.to_dict()
    if stored.get("model", {}) | {"vocab_size": None} != mine["model"] | {"vocab_size": None}:
        raise GptxError(f"--resume: {resume_dir} was trained with another model config; start a new run instead")
    if stored.get("tokenizer") != mine["tokenizer"]:
        raise GptxError(f"--resume: {resume_dir} was trained with tokenizer {stored.get('tokenizer')}, the file says "
                        f"{mine['tokenizer']}; start a new run instead")
    if isinstance(stored.get("model", {}).get("vocab_size"), int):
        cfg.model.vocab_size = stored["model"]["vocab_size"]
    return meta.get("tokenizer_state") or None


def _apply_init_from(cfg: ExperimentConfig) -> Path:
    """``training.init_from``: the model (and tokenizer) come from the source checkpoint; a
    ``[model]`` or ``[tokenizer]`` key the file sets to something else is an error naming it."""
    from gptx import tracking

    source = cfg.training.init_from
    if tracking.run_id_of(source) is None:
        source = str((cfg.base_dir / os.path.expanduser(source)).resolve())
    try:
        path = ckpt.resolve(source)
        meta = ckpt.read_meta(path)
        stored = from_dict(meta["config"])
    except (GptxError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot start from {cfg.training.init_from}: {err}", "training.init_from") from None
    for section in ("model", "tokenizer"):
        theirs = stored.to_dict()[section]
        for key in sorted(k for k in cfg.explicit if k.startswith(section + ".")):
            name = key.split(".", 1)[1]
            mine = _lookup(cfg.to_dict()[section], name)
            if mine != _lookup(theirs, name):
                raise ConfigError(f"is {mine!r} in the file, but training.init_from's model has {_lookup(theirs, name)!r}; "
                                  f"remove it (the {section} comes from {path})", key)
    cfg.model, cfg.tokenizer = stored.model, stored.tokenizer
    return path


def _init_weights(cfg: ExperimentConfig, source: Path) -> tuple[dict, str]:
    """training.init_from's tensors that fit the model (same name, same shape) and, with
    training.init_partial, one line saying what they leave at random init. Without it, weights
    that do not cover the whole model are refused (a ConfigError naming what differs): a run must
    not silently train from a half-random start. Checked before anything is created."""
    weights = ckpt.load_weights(source)
    if cfg.model.tie_embeddings and "wte.weight" not in weights and ckpt.TIED_KEY in weights:
        weights["wte.weight"] = weights.pop(ckpt.TIED_KEY)  # the shared matrix stored under its other name
    expected = _state_shapes(cfg)
    if cfg.model.tie_embeddings:
        expected.pop(ckpt.TIED_KEY, None)  # the token embedding: stored (and loaded) once
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    other_shape = sorted(k for k in set(weights) & set(expected) if tuple(weights[k].shape) != expected[k])
    file = source / "model.safetensors"
    broken = next((k for k, t in weights.items() if k in expected and t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise ConfigError(f"{file}: weights are not finite (NaN or infinity in {broken}); use an earlier checkpoint",
                          "training.init_from")
    fits = {k: t for k, t in weights.items() if k in expected and k not in other_shape}
    if not (missing or unexpected or other_shape):
        return fits, ""
    parts = [f"missing {_some(missing)}" if missing else "",
             f"unexpected {_some(unexpected)}" if unexpected else "",
             "other shape " + _some([f"{k} {list(weights[k].shape)} (model {list(expected[k])})" for k in other_shape])
             if other_shape else ""]
    what = "; ".join(filter(None, parts))
    if not cfg.training.init_partial:
        raise ConfigError(f"{file} does not fit the model ({what}); set training.init_partial = true to load the "
                          "tensors that fit and start the rest from random init", "training.init_from")
    if not fits:
        raise ConfigError(f"{file}: no tensor fits the model ({what})", "training.init_from")
    note = (f"training.init_partial: loaded {len(fits)} of {len(expected)} tensors from {file}; "
            f"random init for the rest, not loaded: {what}")
    cfg.notes.append(note)
    return fits, note


def _state_shapes(cfg: ExperimentConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor in the model's state dict, without allocating it."""
    from gptx.model import GPT

    try:
        with torch.device("meta"):
            model = GPT(cfg.model)
    except Exception:  # a component that computes on its tensors while it is built: build it for real
        model = allocating(lambda: GPT(cfg.model))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _some(names: list[str], shown: int = 3) -> str:
    """A few names and how many more: one line however many tensors differ."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)}: " + ", ".join(names[:shown]) + more


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def check_memory(cfg: ExperimentConfig, device: torch.device) -> None:
    """Refuse a model or batch that cannot fit before anything is allocated: every component's
    share (``gptx.memory``) against the device's free memory. The allocator's own refusal is the
    backstop."""
    from gptx import memory

    memory.check(cfg, cfg.training.optimizer.cls.states_per_param, memory.free_bytes(device))


def check_buildable(cfg: ExperimentConfig) -> None:
    """The model, its optimizer and schedule built on the meta device (shapes, no memory): what a
    component's own constructor refuses (torch.optim.Muon: ns_steps below 100, ...) fails here,
    in gptx validate as in gptx run, not once the run has started. Called after check_memory."""
    from gptx.memory import on_meta
    from gptx.model import GPT

    model = _built("model", lambda: GPT(cfg.model), on_meta())
    _built("training.optimizer", lambda: build_optimizer(cfg, model, torch.device("meta")))
    schedule = _built("training.schedule", lambda: build_schedule(cfg))
    _built("training.schedule", lambda: [schedule.factor(s) for s in (0, cfg.training.max_steps)])


def _built(key: str, build, context=None):
    """``build()`` (inside ``context``), its refusal a ConfigError naming ``key``."""
    try:
        with context if context is not None else contextlib.nullcontext():
            return build()
    except (ValueError, TypeError, RuntimeError, NotImplementedError, ArithmeticError) as err:
        raise ConfigError(f"cannot be built: {type(err).__name__}: {first_line(err)[:300]}", key) from None
