"""One training step and what drives it: the split of the global batch over ranks and
micro-batches, the step itself, the optimizer and schedule builders."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from gptx import distributed
from gptx.config import ExperimentConfig
from gptx.errors import ConfigError
from gptx.training.machine import autocast_context


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
