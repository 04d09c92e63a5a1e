"""The component interfaces a gptx model and its training are assembled from (one per kind in
``gptx.kinds.KINDS``; the torch-free ``Component`` and ``Tokenizer`` live in ``gptx.base``).

A plugin implements one of these classes and registers it under a name (see ``hookspecs``).
Shapes use: B batch, T new tokens, P cached (past) tokens, S = P + T keys, C = n_embd,
H = n_head, K = key/value heads (H for multi-head, fewer for grouped-query), D = C // H.

Contracts every component keeps:
- ``Options`` is a small dataclass owned by the component; experiment files set its fields
  next to ``kind``. Validate in ``__post_init__`` (raise ``ValueError("problem")`` or
  ``ValueError(("field", "problem"))``); check combinations in the classmethod ``check``.
- ``supports`` declares what the component can do (``KV_CACHE``, ``ONNX_EXPORT``); tools refuse
  with a clear message instead of producing something wrong.
- No Python branch on a tensor's size in ``forward``: exported ONNX graphs bake such branches
  in. Branch on options or on ``None`` only.
- Attention, feed-forward and block return typed outputs, ``AttentionOutput``,
  ``FeedForwardOutput`` (or a bare tensor) and ``BlockOutput``; their ``aux`` field carries
  auxiliary losses and metrics (see ``Aux``), which the model adds to the training objective.
  Whoever calls a component reads its output through ``<Type>.of(value, component)``, never by
  tuple length.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

from gptx.base import CAPABILITIES, DEFAULT_SUPPORTS, KV_CACHE, ONNX_EXPORT, ONNX_FUSED_ATTENTION, Component, Tokenizer
from gptx.errors import ComponentOutputError

if TYPE_CHECKING:
    from gptx.config import ModelConfig, TrainingConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, K, P, D]: the default cache of a layer
Cache = tuple[torch.Tensor, ...]  # one layer's cache: the tensors its attention declares (``CacheTensor``)


# ---- auxiliary losses and metrics ----------------------------------------------------------

@dataclasses.dataclass
class Aux:
    """What a component reports besides its output. ``losses``: name -> (0-d tensor, weight); the
    training objective is cross-entropy + the sum of weight * loss over every component. ``metrics``:
    name -> 0-d tensor, logged only. Both are logged to MLflow per step as
    ``aux/<layer>.<part>/<name>`` (averaged over the logging interval), losses unweighted.

    Return it in the ``aux`` field of the component's output: ``FeedForwardOutput(y, aux)``,
    ``AttentionOutput(y, present, aux)``, ``BlockOutput(x, present, aux)``. Compute it only when
    it is needed (``self.training``), so decoding and ONNX export carry no extra work."""

    losses: dict[str, tuple[torch.Tensor, float]] = dataclasses.field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


    @staticmethod
    def merged(**parts: Optional["Aux"]) -> Optional["Aux"]:
        """One Aux from several parts' (None where a part reported none), names prefixed
        ``<part>/``: ``Aux.merged(attn=a, ffn=f)`` -> ``ffn/load_balance``, ...; None if all are None."""
        present = {part: aux for part, aux in parts.items() if aux is not None}
        if not present:
            return None
        out = Aux()
        for part, aux in present.items():
            out.losses.update({f"{part}/{name}": value for name, value in aux.losses.items()})
            out.metrics.update({f"{part}/{name}": value for name, value in aux.metrics.items()})
        return out


# ---- what model components return -----------------------------------------------------------

def _qualified(component) -> str:
    cls = type(component)
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(value) -> str:
    """What a component returned, in a few words: ``a tuple of 2 (Tensor [2, 20, 32], int)``."""
    def one(v):
        return f"Tensor {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(one(v) for v in value)})"
    return "None" if value is None else f"a {one(value)}"


_warned: set = set()  # deprecations already reported: once per process, not once per layer and step


def _deprecated(key, message: str, stacklevel: int = 3) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def _legacy_fields(value, lead: int) -> Optional[tuple]:
    """The fields of a pre-typed return value, ``lead`` outputs then optionally an Aux (or None),
    with aux None filled in; None when ``value`` is no such tuple."""
    if not isinstance(value, (tuple, list)) or not lead <= len(value) <= lead + 1:
        return None
    if not isinstance(value[0], torch.Tensor):
        return None
    if len(value) > lead and not (value[-1] is None or isinstance(value[-1], Aux)):
        return None
    return (*value, None)[:lead + 1]


class _Output:
    """The shared part of the typed outputs: ``of`` (the one normaliser of a contract) and the
    deprecated tuple forms kept for plugins written before them."""

    kind: ClassVar[str]  # the component kind, for messages
    expected: ClassVar[str]  # what its forward must return, for messages
    lead: ClassVar[int]  # outputs before the Aux in the legacy tuple

    aux: Optional[Aux]

    def _parts(self) -> tuple:
        """The outputs of the legacy tuple, before its Aux."""
        raise NotImplementedError

    @classmethod
    def of(cls, value, component):
        """``component``'s return value as this type. A legacy tuple is accepted with a one-time
        DeprecationWarning naming the component's class; anything else is a ComponentOutputError."""
        if isinstance(value, cls):
            return value
        fields = _legacy_fields(value, cls.lead)
        if fields is None:
            raise ComponentOutputError(f"{cls.kind} {_qualified(component)} returned {_describe(value)}; "
                                       f"its forward must return {cls.expected}")
        _deprecated((cls, type(component)), f"{_qualified(component)}.forward returned a tuple, which is deprecated "
                    f"and stops working in a future gptx: return {cls.expected} instead")
        return cls(*fields)

    def __iter__(self):
        """Deprecated: unpacks as the tuple the component used to return (``y, present = attn(...)``)."""
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        _deprecated((type(self), "iter", caller), f"{caller} unpacks an output ({type(self).__name__}) as a tuple, which is "
                    f"deprecated and stops working in a future gptx: read its fields instead")
        return iter(self._parts() + (() if self.aux is None else (self.aux,)))


