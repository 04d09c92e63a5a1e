"""The training side of gptx, extended from outside, through its hooks only:

- optimizer ``lion``: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"),
  written here as a torch optimizer: the update is the sign of an interpolated momentum.
- schedule ``inverse_sqrt``: the original Transformer's warmup then 1/sqrt(step) decay.
- dataset ``copy_task``: synthetic sequences that repeat a random block of tokens; a model that
  learns to copy drives the loss on the repeats to zero. No files needed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

import gptx
from gptx.components import Dataset, Optimizer, Schedule


# ---- optimizer: Lion -----------------------------------------------------------------------

class LionTorch(torch.optim.Optimizer):
    """c = b1 m + (1 - b1) g;  p -= lr (sign(c) + wd p);  m = b2 m + (1 - b2) g."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = (b1 * m + (1 - b1) * p.grad).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


@dataclasses.dataclass(frozen=True)
class LionOptions:
    lr: Optional[float] = None  # peak learning rate; None: training.learning_rate / 3 (Lion wants 3-10x less than AdamW)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0  # on 2-D weights only

    def __post_init__(self):
        if self.lr is not None and not self.lr > 0:
            raise ValueError(("lr", f"must be positive, got {self.lr}"))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError((name, f"must be in [0, 1), got {getattr(self, name)}"))


class Lion(Optimizer):
    Options = LionOptions

    def build(self, named_parameters, device):
        o = self.options
        matrices = [p for _, p in named_parameters if p.dim() >= 2]
        others = [p for _, p in named_parameters if p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": o.weight_decay}, {"params": others, "weight_decay": 0.0}]
        return LionTorch(groups, lr=o.lr or self.training.learning_rate / 3, betas=(o.beta1, o.beta2))


# ---- schedule: inverse square root -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InverseSqrtOptions:
    warmup_steps: int = 100

    def __post_init__(self):
        if self.warmup_steps < 1:
            raise ValueError(("warmup_steps", f"must be at least 1, got {self.warmup_steps}"))


class InverseSqrt(Schedule):
    """Vaswani et al. 2017: linear warmup to the peak at warmup_steps, then peak * sqrt(warmup / step)."""

    Options = InverseSqrtOptions

    def factor(self, step):
        w = self.options.warmup_steps
        return (step + 1) / w if step + 1 < w else math.sqrt(w / (step + 1))


# ---- dataset: a copy task ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CopyTaskOptions:
    symbols: int = 16  # token ids 0..symbols-1
    span: int = 8  # each random span is followed by its copy
    tokens: int = 200_000  # length of the generated stream (train + validation)
    val_fraction: float = 0.1

    def __post_init__(self):
        if not 2 <= self.symbols <= 65536:
            raise ValueError(("symbols", f"must be between 2 and 65536, got {self.symbols}"))
        if self.span < 1:
            raise ValueError(("span", f"must be at least 1, got {self.span}"))
        if not 0 < self.val_fraction < 1:
            raise ValueError(("val_fraction", f"must be between 0 and 1, got {self.val_fraction}"))


class CopyTask(Dataset):
    """A token stream of random spans, each followed by its copy, generated from the seed."""

    Options = CopyTaskOptions

    def prepare(self):
        o = self.options
        if o.symbols > self.tokenizer.vocab_size:
            from gptx.errors import ConfigError

            raise ConfigError(f"{o.symbols} symbols exceed the tokenizer's {self.tokenizer.vocab_size} ids", "data.symbols")
        g = torch.Generator().manual_seed(self.seed)
        spans = torch.randint(o.symbols, (o.tokens // (2 * o.span) + 1, o.span), generator=g)  # [N, span]
        stream = torch.cat([spans, spans], dim=1).reshape(-1)[: o.tokens]  # [tokens]
        cut = int(len(stream) * (1 - o.val_fraction))
        self.data = {"train": stream[:cut], "val": stream[cut:]}
        if min(len(v) for v in self.data.values()) <= self.block_size:
            from gptx.errors import ConfigError

            raise ConfigError(f"a split holds fewer than block_size + 1 = {self.block_size + 1} tokens", "data.tokens")
        self.generator = torch.Generator().manual_seed(self.seed)

    def tokens(self, split):
        return len(self.data[split])

    def windows(self, split, count, generator):
        data, T = self.data[split], self.block_size
        starts = torch.randint(len(data) - T, (count,), generator=generator)  # [count]
        rows = data[starts[:, None] + torch.arange(T + 1)]  # [count, T+1]
        return rows[:, :-1], rows[:, 1:]

    def batch(self, count, rows=None):
        x, y = self.windows("train", count, self.generator)
        return (x, y) if rows is None else (x[list(rows)], y[list(rows)])

    def tiled_windows(self, split, max_tokens):
        data, T = self.data[split], self.block_size
        n = min((len(data) - 1) // T, max(1, max_tokens // T))
        rows = torch.stack([data[i * T:(i + 1) * T + 1] for i in range(n)])  # [n, T+1]
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@gptx.hookimpl
def register_optimizer(register):
    register("lion", Lion)


@gptx.hookimpl
def register_schedule(register):
    register("inverse_sqrt", InverseSqrt)


@gptx.hookimpl
def register_dataset(register):
    register("copy_task", CopyTask)
