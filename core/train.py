"""Training: one loop for a single process and for torchrun (DDP), CPU or CUDA.

What a run does, in order: validate everything that can fail on bad input (before anything is
written), tokenize (cached), build the model, open the run directory and the MLflow run, train
with AdamW + warmup/cosine + clipping + accumulation, evaluate and checkpoint periodically,
then save the final checkpoint, write a sample and close the run.

Determinism: the global batch of every step is drawn from one generator seeded by
``training.seed`` (the same draws on every rank; each rank takes its share of micro-batches),
evaluation uses its own fixed batches, and checkpoints carry optimizer, RNG and data-generator
state, so a resumed run continues the very same loss curve (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from gptx import checkpoint as ckpt
from gptx import distributed
from gptx.config import ExperimentConfig
from gptx.errors import ConfigError, GptxError

RUN_FILE = "run.json"  # <run_dir>/run.json: status, MLflow run id, step


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    train_loss: float
    val_loss: Optional[float]
    tokens_per_sec: float  # median over the run's steps
    run_id: Optional[str]
    sample: Optional[str]
    history: list[dict]  # one record per evaluation: step, train_loss, val_loss
    num_params: int = 0
    final_val_loss: Optional[float] = None  # over the tiled validation split (training.final_eval_tokens)


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def lr_at(step: int, tc) -> float:
    """Linear warmup over warmup_steps, cosine decay to final_lr by lr_decay_steps, then flat
    (nanoGPT's schedule; ``step`` counts optimizer steps from 0)."""
    decay_steps = tc.lr_decay_steps or tc.max_steps
    if step < tc.warmup_steps:
        return tc.learning_rate * (step + 1) / (tc.warmup_steps + 1)
    if step > decay_steps:
        return tc.final_lr
    ratio = (step - tc.warmup_steps) / max(1, decay_steps - tc.warmup_steps)
    return tc.final_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.final_lr)


# ---- devices -------------------------------------------------------------------------------

def pick_device(tc) -> torch.device:
    if tc.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(tc.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("is 'cuda' but no CUDA device is available", "training.device")
    return dev


# ---- run directories -----------------------------------------------------------------------

def experiment_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.training.out_dir).expanduser().resolve() / cfg.name


def read_run_file(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_run_file(run_dir: Path, **fields) -> None:
    data = read_run_file(run_dir) | fields
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, run_dir / RUN_FILE)


def find_resumable(cfg: ExperimentConfig) -> Path:
    """The newest run of this experiment that did not finish and has a checkpoint."""
    root = experiment_dir(cfg)
    candidates = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []
    for run_dir in reversed(candidates):
        if read_run_file(run_dir).get("status") != "FINISHED" and ckpt.complete_checkpoints(run_dir / "checkpoints"):
            return run_dir
    raise GptxError(f"--resume: no interrupted run of '{cfg.name}' with a checkpoint under {root}")


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.tracking.run_name or f"{stamp}-{secrets.token_hex(2)}"
    run_dir = experiment_dir(cfg) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=cfg.tracking.run_name is not None)
    except OSError as err:
        raise GptxError(f"training.out_dir: cannot create {run_dir}: {err.strerror}") from None
    return run_dir


def check_writable(cfg: ExperimentConfig) -> None:
    """Fail before training when the run directory cannot be created, creating nothing."""
    p = experiment_dir(cfg)
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{p} is not a writable directory", "training.out_dir")


# ---- progress ------------------------------------------------------------------------------

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


# ---- one optimizer step (shared with gptx.bench) ----------------------------------------------

def build_optimizer(model, tc, device: torch.device, dist=None) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: the fused kernel on CPU and CUDA (not for FSDP's sharded parameters)."""
    from gptx.model import param_groups

    fused = device.type in ("cuda", "cpu") and not (dist is not None and dist.sharded)
    return torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
        **({"fused": True} if fused else {}),
    )


