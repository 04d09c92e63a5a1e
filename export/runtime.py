"""Generate from an export directory with onnxruntime alone (no torch import on this path).

The KV cache stays in onnxruntime's own tensors (OrtValue) from one step to the next
(``KVDecoder``); only the logits come back to numpy for sampling (gptx.sampling, shared with
the PyTorch generator, so the same seed gives the same tokens).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from gptx.base import Tokenizer
from gptx.errors import GptxError, first_line, read_format_json
from gptx.schemas import graph_mismatch
from gptx.export import (
    EXPORT_FORMAT, EXPORT_FORMAT_VERSION, IO_CONTRACT, IO_CONTRACT_VERSION, META_FILE, MODEL_FILE,
    ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, cache_layout, empty_past, input_names, output_names, shares_buffer, tokenizer_hash,
)

from gptx.sampling import Collector, Generation, Sampler, left_pad, positions_from_mask

_UNSET = object()


def make_session(path, threads: Optional[int] = None):
    """A CPU InferenceSession on ``threads`` (by default the CPUs free now, ``gptx.threads``) whose
    worker threads spin between kernels only while each has a CPU to itself
    (``gptx.threads.spinning_pays``), and sleep otherwise, so they never starve a neighbour."""
    import onnxruntime as ort

    from gptx.threads import choose_threads, spinning_pays

    n = choose_threads(threads)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning_pays(n) else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")  # sequential execution: no inter-op pool
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, said once in gptx's words
    so.intra_op_num_threads = n
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_refusals() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises when it refuses a graph: at load (an invalid graph,
    an operator with no kernel for these attributes or types) or at run (a kernel refusing its
    inputs). They are its own classes, not RuntimeError subclasses; a function so that importing
    gptx.export.runtime does not load onnxruntime."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.NotImplemented,
            ort_state.RuntimeException)


def read_meta(directory: Path) -> dict:
    """An export's gptx_export.json, validated whole (gptx.schemas.ExportMeta): a GptxError
    ``PATH: key: problem`` names the first problem."""
    from gptx.schemas import ExportMeta, validate

    path = Path(directory) / META_FILE
    meta = read_format_json(path, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, "gptx export")
    validate(ExportMeta, meta, path)
    return meta


ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)", "uint8": "tensor(uint8)",
              "int32": "tensor(int32)", "int64": "tensor(int64)"}  # a cache dtype -> onnxruntime's name for it


def check_graph_matches(session, meta: dict, cache: list[dict], model_path: Path) -> None:
    """The graph must be the one the metadata describes (``cache``: its layout): its fixed sizes and
    input dtypes, and the copy of the metadata the exporter wrote into it (context, cache, tokenizer,
    special tokens), so a model.onnx swapped for another graph with the same names, or a
    gptx_export.json edited by hand, is refused before it decodes garbage."""
    declared = {f"past_key_values.{i}.{c['name']}": c["dims"] for i in range(meta["model"]["n_layer"]) for c in cache}
    for arg in session.get_inputs():
        want = declared.get(arg.name)
        if want is not None and any(type(w) is int and type(g) is int and w != g for w, g in zip(want, arg.shape)):
            raise GptxError(f"{model_path}: {arg.name} has shape {arg.shape} but {META_FILE} declares {want}: "
                            "the graph and its metadata do not belong together")
    types = {INPUT_IDS: "int64", ATTENTION_MASK: "int64", POSITION_IDS: "int64"} | {
        f"past_key_values.{i}.{c['name']}": c["dtype"] for i in range(meta["model"]["n_layer"]) for c in cache}
    for arg in session.get_inputs():
        want = ONNX_TYPES.get(types.get(arg.name))
        if want is not None and arg.type != want:
            raise GptxError(f"{model_path}: {arg.name} is {arg.type} but {META_FILE} declares {want}: "
                            "the graph and its metadata do not belong together")
    logits = next(o for o in session.get_outputs() if o.name == LOGITS)
    vocab = logits.shape[-1] if logits.shape else None
    if type(vocab) is int and vocab != meta["model"]["vocab_size"]:
        raise GptxError(f"{model_path}: logits have {vocab} entries per token but {META_FILE} says vocab_size "
                        f"{meta['model']['vocab_size']}: the graph and its metadata do not belong together")
    stored = session.get_modelmeta().custom_metadata_map.get("gptx.metadata")
    if stored is not None:  # what the exporter wrote into the graph itself: the runtime fields must agree
        try:
            graph = json.loads(stored)
        except ValueError:
            graph = None
        found = graph_mismatch(meta, graph) if isinstance(graph, dict) else "gptx.metadata: not JSON in the graph"
        if found:
            raise GptxError(f"{model_path.parent / META_FILE}: {found}: the graph and its metadata do not belong together")


def _plugin_module(module: str) -> bool:
    """Whether ``module`` belongs to gptx or to a package that declares an installed ``gptx``
    entry point (a plugin the user installed)."""
    import importlib.metadata

    top = module.split(".")[0]
    if not top:
        return False
    return top == "gptx" or any(ep.module.split(".")[0] == top for ep in importlib.metadata.entry_points(group="gptx"))


def load_tokenizer(info: dict, where: Path | str = META_FILE) -> Tokenizer:
    """Rebuild the export's tokenizer from its class, options and state (``info``: the validated
    ``tokenizer`` table of ``where``); the options and state are checked by the tokenizer's schemas."""
    from gptx.errors import ConfigError
    from gptx.options import parse
    from gptx.schemas import tokenizer_state

    module, _, qualname = str(info.get("class", "")).partition(":")
    if not _plugin_module(module):  # metadata is data: it may not choose what code gets imported
        raise GptxError(f"tokenizer class {info.get('class')} is not from gptx or an installed gptx plugin; "
                        f"{META_FILE} may have been altered")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise GptxError(f"tokenizer '{info.get('kind')}' ({info.get('class')}) is not available here: {err}; "
                        "install the plugin that provides it") from None
    if not (isinstance(obj, type) and issubclass(obj, Tokenizer)):
        raise GptxError(f"{info.get('class')} is not a gptx tokenizer")
    try:
        options = parse(obj.Options, dict(info.get("options") or {}), "tokenizer.options")
    except ConfigError as err:
        raise GptxError(f"{where}: {err}") from None
    state = tokenizer_state(obj, info.get("state"), where, "tokenizer.state")
    digest = tokenizer_hash(info.get("kind"), info.get("options") or {}, state)
    if digest != info.get("sha256"):  # read_meta checked it; a caller may hand a table of its own
        raise GptxError(f"{where}: tokenizer.sha256: does not match the tokenizer's kind, options and state (altered)")
    try:
        tokenizer = obj(options, state or None)
        vocab = tokenizer.vocab_size
    except GptxError as err:
        raise GptxError(f"{where}: tokenizer: {err}") from None
    if info.get("vocab_size") not in (None, vocab):  # e.g. a char vocabulary shortened by hand
        raise GptxError(f"{where}: tokenizer.vocab_size: {info['vocab_size']}, but its state gives {vocab} tokens")
    return tokenizer


