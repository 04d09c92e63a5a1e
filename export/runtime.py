"""Generate from an export directory with onnxruntime alone (no torch import on this path).

The KV cache stays in onnxruntime's own tensors (OrtValue) from one step to the next: each
step feeds the previous step's ``present.*`` outputs back as ``past_key_values.*`` without a
numpy copy; only the last position's logits come back to numpy for sampling (gptx.sampling,
shared with the PyTorch generator, so the same seed gives the same tokens).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

from gptx.base import Tokenizer
from gptx.errors import GptxError, read_format_json
from gptx.export import (
    EXPORT_FORMAT, EXPORT_FORMAT_VERSION, IO_CONTRACT, IO_CONTRACT_VERSION, META_FILE, MODEL_FILE,
    input_names, output_names, tokenizer_hash,
)
from gptx.sampling import Collector, Generation, Sampler, left_pad, positions_from_mask

_UNSET = object()


def make_session(path, threads: Optional[int] = None):
    """A CPU InferenceSession that sleeps instead of spinning when idle, so it does not starve
    other threads (PyTorch, the tokenizer, a server) in the same process."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def read_meta(directory: Path) -> dict:
    meta = read_format_json(Path(directory) / META_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, "gptx export")
    contract = meta.get("io_contract", {})
    if contract.get("name") != IO_CONTRACT or contract.get("version") != IO_CONTRACT_VERSION:
        raise GptxError(f"{directory}: I/O contract {contract.get('name')}/{contract.get('version')} is not "
                        f"{IO_CONTRACT}/{IO_CONTRACT_VERSION}, which this gptx reads")
    return meta


def _plugin_module(module: str) -> bool:
    """Whether ``module`` belongs to gptx or to a package that declares an installed ``gptx``
    entry point (a plugin the user installed)."""
    import importlib.metadata

    top = module.split(".")[0]
    if not top:
        return False
    return top == "gptx" or any(ep.module.split(".")[0] == top for ep in importlib.metadata.entry_points(group="gptx"))


def load_tokenizer(info: dict) -> Tokenizer:
    """Rebuild the export's tokenizer from its class, options and state; check it is the same one."""
    from gptx.options import parse

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
    options = parse(obj.Options, dict(info.get("options") or {}), "tokenizer")
    state = info.get("state") or {}
    digest = tokenizer_hash(info.get("kind"), info.get("options") or {}, state)
    if digest != info.get("sha256"):
        raise GptxError(f"tokenizer sha256 {digest} does not match the export's {info.get('sha256')}: {META_FILE} was altered")
    return obj(options, state or None)


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
        self.n_layer, self.kv_heads, self.head_dim = m["n_layer"], m["kv_heads"], m["head_dim"]
        self.context_length = m["context_length"]
        self.tokenizer = load_tokenizer(self.meta["tokenizer"])
        eot = self.meta.get("special_tokens", {}).get("eot")
        self.eot_id = None if eot is None else int(eot["id"])
        try:
            self.session = make_session(model_path, threads)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise GptxError(f"{model_path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
        self.inputs, self.outputs = input_names(self.n_layer), output_names(self.n_layer)
        have_in = [i.name for i in self.session.get_inputs()]
        have_out = [o.name for o in self.session.get_outputs()]
        if sorted(have_in) != sorted(self.inputs) or sorted(have_out) != sorted(self.outputs):
            raise GptxError(f"{model_path}: its inputs/outputs do not follow {IO_CONTRACT}/{IO_CONTRACT_VERSION}")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler, eot_id=_UNSET) -> Generation:
        """Continue each prompt by up to ``max_new_tokens`` tokens (left-padded batch), stopping a
        prompt at the end-of-text token. Same contract as ``gptx.generate.generate_ids``."""
        from onnxruntime import OrtValue

        eot_id = self.eot_id if eot_id is _UNSET else eot_id
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GptxError("--prompt: a prompt must not be empty")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.context_length:
            raise GptxError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {self.context_length} tokens"
            )
        B = len(prompts)
        ids, mask = left_pad([list(p) for p in prompts])  # [B, T] int64 each
        pos = positions_from_mask(mask)  # [B, T]
        empty = np.zeros((B, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        past = [OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self.n_layer)]
        out = Collector(len(prompts), eot_id)
        # the mask grows by one column per step: keep one buffer and hand out views of it
        full_mask = np.ones((B, longest + max_new_tokens), dtype=np.int64)
        full_mask[:, :longest] = mask
        length = longest
        run = self.session.run_with_ort_values
        for _ in range(max_new_tokens):
            feeds = [
                OrtValue.ortvalue_from_numpy(ids),
                OrtValue.ortvalue_from_numpy(np.ascontiguousarray(full_mask[:, :length])),
                OrtValue.ortvalue_from_numpy(pos),
                *past,
            ]
            results = run(self.outputs, dict(zip(self.inputs, feeds)))
            logits = results[0].numpy()  # [B, T, V]
            past = results[1:]  # present.* -> next step's past_key_values.*, no copy
            nxt = sampler(logits[:, -1, :])  # [B]
            if out.add(nxt):
                break
            ids = nxt[:, None].astype(np.int64)  # [B, 1]
            pos = pos[:, -1:] + 1  # [B, 1]
            length += 1
        return Generation(prompt_ids=[list(p) for p in prompts], ids=out.ids)