@dataclasses.dataclass(eq=False)  # identity equality: comparing tensors elementwise has no single truth
class AttentionOutput(_Output):
    """What ``Attention.forward`` returns.

    ``y``: [B, T, C], the attention's output (after its output projection, ``c_proj``).
    ``present``: this layer's cache with S = P + T entries, the tensors ``cache_layout()``
    declares in that order (default: key and value, each [B, K, S, D]).
    ``aux``: its auxiliary losses and metrics (``Aux``), or None."""

    kind: ClassVar[str] = "attention"
    expected: ClassVar[str] = "gptx.components.AttentionOutput(y, present, aux=None)"
    lead: ClassVar[int] = 2

    y: torch.Tensor
    present: Cache
    aux: Optional[Aux] = None

    def _parts(self) -> tuple:
        return self.y, self.present


@dataclasses.dataclass(eq=False)
class FeedForwardOutput(_Output):
    """What ``FeedForward.forward`` returns when it reports an ``Aux``: ``y`` [B, T, C] and
    ``aux`` (or None). One without an Aux may return the bare tensor y [B, T, C] instead."""

    kind: ClassVar[str] = "ffn"
    expected: ClassVar[str] = "a tensor [B, T, C] or gptx.components.FeedForwardOutput(y, aux=None)"
    lead: ClassVar[int] = 1

    y: torch.Tensor
    aux: Optional[Aux] = None

    def _parts(self) -> tuple:
        return (self.y,)

    @classmethod
    def of(cls, value, component) -> "FeedForwardOutput":
        if isinstance(value, torch.Tensor):  # the plain form, not deprecated
            return cls(value)
        return super().of(value, component)


@dataclasses.dataclass(eq=False)
class BlockOutput(_Output):
    """What ``Block.forward`` returns.

    ``x``: [B, T, C], the residual stream after the layer.
    ``present``: this layer's cache with S = P + T entries (its attention's ``present``).
    ``aux``: the auxiliary losses and metrics of its parts, or None; a block with several parts
    reporting them joins them with ``Aux.merged(attn=..., ffn=...)``."""

    kind: ClassVar[str] = "block"
    expected: ClassVar[str] = "gptx.components.BlockOutput(x, present, aux=None)"
    lead: ClassVar[int] = 2

    x: torch.Tensor
    present: Cache
    aux: Optional[Aux] = None

    def _parts(self) -> tuple:
        return self.x, self.present


