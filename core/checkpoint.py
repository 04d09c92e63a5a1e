"""Checkpoints: a directory per save, written atomically, loaded without pickle.

    <run_dir>/checkpoints/step-000500/
        model.safetensors   weights (the tied embedding stored once)
        gptx.json           format version, step, resolved config, tokenizer state
        trainer.pt          optimizer/scheduler/RNG state for --resume (tensors and numbers only,
                            read with torch.load(weights_only=True))

A save goes to a temporary sibling directory that is renamed into place only when complete, so
a crash (even kill -9) at any moment leaves the previous checkpoint intact. Loading picks the
newest complete one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from gptx import __version__
from gptx.config import ExperimentConfig, from_dict
from gptx.errors import ConfigError, GptxError, first_line, read_format_json

FORMAT = "gptx.checkpoint"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-([0-9]+)$")  # ASCII digits: int() would also read a foreign 'step-٣' folder


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: ExperimentConfig
    model: Any  # gptx.model.GPT
    tokenizer: Any  # gptx.components.Tokenizer
    meta: dict


def build_tokenizer(spec, state: Optional[dict] = None):
    return spec.cls(spec.options, state)


def save(run_dir: Path, step: int, model, config: ExperimentConfig, tokenizer, trainer_state: Optional[dict] = None,
         extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep the newest ``keep`` checkpoints.
    ``model`` is a module or its full state dict (what FSDP gathers)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # left by a save that was killed (kill -9, power loss)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
        save_file(weights_to_store(model, config), str(tmp / "model.safetensors"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gptx_version": __version__,
            "step": step,
            "config": config.to_dict(),
            "tokenizer_state": tokenizer.state(),
            # what read() checks the stored tokenizer against: a state edited by hand (a shortened
            # char vocabulary) would otherwise decode ids to the wrong characters without an error
            "tokenizer_state_sha256": state_sha256(tokenizer.state()),
            "tokenizer_vocab_size": tokenizer.vocab_size,
        } | (extra or {})
        (tmp / "gptx.json").write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            with open(tmp / "trainer.pt", "wb") as fh:  # a file object: a failed write keeps its OSError as context
                torch.save(trainer_state, fh)
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        from safetensors import SafetensorError

        # disk full, permissions, a path through a file (torch.save says so as a RuntimeError)
        if isinstance(err, (OSError, SafetensorError, RuntimeError)):
            kept = complete_checkpoints(root)
            reason = _reason(err)
            raise GptxError(
                f"{root}: cannot write checkpoint step-{step:06d} ({reason}); "
                + (f"the previous checkpoint {kept[-1]} is intact" if kept else "there is no earlier checkpoint")
            ) from None
        raise
    for old in complete_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def state_sha256(state: dict) -> str:
    """sha256 of a tokenizer state as gptx.json stores it. The state alone: the options are checked
    as config, and a later gptx adding an option with a default must still read old checkpoints."""
    import hashlib

    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _reason(err: BaseException) -> str:
    """The OS's word for a failed write (torch.save hides it behind a RuntimeError's context)."""
    e = err
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed out of the step-* namespace first, so a kill in the
    middle never leaves a half-deleted step-* directory (the leftover .step-* is cleaned later)."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TIED_KEY = "lm_head.weight"  # the output matrix when it is the token embedding: stored once, as wte.weight


def weights_to_store(model, config: ExperimentConfig) -> dict[str, torch.Tensor]:
    sd = model if isinstance(model, dict) else _unwrap(model).state_dict()
    drop = {TIED_KEY} if config.model.tie_embeddings else set()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k not in drop}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint directory; a damaged file is a GptxError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise GptxError(f"{path}: missing model.safetensors")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as err:
        raise GptxError(f"{f}: corrupted or unreadable ({err})") from None


def _unwrap(model):
    """The plain module under DDP / torch.compile wrappers, so keys never carry their prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def complete_checkpoints(root: Path) -> list[Path]:
    """step-* directories that were fully written, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve(source: str | os.PathLike) -> Path:
    """A checkpoint directory from: a step directory, a run directory (its newest checkpoint), a
    checkpoints/ directory, or an MLflow run URI ``runs:/<run_id>`` (its logged checkpoint)."""
    src = str(source)
    if src.startswith("runs:/"):
        return _download_run_checkpoint(src)
    p = Path(src)
    if os.path.lexists(p / "gptx.json"):  # read() says what is wrong with one that is not a file
        return p
    for root in (p / "checkpoints", p):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    if not p.exists():
        raise GptxError(f"{p}: no such checkpoint directory")
    raise GptxError(f"{p}: not a gptx checkpoint (no gptx.json, no checkpoints/step-* inside)")


def _download_run_checkpoint(uri: str) -> Path:
    from gptx import tracking

    return tracking.download_checkpoint(uri)


def read_meta(path: Path) -> dict:
    """A checkpoint's gptx.json, validated whole (see ``read``)."""
    return read(path)[0]


