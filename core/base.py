"""The torch-free part of the component interfaces: the base every component shares, the
capability names, and the tokenizer interface (tokenizers run beside onnxruntime, without torch).
``gptx.components`` re-exports all of it next to the torch interfaces."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Iterable, Optional

from gptx.options import NoOptions

if TYPE_CHECKING:
    from gptx.config import ModelConfig

KV_CACHE = "kv_cache"  # correct cached decoding (zero-length past, 1-token steps, chunked prefill)
ONNX_EXPORT = "onnx_export"  # exports with torch.onnx (dynamo) to the gptx decoder contract
ONNX_FUSED_ATTENTION = "onnx_fused_attention"  # attention that exports as onnxruntime's fused op (gptx.export.attention)
CAPABILITIES = (KV_CACHE, ONNX_EXPORT, ONNX_FUSED_ATTENTION)
# what a component claims unless it declares otherwise; opt-in capabilities (ONNX_FUSED_ATTENTION)
# are never defaulted: each promises code the component must implement itself
DEFAULT_SUPPORTS = frozenset({KV_CACHE, ONNX_EXPORT})


class Component:
    """What every registered component shares."""

    Options: ClassVar[type] = NoOptions
    supports: ClassVar[frozenset[str]] = DEFAULT_SUPPORTS
    # the built-in component of the same kind whose parameters (state-dict keys and shapes) and
    # function this one has, given the options they share by name: an exporter that knows the
    # built-in (``gptx export --format hf``) then exports this one as it. ``gptx check-plugin``
    # compares the two on the same weights, so a false declaration fails conformance.
    hf_equivalent: ClassVar[Optional[str]] = None

    @classmethod
    def check(cls, model: "ModelConfig", options) -> None:
        """Reject an incompatible combination with the model: raise ``ValueError(("key", "problem"))``
        where key is relative to the ``[model]`` table (e.g. ``"block_size"``)."""


class Tokenizer(Component, abc.ABC):
    """Text <-> token ids. Not a torch module; its ``state()`` is saved with every checkpoint.

    A tokenizer that learns from data (``requires_fit``) gets ``fit(text)`` once with the training
    text; ``state()`` must then hold everything needed to rebuild it via ``cls(options, state)``.
    """

    requires_fit: ClassVar[bool] = False
    # the schema of state() as checkpoints, prepared data and exports store it: a gptx.schemas.Schema
    # (pydantic) subclass, checked before the stored state reaches __init__; None: any JSON object
    State: ClassVar[Optional[type]] = None
    # encode(a + b) == encode(a) + encode(b) wherever gptx.prepare.safe_cut cuts (after a newline
    # or before a space, each between non-space characters): gptx then tokenizes big text in
    # pieces, in parallel, with bounded memory. Otherwise it hands encode() the whole text.
    encodes_in_pieces: ClassVar[bool] = False
    supports = frozenset()

    def __init__(self, options, state: Optional[dict] = None):
        self.options = options

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> Optional[int]:
        """The end-of-text token id, where the vocabulary has one; generation stops at it."""
        return None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def fit(self, text: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not learn from data")

    def fit_pieces(self, pieces: Iterable[str]) -> None:
        """``fit`` on the text given as consecutive pieces (a stream read from disk). The default
        joins them; override it to learn without holding the whole text in memory."""
        self.fit("".join(pieces))

    def state(self) -> dict:
        """JSON-serialisable state beyond the options (e.g. a learned vocabulary)."""
        return {}

    def tokenizer_json(self) -> Optional[dict]:
        """This tokenizer as a Hugging Face ``tokenizers`` description (a tokenizer.json's content)
        that encodes every text to exactly the ids ``encode`` gives (special tokens not added) and
        decodes ids as ``decode`` does, for the fitted tokenizer where it learns from data.
        Exports write it as tokenizer.json, so Node, the web page and transformers run this
        tokenizer without gptx. None (the default): it has no such description; the ONNX export
        still runs in gptx's Python, the rest refuse it on one line."""
        return None