def split_aux(out, parts: int) -> tuple[tuple, Optional[Aux]]:
    """Deprecated, kept for plugins written before the typed outputs: a component's return value
    -> (its ``parts`` outputs, its Aux or None). Use ``AttentionOutput.of(out, component)``
    (``FeedForwardOutput.of``, ``BlockOutput.of``) and read the fields."""
    caller = sys._getframe(1).f_globals.get("__name__", "?")
    _deprecated(("split_aux", caller), f"gptx.components.split_aux (called from {caller}) is deprecated and goes in a "
                "future gptx: use AttentionOutput.of(out, component), FeedForwardOutput.of or BlockOutput.of "
                "and read the fields")
    if isinstance(out, _Output):
        return out._parts(), out.aux
    if parts == 1 and not isinstance(out, tuple):
        return (out,), None
    if len(out) == parts + 1 and (out[-1] is None or isinstance(out[-1], Aux)):
        return tuple(out[:-1]), out[-1]
    return tuple(out), None


# ---- caches declared by attention ----------------------------------------------------------

BATCH, SEQ = "batch", "seq"  # symbolic axes of a cache tensor; the other axes are fixed sizes


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """One tensor of a layer's cache, as the attention declares it. ``dims`` holds ``BATCH``,
    ``SEQ`` (the axis that grows by one entry per token) and fixed sizes, e.g. the default key:
    ``("batch", K, "seq", D)``. The exported graph names it ``past_key_values.<layer>.<name>``
    (input) and ``present.<layer>.<name>`` (output)."""

    name: str
    dims: tuple
    dtype: torch.dtype = torch.float32

    @property
    def seq_axis(self) -> int:
        return self.dims.index(SEQ)

    def stored_as(self, float_dtype: torch.dtype) -> torch.dtype:
        """The dtype the tensor is kept in: a floating-point declaration follows the model's
        ``float_dtype`` (bf16 decoding, the fp32 export); any other (int8 codes) is kept as declared."""
        return float_dtype if self.dtype.is_floating_point else self.dtype

    def empty(self, batch: int, length: int, device=None, dtype=None) -> torch.Tensor:
        """Zeros with ``length`` entries along the growing axis: [..., length, ...]."""
        shape = [batch if d == BATCH else length if d == SEQ else d for d in self.dims]
        return torch.zeros(shape, device=device, dtype=dtype or self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "seq_axis": self.seq_axis,
                "dtype": str(self.dtype).removeprefix("torch.")}


def kv_layout(kv_heads: int, head_dim: int) -> tuple[CacheTensor, CacheTensor]:
    """The default (GPT-2) cache: key and value [B, K, S, D]."""
    return (CacheTensor("key", (BATCH, kv_heads, SEQ, head_dim)), CacheTensor("value", (BATCH, kv_heads, SEQ, head_dim)))


class CacheBuffer(tuple):
    """A layer's cache whose tensors are views of the first P entries of preallocated buffers
    (``GPT.empty_cache(..., capacity=...)``, used by ``gptx.generate``): ``append_cache`` writes
    new entries in place instead of copying the whole cache every token. It is still a tuple of
    tensors, so an attention that concatenates stays correct, only slower."""

    def __new__(cls, buffers: Sequence[torch.Tensor], axes: Sequence[int], length: int):
        views = (b.narrow(axis, 0, length) for b, axis in zip(buffers, axes))
        cache = super().__new__(cls, views)
        cache.buffers, cache.axes, cache.length = tuple(buffers), tuple(axes), length
        return cache




def append_cache(past: Optional[Cache], new: Sequence[torch.Tensor], axes: Sequence[int]) -> Cache:
    """The cache extended by ``new`` (each tensor's entries along its growing axis in ``axes``).
    In place when ``past`` is a CacheBuffer with room, else one concatenation per tensor (also
    in exported graphs)."""
    if past is None:
        return tuple(new)
    T = new[0].shape[axes[0]]
    if isinstance(past, CacheBuffer) and past.length + T <= past.buffers[0].shape[past.axes[0]]:
        for buffer, t, axis in zip(past.buffers, new, axes):
            buffer.narrow(axis, past.length, T).copy_(t)  # slots after every earlier view: no view sees them change
        return CacheBuffer(past.buffers, axes, past.length + T)
    return tuple(torch.cat([p, t], dim=axis) for p, t, axis in zip(past, new, axes))