def read(path: Path) -> tuple[dict, ExperimentConfig]:
    """gptx.json and the experiment config it stores, validated whole before use: its fields
    (gptx.schemas.CheckpointMeta), the config (as an experiment file is), the tokenizer state (the
    tokenizer's own schema) and, where the checkpoint records them, the state's hash and the
    tokenizer's size (``load`` compares that one with the tokenizer it builds).
    Any problem is a GptxError ``PATH: key: problem``."""
    from gptx.schemas import CheckpointMeta, tokenizer_state, validate

    where = Path(path) / "gptx.json"
    meta = read_format_json(where, FORMAT, FORMAT_VERSION, "gptx checkpoint")
    validate(CheckpointMeta, meta, where)
    try:
        config = from_dict(meta["config"])
    except ConfigError as err:
        key = f"config.{err.key}" if err.key else "config"
        raise GptxError(f"{where}: {key}: {err.problem}") from None
    state = tokenizer_state(config.tokenizer.cls, meta.get("tokenizer_state"), where, "tokenizer_state")
    if meta.get("tokenizer_state_sha256") not in (None, state_sha256(state)):
        raise GptxError(f"{where}: tokenizer_state_sha256: does not match tokenizer_state (altered)")
    return meta, config


def read_with_tokenizer(path: Path) -> tuple[dict, ExperimentConfig, Any]:
    """``read(path)`` and the tokenizer the checkpoint stores, rebuilt and checked against its
    recorded size, without the weights. Any problem is a GptxError."""
    meta, config = read(path)
    where = Path(path) / "gptx.json"
    try:
        tokenizer = build_tokenizer(config.tokenizer, meta.get("tokenizer_state") or None)
        vocab = tokenizer.vocab_size
    except GptxError:
        raise
    except Exception as err:  # a tampered state the tokenizer cannot rebuild from
        raise GptxError(f"{where}: corrupted tokenizer_state ({type(err).__name__}: {err})") from None
    if meta.get("tokenizer_vocab_size") not in (None, vocab):
        raise GptxError(f"{where}: tokenizer_vocab_size: {meta['tokenizer_vocab_size']}, but the stored tokenizer has {vocab} tokens")
    return meta, config, tokenizer


def load(source: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild config, tokenizer and model from a checkpoint; every problem is a GptxError."""
    from gptx.model import GPT

    path = resolve(source)
    meta, config, tokenizer = read_with_tokenizer(path)
    where, vocab = path / "gptx.json", tokenizer.vocab_size
    if config.model.vocab_size is None:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise GptxError(f"{where}: config.model.vocab_size: {config.model.vocab_size} is smaller than its tokenizer's {vocab}")
    model = GPT(config.model)
    try:
        weights = load_weights(path)
        if config.model.tie_embeddings and "wte.weight" not in weights and TIED_KEY in weights:
            weights["wte.weight"] = weights.pop(TIED_KEY)  # the shared matrix stored under its other name
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        raise GptxError(f"{path / 'model.safetensors'}: does not fit the model its config describes "
                        f"({lines[1] if len(lines) > 1 else err})") from None
    missing = set(missing) - ({TIED_KEY} if config.model.tie_embeddings else set())
    if missing or unexpected:
        raise GptxError(f"{path / 'model.safetensors'}: does not fit the model its config describes "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    broken = next((name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:  # a diverged or damaged run: generating from it would be garbage
        raise GptxError(f"{path / 'model.safetensors'}: weights are not finite (NaN or infinity in {broken}); "
                        "use an earlier checkpoint")
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError) as err:  # e.g. a CUDA device this machine does not have
        raise GptxError(f"--device: cannot use {device} here ({first_line(err) or type(err).__name__})") from None
    return Checkpoint(path=path, config=config, model=model, tokenizer=tokenizer, meta=meta)


def load_trainer_state(path: Path) -> Optional[dict]:
    f = Path(path) / "trainer.pt"
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupted, or a pickle that is more than tensors and numbers
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # weights_only names the type it refused
        if found is None:
            raise GptxError(f"{f}: cannot be loaded safely ({type(err).__name__}: {first_line(err)})") from None
        raise GptxError(f"{f}: cannot be loaded safely: it holds a {found.group(1)}, which gptx does not unpickle "
                        "(weights_only); an optimizer's or dataset's state_dict must hold only tensors, numbers, "
                        "strings, lists and dicts") from None
    from gptx.schemas import TrainerState, validate

    validate(TrainerState, state, f)  # every field --resume reads, before any of it is used
    return state
