"""What a training run needs in memory, estimated before anything is allocated.

Every component of the model is built once on PyTorch's ``meta`` device (shapes without storage),
so the parameter count is exact for any component, a plugin's included, and costs no memory.
The sizes are multiplied in Python integers: a feed-forward width of 2**40 is a number to
compare with the machine, never an overflow. The estimate is a floor:

    parameters x (weights + gradients + the optimizer's states per parameter) x 4 bytes
  + activations kept for the backward pass: every Linear's input, per token and layer
  + the logits of one micro-batch and their gradient (fp32)

A component whose own sizes do not fit a 64-bit tensor is refused naming its table. Torch is
imported only to estimate (``size`` and ``free_bytes`` serve the torch-free onnxruntime paths).
"""
from __future__ import annotations

import contextlib
import dataclasses

from gptx.errors import ConfigError, first_line


@dataclasses.dataclass(frozen=True)
class Part:
    """One share of the estimate: the key that sizes it, what it is, and its bytes."""

    key: str
    what: str
    bytes: int


# in-place tensor methods that change a shape; every other in-place method only sets values
SHAPE_CHANGING = {"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_",
                  "swapdims_", "swapaxes_"}


@contextlib.contextmanager
def on_meta():
    """Modules built inside get their parameters on the meta device (shapes, no storage), and the
    initialisers' in-place fills are skipped: a meta tensor holds no values, and some of their meta
    kernels import sympy (seconds, on every validate)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipValueFills(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes tensor= by keyword
            if (name.endswith("_") and not name.startswith("__") and name not in SHAPE_CHANGING
                    and isinstance(target, torch.Tensor) and target.is_meta):
                return target
            return func(*args, **kwargs)

    with torch.device("meta"), SkipValueFills():
        yield


def _build_on_meta(table: str, name: str, build):
    """``build()`` on the meta device; sizes no tensor can have are a ConfigError naming ``table``."""
    try:
        with on_meta():
            return build()
    except (RuntimeError, OverflowError, ValueError, MemoryError) as err:
        raise ConfigError(f"{name} builds a tensor no machine can hold ({first_line(err)[:200]})", table) from None


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stored(module, per_param: int) -> int:
    """Bytes of a module's parameters (with their gradients and optimizer state) and buffers (fp32)."""
    return per_param * _params(module) + 4 * sum(b.numel() for b in module.buffers())


def _linear_inputs(module) -> int:
    """Features a token feeds into the module's Linear layers: what backward keeps per token."""
    from torch import nn

    return sum(m.in_features for m in module.modules() if isinstance(m, nn.Linear))


def estimate(cfg, states_per_param: int) -> list[Part]:
    """The parts of a training run's memory for ``cfg`` (an ExperimentConfig with vocab_size set)."""
    m, tc = cfg.model, cfg.training
    rows = tc.batch_size * m.block_size  # tokens in one micro-batch
    act_bytes = 2 if tc.dtype == "bfloat16" else 4
    per_param = 4 * (2 + states_per_param)
    attention = _build_on_meta("model.attention", m.attention.name, lambda: m.attention.cls(m, m.attention.options))
    ffn = _build_on_meta("model.ffn", m.ffn.name, lambda: m.ffn.cls(m, m.ffn.options))
    norm = _build_on_meta("model.norm", m.norm.name, lambda: m.norm.cls(m.n_embd, m.norm.options))
    positional = _build_on_meta("model.positional", m.positional.name, lambda: m.positional.cls(m, m.positional.options))
    ffn_params = _params(ffn)
    # a mixture of experts runs top_k of its experts per token: only those keep activations
    active = (ffn_params - ffn.inactive_params()) / ffn_params if hasattr(ffn, "inactive_params") and ffn_params else 1.0
    embedding = m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2)
    kept_per_token = m.n_layer * (_linear_inputs(attention) + int(active * _linear_inputs(ffn)))
    return [
        Part("model.vocab_size", "the token embedding and LM head", per_param * embedding),
        Part("model.positional", f"positional '{m.positional.name}'", _stored(positional, per_param)),
        Part("model.attention", f"attention '{m.attention.name}' in {m.n_layer} layers", m.n_layer * _stored(attention, per_param)),
        Part("model.ffn", f"ffn '{m.ffn.name}' in {m.n_layer} layers", m.n_layer * _stored(ffn, per_param)),
        Part("model.norm", f"norm '{m.norm.name}'", (2 * m.n_layer + 1) * _stored(norm, per_param)),
        Part("training.batch_size", f"the activations and logits of a micro-batch of {tc.batch_size} x {m.block_size} tokens",
             act_bytes * rows * kept_per_token + 8 * rows * m.vocab_size),
    ]


def size(n: int) -> str:
    """Bytes as GiB, or TiB/PiB/EiB when that many GiB would be hard to read."""
    for unit, scale in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40)):
        if n >= 10 * scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**30:,.1f} GiB"


def free_bytes(device=None) -> int:
    """Memory free for tensors: the CUDA device's, else the machine's available RAM."""
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check(cfg, states_per_param: int, free: int) -> None:
    """Refuse a run whose estimate exceeds ``free`` bytes, naming the key of its largest part."""
    parts = estimate(cfg, states_per_param)
    need = sum(p.bytes for p in parts)
    if need <= free:
        return
    largest = max(parts, key=lambda p: p.bytes)
    raise ConfigError(f"training needs at least {size(need)} (weights, gradients, optimizer state and activations; "
                      f"{largest.what}: {size(largest.bytes)}); {size(free)} is free on this machine: make it smaller "
                      "or lower training.batch_size", largest.key)