def append_kv(past: Optional[KV], k: torch.Tensor, v: torch.Tensor) -> KV:
    """The default cache extended by the new keys and values [B, K, T, D]: ([B, K, P+T, D], [B, K, P+T, D])."""
    return append_cache(past, (k, v), (2, 2))


__all__ = [
    "CAPABILITIES", "DEFAULT_SUPPORTS", "KV_CACHE", "ONNX_EXPORT", "ONNX_FUSED_ATTENTION", "KV", "Cache", "Aux",
    "AttentionOutput", "FeedForwardOutput", "BlockOutput", "split_aux", "CacheTensor", "kv_layout", "CacheBuffer",
    "append_cache", "append_kv", "Component",
    "PositionalEncoding", "Attention", "FeedForward", "Norm", "NormPlacement", "Block", "Tokenizer",
    "Dataset", "Optimizer", "Schedule",
]


class PositionalEncoding(Component, nn.Module, abc.ABC):
    """Where position enters the model. One instance per model, shared by every layer.

    It may act at up to three points; the defaults do nothing there:
    ``embed`` adds to the token embeddings (called by the model), ``rotate`` turns queries and
    keys (called by attention), ``score_bias`` biases attention scores (called by attention).
    """

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options

    @classmethod
    def max_positions(cls, config: "ModelConfig", options) -> Optional[int]:
        """Longest sequence this encoding can represent; None when unbounded."""
        return None

    def embed(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """positions [B, T] (int64) -> [B, T, C] added to the token embeddings, or None."""
        return None

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> KV:
        """q [B, H, T, D], k [B, K, T, D], positions [B, T] -> rotated (q, k) of the same shapes."""
        return q, k

    def score_bias(self, q_index: torch.Tensor, k_index: torch.Tensor) -> Optional[torch.Tensor]:
        """q_index [T], k_index [S]: absolute slots in the sequence (keys 0..S-1, queries P..S-1).
        Returns [H, T, S] added to the attention scores, or None. Left padding keeps real tokens
        contiguous, so slot distances equal position distances."""
        return None


class Attention(Component, nn.Module, abc.ABC):
    """Self-attention with a key/value cache.

    ``forward`` takes the hidden states of T new tokens and the cache of the P tokens before
    them (P may be 0) and returns an ``AttentionOutput``: the output and the cache extended by
    the new tokens (and optionally an ``Aux``). The mask comes from slot indices (keys 0..S-1,
    queries P..S-1) and ``attention_mask``, never from ``is_causal`` when a past exists: a past
    makes ``is_causal`` top-left aligned, i.e. wrong.
    Name the output projection ``c_proj``: the model scales its initialisation as GPT-2 does.
    """

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options

    @property
    def n_kv_heads(self) -> int:
        """K, the number of key/value heads kept in the default cache."""
        return self.config.n_head

    def cache_layout(self) -> tuple[CacheTensor, ...]:
        """The tensors of this layer's cache, in the order ``past`` and ``present`` hold them.
        Default: key and value [B, K, S, D] (GPT-2's layout, which onnxruntime-genai reads).
        An attention that caches something else (a compressed latent) declares it here; the
        model, the ONNX export, the onnxruntime generator, Node and the browser follow it."""
        return kv_layout(self.n_kv_heads, self.config.head_dim)

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        positions: torch.Tensor,  # [B, T] int64 position ids of the new tokens
        positional: PositionalEncoding,
        past: Optional[Cache] = None,  # the declared cache with P entries (default ([B, K, P, D], [B, K, P, D])) or None
        attention_mask: Optional[torch.Tensor] = None,  # [B, S] 1 = real token, 0 = padding
    ) -> AttentionOutput:  # y [B, T, C], present: the cache with S entries, aux: Aux or None
        ...


