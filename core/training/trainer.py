"""Training: one loop for a single process and for torchrun (DDP, FSDP), CPU or CUDA.

    plan = plan_run(cfg, resume)     # everything that can fail on bad input; nothing is created
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
import gc
import json
import math
import numbers
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from gptx import checkpoint as ckpt
from gptx import distributed, metrics_log, runs
from gptx.config import ExperimentConfig
from gptx.errors import ConfigError, GptxError, first_line
from gptx.numeric import env_int, parse_float, parse_int
from gptx.progress import TrainProgress
from gptx.threads import ThreadGovernor
from gptx.training.machine import allocating, autocast_context, keep_freed_memory, process_age
from gptx.training.plan import Plan, plan_run
from gptx.training.recorder import NullRecorder, Recorder
from gptx.training.signals import Interrupted, StopFlag
from gptx.training.step import BatchSplit, TrainStep, build_optimizer, build_schedule, set_lr


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


class Trainer:
    """One training run. ``__init__`` builds the model, optimizer and schedule and restores a
    resumed run; ``fit`` runs the loop; each part of the loop is one method."""

    def __init__(self, plan: Plan, progress: bool = True):
        from gptx.model import GPT

        self.plan, self.cfg, self.tc = plan, plan.cfg, plan.cfg.training
        self.device, self.tokenizer, self.dataset = plan.device, plan.tokenizer, plan.dataset
        self.dist = distributed.setup(self.device, self.tc.parallel)
        self.threads = ThreadGovernor(self.tc.threads)  # the CPUs free, re-read between steps (gptx.threads)
        torch.manual_seed(self.tc.seed)
        self.model = allocating(lambda: GPT(self.cfg.model).to(self.device))
        if plan.init_weights is not None:  # checked by plan_run: each fits; a tied lm_head is stored once
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
        self.show = TrainProgress(self.tc.max_steps, self.tc.log_interval, progress and self.dist.main)
        self.stop = StopFlag()
        self.record: NullRecorder = NullRecorder()  # rank 0's outputs once the run is open
        self.run_dir: Optional[Path] = None
        self.created: Optional[Path] = None  # the new run directory this process made (removed if tracking fails)
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
        """Continue from the checkpoint at ``path``: its weights and its trainer.pt."""
        state = ckpt.load_trainer_state(path)
        if state is None:
            raise GptxError(f"--resume: {path} has no trainer state")
        try:
            self.load_state_dict(state, ckpt.load_weights(path), path)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise GptxError(f"{path / 'trainer.pt'}: corrupted or from another run ({type(err).__name__}: "
                            f"{first_line(err)})") from None

    def state_dict(self, step: int) -> dict:
        """What trainer.pt holds at ``step``: with the weights, enough to continue bitwise. Every
        rank calls it (gathering a sharded optimizer's state is a collective)."""
        return {
            "optimizer": distributed.full_optimizer_state(self.model, self.optimizer, self.dist),
            "step": step,
            "dataset": self.dataset.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "seconds": self.seconds(),
            "target": json.dumps(self.target) if self.target else "",
        }

    def load_state_dict(self, state: dict, weights: dict, path: Path) -> None:
        """The inverse of ``state_dict`` (``path`` names the checkpoint in errors)."""
        distributed.load_full_state(self.model, self.optimizer, weights, state["optimizer"], self.dist)
        self.dataset.load_state_dict(state["dataset"])
        torch.set_rng_state(state["torch_rng"])
        self.step0 = parse_int(state["step"], f"{path / 'trainer.pt'}: step", 0)
        self.history = list(json.loads(state.get("history", "[]")))
        self.seconds0 = parse_float(state.get("seconds", 0.0), f"{path / 'trainer.pt'}: seconds", 0.0)
        self.target = json.loads(state["target"]) if state.get("target") else None

    # -- the loop --

    def fit(self) -> TrainResult:
        status = "FAILED"
        try:
            with self.stop:  # from here on a signal ends the run cleanly
                self.open()
                self.say(self.threads.first_reading())
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
                        self.record.say(f"reached training.target_val_loss {self.tc.target_val_loss} at step {step}; stopping")
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

    def say(self, line: Optional[str]) -> None:
        if line:
            self.record.say(line)

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.tc.max_steps

    def set_lr(self, step: int) -> None:
        factor = self.schedule.factor(step - 1)
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor < 0:
            spec = self.tc.schedule
            raise GptxError(f"training.schedule '{spec.name}' ({spec.cls.__module__}.{spec.cls.__qualname__}): factor({step - 1}) "
                            f"returned {factor!r}; a learning-rate factor must be a finite number >= 0")
        set_lr(self.optimizer, factor)

    def run_step(self, step: int, x, y) -> None:
        t0 = time.perf_counter()
        loss, aux = allocating(lambda: self.train_step(x, y))
        dt = time.perf_counter() - t0
        if step == self.step0 + 1:
            if self.tc.compile:  # the first step compiles: keep it off the clock
                self.clock += dt
            self.record.note(startup_s=process_age())  # `gptx run` to one step done: gptx bench --only startup
            self.record.begin_tracking()  # not needed for the first step: started after it, beside the next ones
            self.threads.hold(0 if self.record.linked else 1)  # a CPU for it while it starts
        if not self.record.linked:  # the MLflow run is still starting in the background
            self.record.link(wait=False)  # a start that failed stops the run here
            if self.record.linked:
                self.threads.hold(0)
        self.pending.append((step, loss, aux, self.optimizer.param_groups[0]["lr"], dt, self.seconds()))
        self.say(self.threads.tick())
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
            self.step_times.append(dt)
            self.record.train_step(s, at, loss, lr, self.tokens_per_step / dt, dict(zip(aux, values)))
            self.last_train_loss = loss
            for name, v in zip(aux, values):
                totals.setdefault(name, []).append(v)
        self.record.aux_means(self.pending[-1][0], {name: sum(v) / len(v) for name, v in totals.items()})  # over the interval
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
            self.record.say(f"step {step}: val loss {self.val_loss:.4f} reached the target {target} "
                            f"after {self.target['seconds_to_target']:.1f} s")
            self.record.target_reached(self.target)
        self.record.evaluation(step, self.seconds(), metrics)

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
        self.record.link(wait=True)  # the checkpoint names the MLflow run
        weights = distributed.full_model_state(self.model, self.dist)  # collectives under FSDP: all ranks
        state = self.state_dict(step)
        if self.dist.main:
            extra = dict(self.record.mlflow_link)  # the run's MLflow run and store: gptx export logs there
            if self.plan.init_from is not None:
                extra["init_from"] = str(self.plan.init_from)
            if self.plan.init_not_loaded:
                extra["init_not_loaded"] = self.plan.init_not_loaded
            self.last_ckpt = ckpt.save(self.run_dir, step, weights, self.cfg, self.tokenizer, state, extra=extra)
            self.record.checkpoint(step, self.last_ckpt)
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
            self.record.final(step, self.seconds(), self.final_val_loss, x_all.numel())
        sample = self.sample()
        self.record.link(wait=True)  # the result names the MLflow run
        self.record.ended(self.best_val_loss, self.seconds(), self.last_ckpt)
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
        self.record.sample(text)
        return text

    # -- opening and closing the run --

    def open(self) -> None:
        """The MLflow run, then the run directory (rank 0 creates both) and the run's recorder."""
        from gptx import registry as registry_mod
        from gptx import tracking

        earlier = runs.read_run_file(self.plan.resume_dir) if self.plan.resume_dir else {}
        run_id = earlier.get("mlflow_run_id")
        made = self.plan.resume_dir or self.plan.run_dir
        created = runs.new_run_dir(self.cfg) if self.dist.main and made is None else None
        # A new single-process run starts its MLflow run in the background, off the way to the first
        # step; should that fail, the folder goes again (close). A resumed run's folder must outlive
        # a failure, and under torchrun one rank stopping alone would leave the others waiting.
        background = created is not None and self.dist.world == 1
        try:
            if self.dist.main and self.plan.lock is None:  # a resumed run's was taken before its checks
                self.plan.lock = runs.lock_run_dir(created or made)
            tracker = tracking.start(self.cfg, run_id=run_id, rank=self.dist.rank, store=earlier.get("mlflow_tracking_uri"),
                                     background=background)
        except BaseException:
            if created is not None:  # a run that could not be tracked leaves nothing behind
                (created / runs.LOCK_FILE).unlink(missing_ok=True)
                created.rmdir()
            raise
        self.run_dir, self.created = self.dist.broadcast(created or made), created
        if not self.dist.main:
            return
        try:
            self.record = Recorder(self.run_dir, tracker, self.show, self.step0, earlier)
        except BaseException:
            tracker.finish("FAILED")
            raise
        if self.plan.resume_dir:
            self.last_ckpt = ckpt.complete_checkpoints(self.run_dir / "checkpoints")[-1]
        tags = {}
        if run_id is None:  # a resumed MLflow run is tagged already
            tags = tracking.run_tags(self.cfg, registry_mod.registry(), self.plan.init_from)
            if self.plan.init_not_loaded:
                tags["gptx.init_not_loaded"] = self.plan.init_not_loaded[:5000]
        self.record.started(self.cfg, self.model.num_params(), resumed=run_id is not None, tags=tags)
        self.record.say(f"gptx run {self.cfg.name}: {self.model.num_params() / 1e6:.2f}M parameters, "
                        f"{self.tokens_per_step:,} tokens/step, {self.dist.world} process(es) on {self.device}, "
                        f"run dir {self.run_dir}")

    def close(self, status: str) -> None:
        self.record.finish(status, self.error)
        if self.plan.lock is not None:
            self.plan.lock.release()  # the last write is done: another process may continue the run
            self.plan.lock = None
        if self.record.untracked and self.created is not None:  # as when the start failed before the folder was made
            shutil.rmtree(self.created, ignore_errors=True)
        # The DDP wrapper goes before the process group. Its Reducer, freed last, would free the
        # group with the GIL held while a gloo thread waits for the GIL: exit hangs (pytorch #56297).
        self.train_step = self.train_model = None
        gc.collect()
        self.dist.close()

    def result(self, step: int, sample: Optional[str]) -> TrainResult:
        times = sorted(self.step_times)
        return TrainResult(
            run_dir=self.run_dir, checkpoint=self.last_ckpt, step=step, train_loss=self.last_train_loss,
            val_loss=self.val_loss, tokens_per_sec=self.tokens_per_step / times[len(times) // 2] if times else 0.0,
            run_id=self.record.run_id, sample=sample, history=self.history, num_params=self.model.num_params(),
            final_val_loss=self.final_val_loss, best_val_loss=self.best_val_loss, seconds=self.seconds(),
            target=self.target,
        )


def train(cfg: ExperimentConfig, resume: bool | Path = False, progress: bool = True, run_dir: Optional[Path] = None,
          checked: Callable[[ExperimentConfig], None] = lambda cfg: None) -> TrainResult:
    """Validate everything, then train: ``Trainer(plan_run(cfg, resume)).fit()``. ``run_dir``: a
    new, empty directory the caller made for the run (gptx sweep), instead of a fresh one;
    ``checked`` is called with the resolved config (``plan.cfg``) once everything is validated,
    before anything is created."""
    from gptx.progress import StatusLine

    shown = progress and env_int("RANK", 0) == 0
    try:
        with StatusLine() if shown else contextlib.nullcontext() as status:  # tokenizing a cold cache takes a while
            plan = plan_run(cfg, resume, progress=status)
    except ConfigError as err:  # name the experiment file, as the loader's own errors do
        raise err.located(str(cfg.source) if cfg.source else None) from None
    if env_int("RANK", 0) == 0:
        checked(plan.cfg)
    plan.run_dir = run_dir
    return Trainer(plan, progress).fit()