class OnnxGenerator:
    """Batched generation with a KV cache on an exported ``model.onnx``.

    >>> gen = OnnxGenerator("out/")
    >>> result = gen.generate([gen.tokenizer.encode("Hello")], 20, Sampler(temperature=0))
    """

    def __init__(self, directory: str | os.PathLike, threads: Optional[int] = None):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        model_path = self.directory / MODEL_FILE
        if not model_path.is_file():
            raise GptxError(f"{self.directory}: missing {MODEL_FILE}")
        m = self.meta["model"]
        self.n_layer, self.context_length = m["n_layer"], m["context_length"]
        self.cache = cache_layout(self.meta)  # each layer's cache tensors
        self.tokenizer = load_tokenizer(self.meta["tokenizer"], self.directory / META_FILE)
        if self.tokenizer.vocab_size > m["vocab_size"]:
            raise GptxError(f"{self.directory / META_FILE}: corrupted (the tokenizer has {self.tokenizer.vocab_size:,} tokens, "
                            f"more than model.vocab_size {m['vocab_size']:,})")
        eot = self.meta.get("special_tokens", {}).get("eot")
        self.eot_id = None if eot is None else int(eot["id"])
        try:
            self.session = make_session(model_path, threads)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise GptxError(f"{model_path}: onnxruntime cannot load it ({first_line(err) or type(err).__name__})") from None
        self.inputs, self.outputs = input_names(self.n_layer, self.cache), output_names(self.n_layer, self.cache)
        have_in = [i.name for i in self.session.get_inputs()]
        have_out = [o.name for o in self.session.get_outputs()]
        if sorted(have_in) != sorted(self.inputs) or sorted(have_out) != sorted(self.outputs):
            raise GptxError(f"{model_path}: its inputs/outputs do not follow {IO_CONTRACT}/{IO_CONTRACT_VERSION}")
        check_graph_matches(self.session, self.meta, self.cache, model_path)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler, eot_id=_UNSET,
                 stop=None) -> Generation:
        """Continue each prompt by up to ``max_new_tokens`` tokens (left-padded batch), stopping a
        prompt at the end-of-text token or where ``stop`` says. Same contract as ``gptx.generate.generate_ids``."""
        eot_id = self.eot_id if eot_id is _UNSET else eot_id
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GptxError("--prompt: a prompt must not be empty")
        limit = self.context_length  # past it, each new token sees the last `limit` (nanoGPT's crop, as torch)
        kept = [list(p[-(limit - 1):]) if limit > 1 else list(p[-1:]) for p in prompts]
        decoder = KVDecoder(self.session, self.n_layer, self.cache, shares_buffer(self.meta), str(self.directory / MODEL_FILE), limit)
        out = Collector(len(prompts), eot_id, stop)
        logits = decoder.start(kept, max_new_tokens)  # [B, T, V]
        for _ in range(max_new_tokens):
            nxt = sampler(logits[:, -1, :self.tokenizer.vocab_size])  # [B]: a padded vocabulary's extra ids never
            if out.add(nxt) or decoder.steps == max_new_tokens:
                break
            logits = decoder.step(nxt) if decoder.length < limit else decoder.window(nxt, limit)  # [B, T, V]
        return Generation(prompt_ids=[list(p) for p in prompts], ids=out.ids)


