"""gptx_export.json, typed, and written from one place.

``ExportManifest`` is built once, at the end of ``export_checkpoint``, from what each step
returned: the ``Description`` (what the checkpoint says, known before any graph exists), the
``VerifiedGraph`` (what exporting and verifying the graph found), the quantization's report, and
the files written. ``to_dict`` is the file's JSON (readers validate it with
``gptx.schemas.ExportMeta``); ``graph_metadata`` is the copy model.onnx carries. The keys and
their order are the file's format: change them only with EXPORT_FORMAT_VERSION.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from gptx import __version__
from gptx.export import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, IO_CONTRACT, IO_CONTRACT_VERSION, SHARE_BUFFER, input_names, output_names, tokenizer_hash

if TYPE_CHECKING:
    from gptx.export.verify import Report


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    n_layer: int
    n_head: int
    kv_heads: int
    head_dim: int
    n_embd: int
    vocab_size: int
    context_length: int
    parameters: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenizerFacts:
    """What a runtime needs to rebuild the tokenizer and check it is the one trained with."""

    kind: str
    options: dict
    state: Any
    class_path: str  # "module:QualName", the file's "class"
    vocab_size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "options": self.options, "state": self.state, "class": self.class_path,
                "vocab_size": self.vocab_size, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Description:
    """The export as the checkpoint describes it: the I/O names, the cache layout, the model's
    sizes, its config, the tokenizer and special tokens, the requested opset and quantization."""

    cache: list[dict]  # per layer, as ``export_cache`` records it
    model: ModelFacts
    config: dict
    tokenizer: TokenizerFacts
    special_tokens: dict  # name -> {"id", "text"}
    opset: int
    quantization: Optional[str]
    checkpoint: str
    step: Optional[int]

    def to_dict(self, shared_buffer: Optional[bool] = None) -> dict:
        """The file's leading keys; ``shared_buffer`` (known once the graph is verified) joins the
        I/O contract. Readers such as ``gptx.export.genai`` take this dict."""
        io_contract = {"name": IO_CONTRACT, "version": IO_CONTRACT_VERSION,
                       "inputs": input_names(self.model.n_layer, self.cache), "outputs": output_names(self.model.n_layer, self.cache)}
        if shared_buffer is not None:
            io_contract[SHARE_BUFFER] = shared_buffer
        return {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "gptx_version": __version__,
            "io_contract": io_contract,
            "cache": self.cache,
            "model": self.model.to_dict(),
            "config": self.config,
            "tokenizer": self.tokenizer.to_dict(),
            "special_tokens": self.special_tokens,
            "opset": self.opset,
            "quantization": self.quantization,
            "source": {"checkpoint": self.checkpoint, "step": self.step},
        }


@dataclasses.dataclass(frozen=True)
class VerifiedGraph:
    """What exporting and verifying the graph kept found (``_export_verified``)."""

    export_seconds: float  # torch.onnx.export of the graph kept
    report: "Report"  # its verification; ``fusions``: its onnxruntime operators
    seconds: float  # exporting, fusing and verifying, fallbacks included

    def to_dict(self) -> dict:
        return {"export_seconds": self.export_seconds, "fusions": self.report.fusions,
                "verification": self.report.to_dict() | {"seconds": self.seconds}}


@dataclasses.dataclass(frozen=True)
class ExportManifest:
    description: Description
    graph: VerifiedGraph
    quantization_report: Optional[dict]  # ``quantize.compare``'s facts; None unquantized
    files: list[str]  # what the export directory holds
    total_seconds: float

    def graph_metadata(self) -> dict:
        """What model.onnx carries (metadata_props): everything but this run's files and time."""
        meta = self.description.to_dict(self.graph.report.shared_buffer) | self.graph.to_dict()
        if self.quantization_report is not None:
            meta["quantization_report"] = self.quantization_report
        return meta

    def to_dict(self) -> dict:
        """gptx_export.json."""
        return self.graph_metadata() | {"files": self.files, "total_seconds": self.total_seconds}


def describe(ck, cache: list[dict], opset: int, quantization: Optional[str]) -> Description:
    """The ``Description`` of exporting checkpoint ``ck`` (``cache``: its layers' cache layout)."""
    cfg, tok, m = ck.config, ck.tokenizer, ck.model
    options = cfg.tokenizer.to_dict()
    kind = options.pop("kind")
    state = tok.state()
    tokenizer = TokenizerFacts(
        kind=kind, options=options, state=state, class_path=f"{type(tok).__module__}:{type(tok).__qualname__}",
        vocab_size=tok.vocab_size, sha256=tokenizer_hash(kind, options, state),
    )
    special = {} if tok.eot_id is None else {"eot": {"id": int(tok.eot_id), "text": tok.decode([tok.eot_id])}}
    model = ModelFacts(
        n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, kv_heads=m.kv_heads, head_dim=cfg.model.head_dim,
        n_embd=cfg.model.n_embd, vocab_size=cfg.model.vocab_size, context_length=cfg.model.block_size,
        parameters=m.num_params(),
    )
    return Description(cache=cache, model=model, config=cfg.to_dict(), tokenizer=tokenizer, special_tokens=special,
                       opset=opset, quantization=quantization, checkpoint=str(ck.path), step=ck.meta.get("step"))
