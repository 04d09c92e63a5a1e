"""Training: one loop for a single process and for torchrun (DDP, FSDP), CPU or CUDA.

    plan = prepare(cfg, resume)     # everything that can fail on bad input; nothing is created
    result = Trainer(plan).fit()    # the loop, then the final evaluation and a sample

The loop reads like nanoGPT's (``Trainer.fit``): set the learning rate from the schedule, take
this rank's rows of the global batch, run the step, log, evaluate, checkpoint, stop on a signal.

Determinism: the global batch of every step comes from the dataset's own generator seeded by
``training.seed`` (the same draws on every rank; each rank reads its rows), evaluation uses its
own fixed batches, and checkpoints carry optimizer, RNG and data-stream state, so a resumed run
continues the very same loss curve (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from gptx import checkpoint as ckpt
from gptx import distributed, metrics_log, runs
from gptx.config import ExperimentConfig, from_dict
from gptx.errors import ConfigError, GptxError, first_line
from gptx.numeric import env_int, parse_float, parse_int


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    train_loss: float
    val_loss: Optional[float]
    tokens_per_sec: float  # median over the run's steps (evaluation and checkpoint time excluded)
    run_id: Optional[str]
    sample: Optional[str]
    history: list[dict]  # one record per evaluation: step, train_loss, val_loss
    num_params: int = 0
    final_val_loss: Optional[float] = None  # over the tiled validation split (training.final_eval_tokens)
    best_val_loss: Optional[float] = None
    seconds: float = 0.0  # training wall clock (compile warm-up excluded)
    target: Optional[dict] = None  # steps_to_target, tokens_to_target, seconds_to_target


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ---- devices, batches, steps (shared with gptx bench) -----------------------------------------

def pick_device(tc) -> torch.device:
    if tc.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env_int("LOCAL_RANK", 0))
        return torch.device("cpu")
    dev = torch.device(tc.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("is 'cuda' but no CUDA device is available", "training.device")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"is {tc.device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)", "training.device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("is 'mps' but no Apple GPU is available", "training.device")
    return dev


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


KEEP_FREED_MEMORY = "GPTX_KEEP_FREED_MEMORY"  # 0: leave glibc's allocator as it is (see keep_freed_memory)


def keep_freed_memory_wanted() -> bool:
    """$GPTX_KEEP_FREED_MEMORY: unset or 1 applies keep_freed_memory on CPU, 0 does not (a machine
    short of memory, or a workload whose heap grows with it); anything else is an error."""
    raw = os.environ.get(KEEP_FREED_MEMORY, "1").strip()
    if raw not in ("0", "1"):
        raise GptxError(f"{KEEP_FREED_MEMORY}: expected 0 or 1, got {raw!r}")
    return raw == "1"


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU, make freed tensor memory stay with the process for the next step (Linux, glibc).

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each
    step's large tensors come back as new pages the kernel must fault in and zero. With GPT-2's
    50,257-token vocabulary the logits and their gradients are ~200 MiB each at batch 8 x 128:
    measured, 42 % of the baseline's CPU time went to the kernel, and serving every allocation from
    the heap and never trimming it (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max) ran the same
    steps 1.8-2.2x faster with bit-identical losses, for ~0.5 GB more peak RSS at batch 8 (memory freed in
    a step is kept for the next one instead of returned). Called once training is set up, after
    the data is loaded. Returns whether it applied.

    What it cannot promise: torch asks for 64-byte-aligned blocks, for which glibc 2.36 wants 96
    bytes more than a same-size block leaves free, so a process that frees and reallocates one lone
    large tensor of one size can grow its heap by that tensor every time (seen in one environment,
    not in another). Training and evaluation free many tensors together: their heaps stayed bounded
    in both environments (baseline: 1.8-3.8 GB over 40 steps, glibc trimming free tops above 2 GiB).
    GPTX_KEEP_FREED_MEMORY=0 turns it off."""
    import ctypes
    import ctypes.util

    if device.type != "cpu" or not sys.platform.startswith("linux") or not keep_freed_memory_wanted():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: leave the allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on a CUDA device that supports it, float32 elsewhere. On CPUs, even with
    native bf16 (AMX, AVX512-BF16), bf16 autocast measured no faster on the models gptx trains
    there: 0.73-0.84x fp32's tokens/s at 128 wide on AMX (autocast's casts cost more than the
    faster products save), +4 % on AVX512-BF16; ``training.dtype = "bfloat16"`` still asks for it."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def autocast_context(tc, device: torch.device):
    """bf16 autocast when ``training.dtype = "bfloat16"``, else nothing (reusable)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16" else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """Which rows of the global batch [grad_accum_steps * batch_size, T] one rank trains on, and
    in how many micro-batches. N processes train the global batch the file describes: each
    takes an equal, contiguous share of its rows, in micro-batches of at most batch_size rows
    (equal ones, so the mean of their losses is the mean over the rows; DDP and FSDP then average
    over ranks: the single process's step)."""

    micro_batches: int  # per optimizer step, on this rank
    rows_per_micro: int
    rows: range  # indices into the global batch

    @property
    def subset(self) -> Optional[range]:
        """The rows to read, or None when they are the whole batch in order (one process)."""
        return None if self.rows == range(len(self.rows)) else self.rows

    @classmethod
    def plan(cls, tc, rank: int = 0, world: int = 1) -> "BatchSplit":
        A, bs = tc.grad_accum_steps, tc.batch_size
        total = A * bs
        if total % world:
            accum = [a for a in range(1, 4 * world + 1) if a * bs % world == 0][:3]
            sizes = [b for b in range(max(1, bs - world), bs + 2 * world) if A * b % world == 0][:3]
            raise ConfigError(
                f"the global batch of grad_accum_steps x batch_size = {A} x {bs} = {total} sequences cannot be "
                f"shared evenly by {world} processes; use grad_accum_steps in {', '.join(map(str, accum))}, ... or "
                f"batch_size in {', '.join(map(str, sizes))}, ...", "training.grad_accum_steps")
        share = total // world
        rows_per_micro = _largest_divisor(share, bs)  # the largest equal micro-batch that fits
        return cls(share // rows_per_micro, rows_per_micro, range(rank * share, (rank + 1) * share))


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit``, in O(sqrt(n)) (batch sizes may be absurd
    before the memory check refuses them)."""
    if n % limit == 0:
        return limit
    best, i = 1, 1
    while i * i <= n:
        if n % i == 0:
            best = max([best] + [d for d in (i, n // i) if d <= limit])
        i += 1
    return best


class TrainStep:
    """One optimizer step on this rank's rows of the global batch: forward and backward per
    micro-batch (the model's own loss: cross-entropy + auxiliary losses), clip, optimizer step.
    Returns the cross-entropy and the auxiliary values averaged over micro-batches and ranks, as
    0-d device tensors, unsynchronised (the loop reads them in batches). ``gptx bench`` times
    this very object."""

    def __init__(self, train_model, optimizer, tc, dist, device: torch.device, split: BatchSplit):
        self.train_model, self.optimizer, self.tc, self.dist, self.split = train_model, optimizer, tc, dist, split
        self.autocast = autocast_context(tc, device)
        self.device = device
        self.params = [p for p in train_model.parameters() if p.requires_grad]
        self.foreach = device.type in ("cpu", "cuda") and not dist.sharded  # one multi-tensor norm, not one per parameter

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:  # x, y [rows, T]
        n, rows = self.split.micro_batches, self.split.rows_per_micro
        ce_sum, aux_sum = torch.zeros((), device=self.device), {}
        for m in range(n):
            xm = x[m * rows:(m + 1) * rows].to(self.device, non_blocking=True)  # [rows, T]
            ym = y[m * rows:(m + 1) * rows].to(self.device, non_blocking=True)
            with distributed.gradient_sync(self.train_model, self.dist, m == n - 1), self.autocast:
                out = self.train_model(xm, targets=ym)
            (out.loss / n).backward()
            ce_sum += out.ce.detach()
            for name, value in (out.aux | out.metrics).items():
                aux_sum[name] = aux_sum.get(name, 0.0) + value.float()
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip, foreach=self.foreach or None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = self.dist.mean(torch.stack([ce_sum, *aux_sum.values()]) / n)  # one all-reduce for all of them
        return values[0], dict(zip(aux_sum, values[1:]))


def set_lr(optimizer, factor: float) -> None:
    """Every group at ``factor`` times its peak learning rate (its ``lr`` when it was built)."""
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group["lr"] = group["peak_lr"] * factor


def build_optimizer(cfg: ExperimentConfig, model: torch.nn.Module, device: torch.device):
    spec = cfg.training.optimizer
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return spec.cls(spec.options, cfg.training).build(named, device)


def build_schedule(cfg: ExperimentConfig):
    spec = cfg.training.schedule
    return spec.cls(spec.options, cfg.training)


# ---- before anything is created ---------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What ``prepare`` checked and built; the Trainer starts from it."""

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


def prepare(cfg: ExperimentConfig, resume: bool | Path = False, progress=None, outputs: bool = True) -> Plan:
    """Every check a run makes on its input, before anything is created: device, batch split,
    the run to resume or the weights to start from, tokenizer, data (read and tokenized here),
    the sample prompt, the memory the model needs and (``outputs``) where it writes: the output
    directory and the tracking store. ``gptx validate`` runs exactly this. Problems are
    ConfigErrors naming the key."""
    from gptx import tracking

    tc = cfg.training
    device = pick_device(tc)
    keep_freed_memory_wanted()  # a bad $GPTX_KEEP_FREED_MEMORY fails here, before anything is written
    tc.dtype = resolve_dtype(tc.dtype, device)  # the resolved choice is what checkpoints and MLflow record
    world = env_int("WORLD_SIZE", 1, 1)
    BatchSplit.plan(tc, 0, world)
    if world > 1 and tc.parallel == "fsdp" and not tc.optimizer.cls.sharded_ok:
        raise ConfigError(f"'{tc.optimizer.kind}' cannot update FSDP-sharded parameters; use training.parallel = "
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
            tracking.check_store(tracking.tracking_uri(cfg.tracking.uri))
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
        model = _allocating(lambda: GPT(cfg.model))
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


# ---- signals -----------------------------------------------------------------------------------

class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second signal acts at once.
    Once the last checkpoint is written (``now``), a signal stops the run at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.checkpoint: Optional[Path] = None
        self.immediate = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def now(self, checkpoint: Optional[Path]) -> None:
        """From here on a signal raises Interrupted at once: ``checkpoint`` holds everything."""
        self.checkpoint, self.immediate = checkpoint, True
        if self.signum:
            raise Interrupted(self.signum, checkpoint)

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():
            signal.signal(s, old)
        if self.immediate:
            raise Interrupted(signum, self.checkpoint)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


# ---- progress ----------------------------------------------------------------------------------

class Progress:
    """A live status line on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, total: int, every: int, enabled: bool):
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first_step: Optional[int] = None

    def step(self, step: int, loss: float, lr: float, tok_s: float):
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.perf_counter()
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        line = f"step {step:>6}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  ETA {_hms(eta)}"
        if self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def say(self, text: str):
        if self.enabled:
            if self.tty:
                print("\r\033[K", end="", file=sys.stderr)
            print(text, file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---- the run -----------------------------------------------------------------------------------

class Trainer:
    """One training run. ``__init__`` builds the model, optimizer and schedule and restores a
    resumed run; ``fit`` runs the loop; each part of the loop is one method."""

    def __init__(self, plan: Plan, progress: bool = True):
        from gptx.model import GPT

        self.plan, self.cfg, self.tc = plan, plan.cfg, plan.cfg.training
        self.device, self.tokenizer, self.dataset = plan.device, plan.tokenizer, plan.dataset
        self.dist = distributed.setup(self.device, self.tc.parallel)
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        torch.manual_seed(self.tc.seed)
        self.model = _allocating(lambda: GPT(self.cfg.model).to(self.device))
        if plan.init_weights is not None:  # checked by prepare: each fits; a tied lm_head is stored once
            self.model.load_state_dict(plan.init_weights, strict=False)
            plan.init_weights = None  # the model holds them now
        self.train_model = distributed.wrap(self.model, self.dist, self.device)  # FSDP shards ``model`` in place
        self.optimizer = build_optimizer(self.cfg, self.model, self.device)
        self.schedule = build_schedule(self.cfg)
        self.split = BatchSplit.plan(self.tc, self.dist.rank, self.dist.world)
        self.step0, self.history, self.seconds0, self.target = 0, [], 0.0, None
        if plan.resume_dir is not None:
            self.restore(ckpt.complete_checkpoints(plan.resume_dir / "checkpoints")[-1])
        if self.tc.compile:
            self.train_model = torch.compile(self.train_model)
        self.train_step = TrainStep(self.train_model, self.optimizer, self.tc, self.dist, self.device, self.split)
        self.autocast = autocast_context(self.tc, self.device)
        keep_freed_memory(self.device)
        self.tokens_per_step = self.tc.grad_accum_steps * self.tc.batch_size * self.cfg.model.block_size
        self.show = Progress(self.tc.max_steps, self.tc.log_interval, progress and self.dist.main)
        self.stop = StopFlag()
        self.tracker = None
        self.mlflow_link: dict = {}  # mlflow_run_id and mlflow_tracking_uri for run.json and checkpoints (open)
        self.run_dir: Optional[Path] = None
        self.last_ckpt: Optional[Path] = None
        self.saved_step: Optional[int] = None
        self.error: Optional[str] = None  # why the run failed, for run.json
        self.final_val_loss: Optional[float] = None
        self.pending: list = []  # (step, loss, aux, lr, step seconds, clock) not yet read from the device
        self.step_times: list[float] = []
        self.last_train_loss = float("nan")
        self.val_loss = self.history[-1]["val_loss"] if self.history else None
        self.best_val_loss = min((h["val_loss"] for h in self.history), default=None)

    def restore(self, path: Path) -> None:
        """Weights, optimizer, data stream, RNG, step and history from a checkpoint."""
        state = ckpt.load_trainer_state(path)
        if state is None:
            raise GptxError(f"--resume: {path} has no trainer state")
        try:
            distributed.load_full_state(self.model, self.optimizer, ckpt.load_weights(path), state["optimizer"], self.dist)
            self.dataset.load_state_dict(state["dataset"])
            torch.set_rng_state(state["torch_rng"])
            self.step0 = parse_int(state["step"], f"{path / 'trainer.pt'}: step", 0)
            self.history = list(json.loads(state.get("history", "[]")))
            self.seconds0 = parse_float(state.get("seconds", 0.0), f"{path / 'trainer.pt'}: seconds", 0.0)
            self.target = json.loads(state["target"]) if state.get("target") else None
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise GptxError(f"{path / 'trainer.pt'}: corrupted or from another run ({type(err).__name__}: "
                            f"{first_line(err)})") from None

    # -- the loop --

    def fit(self) -> TrainResult:
        status = "FAILED"
        try:
            with self.stop:  # from here on a signal ends the run cleanly
                self.open()
                self.clock = time.perf_counter() - self.seconds0
                self.model.train()
                step = self.step0
                for step in range(self.step0 + 1, self.tc.max_steps + 1):
                    self.set_lr(step)
                    x, y = self.dataset.batch(self.tc.grad_accum_steps * self.tc.batch_size, self.split.subset)
                    self.run_step(step, x, y)
                    if self.due(step, self.tc.eval_interval):
                        self.evaluate(step)
                    reached = self.tc.stop_at_target and self.target is not None
                    if self.due(step, self.tc.checkpoint_interval or self.tc.eval_interval) or reached:
                        self.checkpoint(step)
                    if self.dist.agree_max(self.stop.signum or 0):  # ranks stop together, or collectives hang
                        self.interrupt(step)
                    if reached:
                        self.show.say(f"reached training.target_val_loss {self.tc.target_val_loss} at step {step}; stopping")
                        break
                sample = self.finish(step)
                status = "FINISHED"
        except Interrupted:
            status = "KILLED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except GptxError as err:
            self.error = str(err)  # run.json says why the run failed: gptx compare shows it
            raise
        finally:
            self.close(status)
        return self.result(step, sample)

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.tc.max_steps

    def set_lr(self, step: int) -> None:
        self.lr_factor = self.schedule.factor(step - 1)
        set_lr(self.optimizer, self.lr_factor)

    def run_step(self, step: int, x, y) -> None:
        t0 = time.perf_counter()
        loss, aux = _allocating(lambda: self.train_step(x, y))
        dt = time.perf_counter() - t0
        if step == self.step0 + 1 and self.tc.compile:  # the first step compiles: keep it off the clock
            self.clock += dt
        self.pending.append((step, loss, aux, self.optimizer.param_groups[0]["lr"], dt, self.seconds()))
        if self.due(step, self.tc.log_interval):
            self.flush()

    def flush(self) -> None:
        """Read the pending losses (one device sync), stop on a non-finite one, log the rest."""
        if not self.pending:
            return
        flat = torch.cat([torch.stack([loss, *aux.values()]) for _, loss, aux, _, _, _ in self.pending]).tolist()
        totals: dict[str, list[float]] = {}
        i = 0
        for s, _, aux, lr, dt, at in self.pending:
            loss, values = flat[i], flat[i + 1:i + 1 + len(aux)]
            i += 1 + len(aux)
            if not math.isfinite(loss):  # stop before a checkpoint could store the broken weights
                self.pending.clear()
                raise GptxError(f"training diverged: loss is {loss} at step {s}; {self.kept_after_divergence()}; "
                                "try a lower training.learning_rate")
            tok_s = self.tokens_per_step / dt
            self.step_times.append(dt)
            self.tracker.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_sec": tok_s}, s)
            self.metrics_log.write(s, at, train_loss=loss, lr=lr, tokens_per_sec=tok_s, **dict(zip(aux, values)))
            self.show.step(s, loss, lr, tok_s)
            self.last_train_loss = loss
            for name, v in zip(aux, values):
                totals.setdefault(name, []).append(v)
        aux_means = {name: sum(v) / len(v) for name, v in totals.items()}  # over the logging interval
        if aux_means:
            self.tracker.log_metrics(aux_means, self.pending[-1][0])
        self.pending.clear()

    def kept_after_divergence(self) -> str:
        """What a diverged run leaves, truthfully: its last good checkpoint (gptx run --resume
        continues from it, say with a lower learning rate), or a run folder that holds only its
        curves and is marked FAILED with the reason (--resume and gptx compare pass it over)."""
        if self.last_ckpt is not None:
            return f"the last good checkpoint is {self.last_ckpt}"
        return (f"no checkpoint was written before it, so there is nothing to resume; {self.run_dir} keeps run.json "
                f"(status FAILED) and the curves in {metrics_log.FILE}")

    def seconds(self) -> float:
        return time.perf_counter() - self.clock

    def evaluate(self, step: int) -> None:
        self.flush()
        gen = torch.Generator().manual_seed(self.tc.seed + 1)  # the same eval batches at every evaluation
        losses = {split: self.mean_loss(self.dataset.windows(split, self.tc.batch_size, gen) for _ in range(self.tc.eval_steps))
                  for split in ("train", "val")}
        self.val_loss = losses["val"]
        self.best_val_loss = min(self.val_loss, self.best_val_loss if self.best_val_loss is not None else math.inf)
        self.history.append({"step": step, "train_loss": losses["train"], "val_loss": self.val_loss})
        metrics = {"val_loss": self.val_loss, "eval_train_loss": losses["train"], "best_val_loss": self.best_val_loss}
        target = self.tc.target_val_loss
        if target is not None and self.target is None and self.val_loss <= target:
            self.target = {"steps_to_target": step, "tokens_to_target": step * self.tokens_per_step,
                           "seconds_to_target": round(self.seconds(), 3)}
            metrics |= self.target
            self.show.say(f"step {step}: val loss {self.val_loss:.4f} reached the target {target} "
                          f"after {self.target['seconds_to_target']:.1f} s")
            if self.dist.main:
                runs.write_run_file(self.run_dir, **self.target)
        self.tracker.log_metrics(metrics, step)
        self.tracker.flush()
        self.metrics_log.write(step, self.seconds(), val_loss=self.val_loss, eval_train_loss=losses["train"])
        self.show.say(f"step {step}: train loss {losses['train']:.4f}, val loss {self.val_loss:.4f}")

    def mean_loss(self, batches) -> float:
        """Row-weighted mean cross-entropy over (x, y) batches [n, T]. Ranks share the batches
        (under FSDP every rank joins every forward), so every rank is handed the same ones."""
        total, rows = torch.zeros((), device=self.device), 0
        self.model.eval()
        with torch.no_grad(), self.autocast:
            for i, (x, y) in enumerate(batches):
                rows += len(x)
                if self.dist.sharded or i % self.dist.world == self.dist.rank:
                    total += self.model(x.to(self.device), targets=y.to(self.device)).ce.float() * len(x)
        self.model.train()
        if not self.dist.sharded:
            total = self.dist.mean(total) * self.dist.world
        return float(total) / rows

    def checkpoint(self, step: int) -> None:
        self.flush()
        weights = distributed.full_model_state(self.model, self.dist)  # collectives under FSDP: all ranks
        optim_state = distributed.full_optimizer_state(self.model, self.optimizer, self.dist)
        if self.dist.main:
            state = {
                "optimizer": optim_state,
                "step": step,
                "dataset": self.dataset.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": json.dumps(self.history),
                "seconds": self.seconds(),
                "target": json.dumps(self.target) if self.target else "",
            }
            extra = dict(self.mlflow_link)  # the run's MLflow run and store: gptx export logs there
            if self.plan.init_from is not None:
                extra["init_from"] = str(self.plan.init_from)
            if self.plan.init_not_loaded:
                extra["init_not_loaded"] = self.plan.init_not_loaded
            self.last_ckpt = ckpt.save(self.run_dir, step, weights, self.cfg, self.tokenizer, state, extra=extra)
            runs.write_run_file(self.run_dir, step=step, checkpoint=str(self.last_ckpt))
        self.saved_step = step
        self.dist.barrier()

    def interrupt(self, step: int) -> None:
        self.flush()
        if self.saved_step != step:
            self.checkpoint(step)
        raise Interrupted(self.stop.signum or signal.SIGTERM, self.last_ckpt)

    def finish(self, step: int) -> Optional[str]:
        """After the last step: the final whole-split evaluation and a sample. The checkpoint
        holds everything by now, so a signal here stops at once (exit 128 + signal)."""
        self.flush()
        if step <= self.step0 and self.dist.main:  # resumed a run that had already reached max_steps
            self.last_ckpt = ckpt.complete_checkpoints(self.run_dir / "checkpoints")[-1]
        self.stop.now(self.last_ckpt)
        self.final_val_loss = None
        if self.tc.final_eval_tokens > 0:
            x_all, y_all = self.dataset.tiled_windows("val", self.tc.final_eval_tokens)  # [N, T] x2
            bs = self.tc.batch_size
            self.final_val_loss = self.mean_loss((x_all[i:i + bs], y_all[i:i + bs]) for i in range(0, len(x_all), bs))
            self.tracker.log_metrics({"final_val_loss": self.final_val_loss}, step)
            self.metrics_log.write(step, self.seconds(), final_val_loss=self.final_val_loss)
            if self.dist.main:
                runs.write_run_file(self.run_dir, final_val_loss=self.final_val_loss)
            self.show.say(f"final val loss {self.final_val_loss:.4f} on {x_all.numel():,} tokens of the validation split")
        sample = self.sample()
        if self.dist.main:
            from gptx.plots import log_run_curves

            runs.write_run_file(self.run_dir, best_val_loss=self.best_val_loss, seconds=round(self.seconds(), 3))
            if self.last_ckpt is not None:
                self.tracker.log_artifacts(self.last_ckpt, "checkpoint")
            log_run_curves(self.run_dir, self.tracker)  # metrics.jsonl and loss_curves.png; never fails the run
        return sample

    def sample(self) -> Optional[str]:
        from gptx.generate import generate_ids
        from gptx.model import GPT
        from gptx.sampling import Sampler

        tc, block = self.tc, self.cfg.model.block_size
        if tc.sample_tokens <= 0:
            return None
        model = self.model
        if self.dist.sharded:  # a plain copy: rank 0 decodes alone
            weights = distributed.full_model_state(self.model, self.dist)
            model = GPT(self.cfg.model)
            if self.dist.main:
                model.load_state_dict(weights, strict=False)  # tied lm_head: stored once
        if not self.dist.main:
            return None
        prompt = self.tokenizer.encode(tc.sample_prompt) or [self.tokenizer.eot_id or 0]
        prompt = prompt[-(block - 1):]
        n_new = min(tc.sample_tokens, block - len(prompt))
        gen = generate_ids(model, [prompt], n_new, Sampler(tc.sample_temperature, tc.sample_top_k, None, tc.seed), None,
                           vocab=self.tokenizer.vocab_size)
        text = self.tokenizer.decode(gen.prompt_ids[0] + gen.ids[0])
        self.tracker.log_text(text, "sample.txt")
        return text

    # -- opening and closing the run --

    def open(self) -> None:
        """The MLflow run, then the run directory (rank 0 creates both), run.json and the params."""
        from gptx import registry as registry_mod
        from gptx import tracking

        earlier = runs.read_run_file(self.plan.resume_dir) if self.plan.resume_dir else {}
        run_id = earlier.get("mlflow_run_id")
        made = self.plan.resume_dir or self.plan.run_dir
        created = runs.new_run_dir(self.cfg) if self.dist.main and made is None else None
        try:
            if self.dist.main and self.plan.lock is None:  # a resumed run's was taken before its checks
                self.plan.lock = runs.lock_run_dir(created or made)
            self.tracker = tracking.start(self.cfg, run_id=run_id, rank=self.dist.rank, store=earlier.get("mlflow_tracking_uri"))
        except BaseException:
            if created is not None:  # a run that could not be tracked leaves nothing behind
                (created / runs.LOCK_FILE).unlink(missing_ok=True)
                created.rmdir()
            raise
        self.run_dir = self.dist.broadcast(created or made)
        self.metrics_log = metrics_log.MetricsLog(self.run_dir, self.step0, enabled=self.dist.main)
        if self.plan.resume_dir and self.dist.main:
            self.last_ckpt = ckpt.complete_checkpoints(self.run_dir / "checkpoints")[-1]
        if not self.dist.main:
            return
        if self.tracker.run_id is not None:  # a run resumed with tracking off keeps its link to the MLflow run
            self.mlflow_link = {"mlflow_run_id": self.tracker.run_id, "mlflow_tracking_uri": self.tracker.uri}
        else:
            self.mlflow_link = {k: earlier.get(k) for k in ("mlflow_run_id", "mlflow_tracking_uri")}
        runs.write_run_file(self.run_dir, status="RUNNING", experiment=self.cfg.name, **self.mlflow_link,
                            config=self.cfg.to_dict(), pid=os.getpid(), num_params=self.model.num_params())
        if run_id is None:
            self.tracker.log_params(tracking.flatten(self.cfg.to_dict()))
            self.tracker.log_metrics({"num_params": self.model.num_params()}, 0)  # gptx compare <run id> reads it
            self.tracker.set_tags(tracking.run_tags(self.cfg, registry_mod.registry(), self.plan.init_from)
                                  | ({"gptx.init_not_loaded": self.plan.init_not_loaded[:5000]} if self.plan.init_not_loaded else {}))
            self.tracker.log_text(json.dumps(self.cfg.to_dict(), indent=2), "config.json")
        self.show.say(f"gptx run {self.cfg.name}: {self.model.num_params() / 1e6:.2f}M parameters, "
                      f"{self.tokens_per_step:,} tokens/step, {self.dist.world} process(es) on {self.device}, "
                      f"run dir {self.run_dir}")

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
        if self.dist.main and self.run_dir is not None:
            try:
                runs.write_run_file(self.run_dir, status=status, error=self.error)  # None: a resumed run's old error is gone
            except OSError:  # e.g. the disk that just refused a checkpoint: keep the error that matters
                pass
        if self.plan.lock is not None:
            self.plan.lock.release()  # the last write is done: another process may continue the run
            self.plan.lock = None
        self.dist.close()

    def result(self, step: int, sample: Optional[str]) -> TrainResult:
        times = sorted(self.step_times)
        return TrainResult(
            run_dir=self.run_dir, checkpoint=self.last_ckpt, step=step, train_loss=self.last_train_loss,
            val_loss=self.val_loss, tokens_per_sec=self.tokens_per_step / times[len(times) // 2] if times else 0.0,
            run_id=self.tracker.run_id, sample=sample, history=self.history, num_params=self.model.num_params(),
            final_val_loss=self.final_val_loss, best_val_loss=self.best_val_loss, seconds=self.seconds(),
            target=self.target,
        )


def _allocating(fn):
    """``fn()``, with the allocator's refusal (an absurd size that got past the estimate) as one line."""
    try:
        return fn()
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise GptxError(f"out of memory ({type(err).__name__}); lower training.batch_size or the model size") from None
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "out of memory" in str(err):
            raise GptxError("out of memory; lower training.batch_size or the model size") from None
        raise


def train(cfg: ExperimentConfig, resume: bool | Path = False, progress: bool = True, run_dir: Optional[Path] = None,
          checked: Callable[[], None] = lambda: None) -> TrainResult:
    """Validate everything, then train: ``Trainer(prepare(cfg, resume)).fit()``. ``run_dir``: a
    new, empty directory the caller made for the run (gptx sweep), instead of a fresh one;
    ``checked`` is called once everything is validated, before anything is created."""
    from gptx.progress import StatusLine

    shown = progress and env_int("RANK", 0) == 0
    try:
        with StatusLine() if shown else contextlib.nullcontext() as status:  # tokenizing a cold cache takes a while
            plan = prepare(cfg, resume, progress=status)
    except ConfigError as err:  # name the experiment file, as the loader's own errors do
        raise err.located(str(cfg.source) if cfg.source else None) from None
    if env_int("RANK", 0) == 0:
        checked()
    plan.run_dir = run_dir
    return Trainer(plan, progress).fit()