def autocast_context(tc, device: torch.device):
    """bf16 autocast when ``training.dtype = "bfloat16"``, else nothing (reusable)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16" else contextlib.nullcontext()


def make_train_step(train_model, model, optimizer, tc, dist, device: torch.device):
    """The training step that ``train`` runs and ``gptx bench`` times. ``step(x_all, y_all, lr)``
    takes the global batch [grad_accum_steps * batch_size, T] (this rank uses its share), runs
    forward and backward per micro-batch, clips, steps the optimizer and returns the mean loss as
    a 0-d device tensor, unsynchronised (the loop reads losses in batches)."""
    micro_per_rank = tc.grad_accum_steps // dist.world
    autocast = autocast_context(tc, device)
    params = [p for p in model.parameters() if p.requires_grad]
    foreach = device.type in ("cpu", "cuda") and not dist.sharded  # one multi-tensor norm, not one per parameter

    def step(x_all: torch.Tensor, y_all: torch.Tensor, lr: float) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for m in range(micro_per_rank):
            i = m * dist.world + dist.rank  # this rank's share of the global batch
            x = x_all[i * tc.batch_size:(i + 1) * tc.batch_size].to(device, non_blocking=True)
            y = y_all[i * tc.batch_size:(i + 1) * tc.batch_size].to(device, non_blocking=True)
            sync = m == micro_per_rank - 1 or dist.world == 1
            with distributed.gradient_sync(train_model, dist, sync), autocast:
                logits, _ = train_model(x)  # [B, T, V]
                if logits.dtype != torch.float32:  # bf16 under autocast: the loss in fp32
                    logits = logits.float()
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            (loss / micro_per_rank).backward()
            loss_sum += loss.detach()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=foreach or None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return dist.mean(loss_sum / micro_per_rank)

    return step


# ---- the loop ------------------------------------------------------------------------------

class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second signal acts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():
            signal.signal(s, old)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def prepare(cfg: ExperimentConfig, resume: bool, progress=None):
    """Everything that can fail on bad input, before anything is created: output directory,
    resumable run, tracking server, tokenizer, then the data (the slow part: tokenizing)."""
    from gptx import tracking
    from gptx.data import load_dataset

    tc = cfg.training
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.grad_accum_steps % world:
        raise ConfigError(
            f"{tc.grad_accum_steps} is not divisible by the {world} processes; the global batch would change",
            "training.grad_accum_steps",
        )
    resume_dir = find_resumable(cfg) if resume else None
    tokenizer_state = None
    if resume_dir is not None:
        meta = ckpt.read_meta(ckpt.complete_checkpoints(resume_dir / "checkpoints")[-1])
        if meta["config"]["model"] != cfg.to_dict()["model"] | {"vocab_size": meta["config"]["model"]["vocab_size"]}:
            raise GptxError(f"--resume: {resume_dir} was trained with another model config; start a new run instead")
        tokenizer_state = meta.get("tokenizer_state") or None
    tokenizer = ckpt.build_tokenizer(cfg.tokenizer, tokenizer_state)
    check_writable(cfg)
    if cfg.tracking.enabled:
        tracking.check_reachable(tracking.tracking_uri(cfg.tracking.uri))
    dataset = load_dataset(cfg, tokenizer, progress=progress)
    tokenizer = dataset.tokenizer  # fitted, if it learns its vocabulary from the data
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}", "model.vocab_size")
    return tokenizer, dataset, resume_dir


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    from gptx import registry as registry_mod
    from gptx import tracking
    from gptx.generate import generate_ids
    from gptx.model import GPT
    from gptx.progress import StatusLine
    from gptx.sampling import Sampler

    tc = cfg.training
    show_data = progress and int(os.environ.get("RANK", "0")) == 0  # tokenizing can take minutes
    try:
        with StatusLine() as status:
            device = pick_device(tc)
            tokenizer, dataset, resume_dir = prepare(cfg, resume, status if show_data else None)
    except ConfigError as err:  # name the experiment file, as the loader's own errors do
        raise err.located(str(cfg.source) if cfg.source else None) from None
    dist = distributed.setup(device, tc.parallel)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    train_model = distributed.wrap(model, dist, device)  # FSDP shards ``model`` in place
    optimizer = build_optimizer(model, tc, device, dist)
    start_step, history = 0, []
    run_id = None
    if resume_dir is not None:
        last = ckpt.complete_checkpoints(resume_dir / "checkpoints")[-1]
        state = ckpt.load_trainer_state(last)
        if state is None:
            raise GptxError(f"--resume: {last} has no trainer state")
        distributed.load_full_state(model, optimizer, ckpt.load_weights(last), state["optimizer"], dist)
        dataset.load_state_dict(state["dataset"] if "dataset" in state else {"generator": state["data_rng"]})
        torch.set_rng_state(state["torch_rng"])
        start_step, history = int(state["step"]), list(json.loads(state.get("history", "[]")))
        run_id = read_run_file(resume_dir).get("mlflow_run_id")
    run_dir = dist.broadcast(
        (resume_dir or new_run_dir(cfg)) if dist.main else None
    )

    tracker = tracking.NullTracker()
    status = "FAILED"
    try:
        with _StopFlag() as stop:  # from here on a signal ends the run cleanly
            tracker = tracking.start(cfg, run_id=run_id, rank=dist.rank)
            reg = registry_mod.registry()
            if dist.main:
                write_run_file(run_dir, status="RUNNING", experiment=cfg.name, mlflow_run_id=tracker.run_id,
                               config=cfg.to_dict(), pid=os.getpid())
                if run_id is None and hasattr(tracker, "log_params"):
                    tracker.log_params(tracking.flatten(cfg.to_dict()))
                    tracker.set_tags(tracking.run_tags(cfg, reg))
                    tracker.log_text(json.dumps(cfg.to_dict(), indent=2), "config.json")

            if tc.compile:
                train_model = torch.compile(train_model)
            autocast = autocast_context(tc, device)
            train_step = make_train_step(train_model, model, optimizer, tc, dist, device)
            tokens_per_step = tc.grad_accum_steps * tc.batch_size * cfg.model.block_size
            show = Progress(tc.max_steps, tc.log_interval, progress and dist.main)
            if dist.main:
                n = model.num_params()
                show.say(f"gptx run {cfg.name}: {n / 1e6:.2f}M parameters, {tokens_per_step:,} tokens/step, "
                         f"{dist.world} process(es) on {device}, run dir {run_dir}")

            def mean_loss(batches) -> float:
                """Row-weighted mean loss over (x, y) batches [n, T]. Ranks share the batches (under
                FSDP every rank joins every forward), so every rank must be handed the same ones."""
                total, rows = torch.zeros((), device=device), 0
                model.eval()
                with torch.no_grad(), autocast:
                    for i, (x, y) in enumerate(batches):
                        rows += len(x)
                        if dist.sharded or i % dist.world == dist.rank:
                            total += model.loss(x.to(device), y.to(device)).float() * len(x)
                model.train()
                if not dist.sharded:
                    total = dist.mean(total) * dist.world
                return float(total) / rows

            def evaluate() -> dict[str, float]:
                gen = torch.Generator().manual_seed(tc.seed + 1)  # the same eval batches at every evaluation
                return {split: mean_loss(dataset.windows(split, tc.batch_size, gen) for _ in range(tc.eval_steps))
                        for split in ("train", "val")}

            def final_evaluate() -> tuple[float, int]:
                """Mean loss over non-overlapping windows tiling the validation split: no sampling
                noise, so runs compare to the third decimal (20 sampled batches: about +-0.02)."""
                x_all, y_all = dataset.tiled_windows("val", tc.final_eval_tokens)  # [N, T] x2
                bs = tc.batch_size
                return mean_loss((x_all[i:i + bs], y_all[i:i + bs]) for i in range(0, len(x_all), bs)), x_all.numel()

            def save(step: int) -> Optional[Path]:
                weights = distributed.full_model_state(model, dist)  # collectives under FSDP: all ranks
                optim_state = distributed.full_optimizer_state(model, optimizer, dist)
                path = None
                if dist.main:
                    state = {
                        "optimizer": optim_state,
                        "step": step,
                        "dataset": dataset.state_dict(),  # the training stream's position
                        "torch_rng": torch.get_rng_state(),
                        "history": json.dumps(history),
                    }
                    path = ckpt.save(run_dir, step, weights, cfg, tokenizer, state, extra={"mlflow_run_id": tracker.run_id})
                    write_run_file(run_dir, step=step, checkpoint=str(path))
                dist.barrier()
                return path

            step_times: list[float] = []
            pending: list[tuple[int, torch.Tensor, float, float]] = []  # (step, loss, lr, seconds) not yet read
            # the newest complete checkpoint: after --resume, the one this run continued from
            last_ckpt: Optional[Path] = ckpt.complete_checkpoints(run_dir / "checkpoints")[-1] if resume_dir and dist.main else None
            last_train_loss = float("nan")
            val_loss = history[-1]["val_loss"] if history else None
            ck_every = tc.checkpoint_interval or tc.eval_interval

            def flush() -> None:
                nonlocal last_train_loss
                if not pending:
                    return
                values = torch.stack([p[1] for p in pending]).tolist()  # one device sync per flush
                for (s, _, lr, dt), loss in zip(pending, values):
                    if not math.isfinite(loss):  # stop before a checkpoint could store the broken weights
                        pending.clear()
                        raise GptxError(
                            f"training diverged: loss is {loss} at step {s}; the last good checkpoint is "
                            f"{last_ckpt or 'none (no checkpoint yet)'}; try a lower training.learning_rate"
                        )
                    tok_s = tokens_per_step / dt
                    step_times.append(dt)
                    tracker.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_sec": tok_s}, s)
                    show.step(s, loss, lr, tok_s)
                    last_train_loss = loss
                pending.clear()

            model.train()
            for step in range(start_step + 1, tc.max_steps + 1):
                t0 = time.perf_counter()
                lr = lr_at(step - 1, tc)
                x_all, y_all = dataset.batch(tc.grad_accum_steps * tc.batch_size)
                step_loss = train_step(x_all, y_all, lr)
                pending.append((step, step_loss, lr, time.perf_counter() - t0))
                if step % tc.log_interval == 0 or step == tc.max_steps:
                    flush()
                if step % tc.eval_interval == 0 or step == tc.max_steps:
                    flush()
                    losses = evaluate()
                    val_loss = losses["val"]
                    history.append({"step": step, "train_loss": losses["train"], "val_loss": val_loss})
                    tracker.log_metrics({"val_loss": val_loss, "eval_train_loss": losses["train"]}, step)
                    tracker.flush()
                    show.say(f"step {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
                if step % ck_every == 0 or step == tc.max_steps:
                    flush()
                    last_ckpt = save(step) or last_ckpt
                signum = dist.agree_max(stop.signum or 0)  # ranks stop together, or collectives hang
                if signum:
                    flush()
                    path = save(step) if step % ck_every else last_ckpt
                    status = "KILLED"
                    raise Interrupted(signum, path or last_ckpt)
            if tc.max_steps <= start_step:  # resumed a run that had already reached max_steps
                last_ckpt = ckpt.complete_checkpoints(run_dir / "checkpoints")[-1]
            flush()
            final_val_loss = None
            if tc.final_eval_tokens > 0:
                final_val_loss, n_tokens = final_evaluate()
                tracker.log_metrics({"final_val_loss": final_val_loss}, tc.max_steps)
                if dist.main:
                    write_run_file(run_dir, final_val_loss=final_val_loss)
                show.say(f"final val loss {final_val_loss:.4f} on {n_tokens:,} tokens of the validation split")
            sample = None
            sampler_model = model
            if dist.sharded and tc.sample_tokens > 0:  # a plain copy: rank 0 decodes alone
                weights = distributed.full_model_state(model, dist)
                sampler_model = GPT(cfg.model)
                if dist.main:
                    sampler_model.load_state_dict(weights, strict=False)  # tied lm_head: stored once
            if dist.main and tc.sample_tokens > 0:
                prompt = tokenizer.encode(tc.sample_prompt) or [tokenizer.eot_id or 0]
                n_new = min(tc.sample_tokens, cfg.model.block_size - len(prompt))
                if n_new > 0:
                    gen = generate_ids(sampler_model, [prompt[-(cfg.model.block_size - 1):]], n_new,
                                       Sampler(tc.sample_temperature, tc.sample_top_k, None, tc.seed), None)
                    sample = tokenizer.decode(gen.prompt_ids[0] + gen.ids[0])
                    tracker.log_text(sample, "sample.txt")
            if dist.main and last_ckpt is not None:
                tracker.log_artifacts(last_ckpt, "checkpoint")
            status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
        if dist.main:
            try:
                write_run_file(run_dir, status=status)
            except OSError:  # e.g. the disk that just refused a checkpoint: keep the error that matters
                pass
        dist.close()
    times = sorted(step_times)
    return TrainResult(
        run_dir=run_dir,
        checkpoint=last_ckpt,
        step=tc.max_steps,
        train_loss=last_train_loss,
        val_loss=val_loss,
        tokens_per_sec=tokens_per_step / times[len(times) // 2] if times else 0.0,
        run_id=tracker.run_id,
        sample=sample,
        history=history,
        num_params=model.num_params(),
        final_val_loss=final_val_loss,
    )