def run_shared(session, inputs: list[str], outputs: list[str], feeds: list) -> np.ndarray:
    """One run with the cache shared: ``feeds`` (OrtValues in ``inputs``' order) end with the past
    buffers, and each is bound as its layer's present too, so the graph writes the new entries into
    it in place (io_contract.past_present_share_buffer). Returns the logits [B, T, V]."""
    binding = session.io_binding()
    for name, value in zip(inputs, feeds):
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(LOGITS)
    buffers = feeds[len(feeds) - (len(outputs) - 1):]  # the pasts, in the presents' order
    for name, value in zip(outputs[1:], buffers):
        binding.bind_ortvalue_output(name, value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


class KVDecoder:
    """One generation on an exported graph: ``start`` runs the left-padded prompts, each ``step``
    feeds one new token per row. The KV cache stays in onnxruntime's own tensors (OrtValue).

    Two ways to keep it, chosen by what the export declares:
    - ``shared`` (``io_contract.past_present_share_buffer``): one preallocated buffer per cache
      tensor, as long as the generation (the context at most), bound as both past and present; the graph
      writes each step's new keys and values into it in place (the mask's width says how much of
      it is filled). Nothing is copied per token.
    - otherwise each step hands the previous step's ``present.*`` back as ``past_key_values.*``
      (no copy here, but the graph concatenates the whole cache every token).
    gptx's generator and the export's quantization report decode through this one loop."""

    def __init__(self, session, n_layer: int, cache: list[dict], shared: bool = False, where: str = MODEL_FILE,
                 context: Optional[int] = None):
        self.session, self.n_layer, self.cache, self.shared = session, n_layer, cache, shared
        self.where = where  # the graph's path, for errors
        self.context = context  # the most tokens one run sees (the window past it): a shared buffer's size at most
        self.inputs, self.outputs = input_names(n_layer, cache), output_names(n_layer, cache)
        self.steps = 0  # session runs so far: the prompt is 1

    def start(self, prompts: list[list[int]], max_new_tokens: int) -> np.ndarray:
        """Run the prompts (left-padded); returns their logits [B, T, V]."""
        B, longest = len(prompts), max(len(p) for p in prompts)
        ids, mask = left_pad([list(p) for p in prompts])  # [B, T] int64 each
        self.pos = positions_from_mask(mask)  # [B, T]
        # ids and mask grow by one column per step: one buffer each, a view of it per step
        self.full_ids = np.zeros((B, longest + max_new_tokens), dtype=np.int64)
        self.full_ids[:, :longest] = ids
        self.full_mask = np.ones((B, longest + max_new_tokens), dtype=np.int64)
        self.full_mask[:, :longest] = mask
        self.length = longest
        capacity = min(longest + max_new_tokens, self.context) if self.context else longest + max_new_tokens
        self.past = self._past(B, capacity if self.shared else 0)
        return self._run(ids, self.full_mask[:, :self.length])

    def step(self, next_ids: np.ndarray) -> np.ndarray:
        """Feed one token per row (``next_ids`` [B]) after the cached ones; returns its logits [B, 1, V]."""
        self._append(next_ids)
        self.pos = self.pos[:, -1:] + 1  # [B, 1]
        return self._run(next_ids[:, None].astype(np.int64), self.full_mask[:, :self.length])  # [B, 1]

    def window(self, next_ids: np.ndarray, limit: int) -> np.ndarray:
        """Append ``next_ids`` [B] and run the last ``limit`` tokens afresh, positions counted from
        the window's start (nanoGPT's crop past the context); returns their logits [B, limit, V]."""
        self._append(next_ids)
        mask = self.full_mask[:, self.length - limit:self.length]  # [B, limit]
        self.pos = positions_from_mask(mask)  # [B, limit]
        if not self.shared:  # a shared buffer is simply refilled from its start
            self.past = self._past(len(next_ids), 0)
        return self._run(np.ascontiguousarray(self.full_ids[:, self.length - limit:self.length]), mask)

    def _append(self, next_ids: np.ndarray) -> None:
        self.full_ids[:, self.length] = next_ids
        self.length += 1

    def _past(self, batch: int, capacity: int) -> list:
        """Every layer's past: empty, or zeroed buffers of ``capacity`` slots (shared decoding)."""
        from onnxruntime import OrtValue

        return [OrtValue.ortvalue_from_numpy(t) for t in empty_past(self.cache, self.n_layer, batch, capacity)]

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from onnxruntime import OrtValue

        feeds = [OrtValue.ortvalue_from_numpy(ids), OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask)),
                 OrtValue.ortvalue_from_numpy(self.pos), *self.past]
        self.steps += 1
        try:
            if self.shared:
                return run_shared(self.session, self.inputs, self.outputs, feeds)  # [B, T, V]
            results = self.session.run_with_ort_values(self.outputs, dict(zip(self.inputs, feeds)))
        except Exception as err:  # onnxruntime's own types (RuntimeError, Fail, InvalidArgument, ...)
            hint = ("; gptx_export.json declares a shared cache (io_contract.past_present_share_buffer) "
                    "that this graph may not support" if self.shared else "")
            raise GptxError(f"{self.where}: onnxruntime failed to run the graph: {first_line(err)}{hint}") from None
        self.past = results[1:]  # present.* -> next step's past_key_values.*, no copy
        return results[0].numpy()  # [B, T, V]