class FeedForward(Component, nn.Module, abc.ABC):
    """The position-wise network of a block: ``forward(x [B, T, C])`` returns y [B, T, C], or a
    ``FeedForwardOutput(y, aux)`` to report an ``Aux``. Name the output projection ``c_proj``
    (see ``Attention``)."""

    def __init__(self, config: "ModelConfig", options):
        super().__init__()
        self.config, self.options = config, options


class Norm(Component, nn.Module, abc.ABC):
    """A normalisation layer over the last dimension: [..., C] -> [..., C]."""

    def __init__(self, dim: int, options):
        super().__init__()
        self.dim, self.options = dim, options


class NormPlacement(Component, nn.Module, abc.ABC):
    """Where the norms sit around one residual branch (attention or feed-forward).

    ``make_norm()`` builds one norm layer of the configured kind; a placement owns the norms it
    makes. ``final_norm`` says whether the model applies one more norm before the LM head.
    """

    final_norm: ClassVar[bool] = True

    def __init__(self, make_norm: Callable[[], Norm], options):
        super().__init__()
        self.options = options

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x [B, T, C], branch maps [B, T, C] -> [B, T, C]; returns the new residual stream [B, T, C]."""


class Block(Component, nn.Module, abc.ABC):
    """One layer of the model: how attention, the feed-forward network and norms are wired
    around the residual stream. Built once per layer as ``cls(config, options, layer)``; the
    ``make_*`` helpers build the configured components (a block may build several of each).

    ``forward`` takes the residual stream of the new tokens and this layer's cache, and returns a
    ``BlockOutput``: the new stream and the extended cache (and optionally an ``Aux``). It reads
    its parts' outputs through ``AttentionOutput.of`` and ``FeedForwardOutput.of``, which also
    accept third-party components written before the typed outputs. ``final_norm``: whether
    the model applies one more norm before the LM head."""

    final_norm: bool = True

    def __init__(self, config: "ModelConfig", options, layer: int):
        super().__init__()
        self.config, self.options, self.layer = config, options, layer

    def make_attention(self) -> Attention:
        spec = self.config.attention
        return spec.cls(self.config, spec.options)

    def make_ffn(self) -> FeedForward:
        spec = self.config.ffn
        return spec.cls(self.config, spec.options)

    def make_norm(self) -> Norm:
        spec = self.config.norm
        return spec.cls(self.config.n_embd, spec.options)

    def attention(self) -> "Attention":
        """The block's attention: the one ``Attention`` among its modules, whatever its attribute
        is called. A block with none or several overrides ``cache_layout`` (and this)."""
        found = [m for m in self.modules() if isinstance(m, Attention)]
        if len(found) != 1:
            raise TypeError(f"{type(self).__qualname__} holds {len(found)} Attention modules, so its cache is not "
                            "one attention's: override cache_layout() and attention()")
        return found[0]

    def cache_layout(self) -> tuple[CacheTensor, ...]:
        """This layer's cache: its attention's declaration."""
        return self.attention().cache_layout()

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        positions: torch.Tensor,  # [B, T]
        positional: PositionalEncoding,
        past: Optional[Cache],  # this layer's cache with P entries, or None
        attention_mask: Optional[torch.Tensor],  # [B, S] or None
    ) -> BlockOutput:  # x [B, T, C], present: the cache with S entries, aux: Aux or None
        ...


class Dataset(Component, abc.ABC):
    """Training and validation tokens, served as windows of ``block_size + 1`` tokens. Its
    ``Options`` are the ``[data]`` table (paths in it are relative to the experiment file:
    ``base_dir``). Not a torch module.

    ``prepare()`` does everything that can fail on bad data (read, check, tokenize or map,
    fit a tokenizer that learns from data) before anything is created, reporting progress
    through ``progress(line)``; raise ``ConfigError(problem, "data.<key>")`` there.
    Training batches come from the dataset's own generator, seeded by ``seed``:
    ``batch(count, rows)`` draws the next ``count`` windows and returns the rows ``rows`` of
    them (every rank of a distributed run draws the same global batch and reads only its
    rows); ``state_dict()`` is its position in that stream (saved in every checkpoint, plain
    data and tensors only), so a resumed run continues the very same batches."""

    supports = frozenset()

    def __init__(self, options, *, base_dir: Path, tokenizer: Tokenizer, block_size: int, seed: int,
                 progress: Optional[Callable[[str], None]] = None):
        self.options, self.base_dir, self.tokenizer = options, Path(base_dir), tokenizer
        self.block_size, self.seed, self.progress = block_size, seed, progress or (lambda line: None)

    @abc.abstractmethod
    def prepare(self) -> None: ...

    @abc.abstractmethod
    def tokens(self, split: str) -> int:
        """How many tokens the split ("train" or "val") holds."""

    @abc.abstractmethod
    def batch(self, count: int, rows: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``count`` training windows; inputs and targets [len(rows) or count, T] int64."""

    @abc.abstractmethod
    def windows(self, split: str, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random windows of a split drawn with ``generator``: inputs, targets [count, T]."""

    @abc.abstractmethod
    def tiled_windows(self, split: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-overlapping windows tiling the split (evenly spaced ones when they hold more than
        ``max_tokens`` tokens): inputs, targets [N, T]."""

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class Optimizer(Component, abc.ABC):
    """Builds the torch optimizer for a model. Its ``Options`` are the ``[training.optimizer]``
    table; ``check(training, options)`` receives the ``TrainingConfig``.

    ``build`` gets the model's trainable parameters by name and returns one
    ``torch.optim.Optimizer`` (several can be joined with ``gptx.optim.Chain``). Each parameter
    group's ``lr`` at build time is its peak learning rate: the schedule multiplies it every
    step. The optimizer's whole ``state_dict()`` goes into ``trainer.pt`` and is restored on
    ``--resume`` (bitwise on CPU)."""

    supports = frozenset()
    sharded_ok: ClassVar[bool] = True  # works on FSDP-sharded parameters (DTensors)
    states_per_param: ClassVar[int] = 2  # tensors of state per parameter (AdamW's two moments): the memory check's floor

    def __init__(self, options, training: "TrainingConfig"):
        self.options, self.training = options, training

    @abc.abstractmethod
    def build(self, named_parameters: list[tuple[str, nn.Parameter]], device: torch.device) -> torch.optim.Optimizer: ...


class Schedule(Component, abc.ABC):
    """The learning rate over the run: ``factor(step)`` multiplies every parameter group's peak
    learning rate at optimizer step ``step`` (0-based). Its ``Options`` are the
    ``[training.schedule]`` table; ``check(training, options)`` receives the ``TrainingConfig``."""

    supports = frozenset()

    def __init__(self, options, training: "TrainingConfig"):
        self.options, self.training = options, training

    @abc.abstractmethod
    def factor(self, step: int) -> float: ...


# ---- helpers shared by attention implementations -------------------------------------------

def slot_indices(past_len, new_len, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute slots of the new tokens [T] and of all keys [S]. Works on symbolic sizes."""
    k_index = torch.arange(past_len + new_len, device=device)  # [S]
    return k_index[past_len:], k_index  # [T], [S]


def attention_allowed(
    q_index: torch.Tensor,  # [T]
    k_index: torch.Tensor,  # [S]
    attention_mask: Optional[torch.Tensor] = None,  # [B, S]
    window: Optional[int] = None,
) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S]: True where a query may attend to a key (causal, optional
    sliding window of ``window`` keys including itself, padding keys masked out)."""
    allowed = k_index[None, :] <= q_index[:, None]  # [T, S]
    if window is not None:
        allowed = allowed & (q_index[:, None] - k_index[None, :] < window)  # [T, S]
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # [B, 1, T, S]
        # a left-padding query sees no real key before it; let it see itself so softmax stays finite
        allowed = allowed | (k_index[None, :] == q_index[:, None])[None, None]
    return allowed


def gpt2_init_std(config: "ModelConfig", residual: bool) -> float:
    """GPT-2's init: std 0.02, residual output projections scaled by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02


def __getattr__(name: str):
    if name == "KVBuffer":  # the name before attention declared its caches; plugins written then still import it
        import warnings

        warnings.warn("gptx.components.KVBuffer is now CacheBuffer", DeprecationWarning, stacklevel=2)
        return CacheBuffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
