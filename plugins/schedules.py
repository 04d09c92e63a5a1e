"""Learning-rate schedules: the multiplier of every group's peak learning rate at each step.
``cosine`` is nanoGPT's (warmup, cosine decay, flat), ``wsd`` warmup-stable-decay (Hu et al.
2024, MiniCPM), ``constant`` a warmup then flat."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import gptx
from gptx.components import Schedule
from gptx.options import option


def warmup_factor(step: int, warmup_steps: int) -> float:
    """nanoGPT's linear warmup: (step + 1) / (warmup_steps + 1) for step < warmup_steps."""
    return (step + 1) / (warmup_steps + 1)


def _check_warmup(training, warmup_steps: int) -> None:
    if not 0 <= warmup_steps <= 1 << 40:  # longer than the run is allowed: the warmup is then cut short
        raise ValueError(("schedule.warmup_steps", f"must be between 0 and {1 << 40:,}, got {warmup_steps}"))


def _check_min_lr(training, min_lr: Optional[float]) -> None:
    if min_lr is not None and not 0 <= min_lr <= training.learning_rate:
        raise ValueError(("schedule.min_lr", f"must be between 0 and learning_rate = {training.learning_rate}, got {min_lr}"))


@dataclasses.dataclass(frozen=True)
class CosineOptions:
    warmup_steps: int = 100
    min_lr: Optional[float] = option(None, low=0, high=10)  # the end of the decay, an absolute learning rate; None: learning_rate / 10
    decay_steps: Optional[int] = None  # the step the decay ends (flat at min_lr after); None: max_steps

    def __post_init__(self):
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(("decay_steps", f"must be at least 1, got {self.decay_steps}"))


class Cosine(Schedule):
    """nanoGPT's: linear warmup over warmup_steps, cosine decay to min_lr by decay_steps, then flat."""

    Options = CosineOptions

    @classmethod
    def check(cls, training, options):
        _check_warmup(training, options.warmup_steps)
        _check_min_lr(training, options.min_lr)

    def factor(self, step):
        o, lr = self.options, self.training.learning_rate
        final = (lr / 10 if o.min_lr is None else o.min_lr) / lr
        decay_steps = o.decay_steps or self.training.max_steps
        if step < o.warmup_steps:
            return warmup_factor(step, o.warmup_steps)
        if step > decay_steps:
            return final
        ratio = (step - o.warmup_steps) / max(1, decay_steps - o.warmup_steps)
        return final + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - final)


@dataclasses.dataclass(frozen=True)
class WsdOptions:
    warmup_steps: int = 100
    decay_fraction: float = option(0.2, low=0, high=1, low_open=True)  # the last fraction of max_steps decays; the rest after warmup is flat
    min_lr: float = option(0.0, low=0, high=10)  # where the decay ends (absolute)
    shape: Literal["linear", "1-sqrt"] = "linear"  # 1-sqrt: Hägele et al. 2024's cooldown



class Wsd(Schedule):
    """Warmup-stable-decay: warmup, the peak held, then a decay over the last decay_fraction of the run."""

    Options = WsdOptions

    @classmethod
    def check(cls, training, options):
        _check_warmup(training, options.warmup_steps)
        _check_min_lr(training, options.min_lr)

    def factor(self, step):
        o, max_steps = self.options, self.training.max_steps
        final = o.min_lr / self.training.learning_rate
        decay_start = max_steps - max(1, round(o.decay_fraction * max_steps))
        if step < o.warmup_steps:
            return warmup_factor(step, o.warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / (max_steps - decay_start))  # (0, 1]: the last step ends at min_lr
        drop = progress if o.shape == "linear" else math.sqrt(progress)
        return final + (1.0 - final) * (1.0 - drop)


@dataclasses.dataclass(frozen=True)
class ConstantOptions:
    warmup_steps: int = 0


class Constant(Schedule):
    """A linear warmup, then the peak learning rate to the end."""

    Options = ConstantOptions

    @classmethod
    def check(cls, training, options):
        _check_warmup(training, options.warmup_steps)

    def factor(self, step):
        return warmup_factor(step, self.options.warmup_steps) if step < self.options.warmup_steps else 1.0


@gptx.hookimpl(trylast=True)
def register_schedule(register):
    register("cosine", Cosine)
    register("wsd", Wsd)
    register("constant", Constant)
