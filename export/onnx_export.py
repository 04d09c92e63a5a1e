"""PyTorch checkpoint -> ONNX decoder with a KV cache (torch.onnx.export, dynamo).

One graph serves the prompt and every decoding step: the past may be empty (P = 0), the new
tokens may be one or many. Inputs and outputs follow the contract in ``gptx.export``:

    input_ids [B, T] int64, attention_mask [B, P+T] int64, position_ids [B, T] int64,
    past_key_values.N.<name> (each tensor the attention's cache_layout declares, in its dtype;
    default key / value [B, K, P, D] float32)
    -> logits [B, T, V] float32, present.N.<name> (the same, P+T entries along its sequence axis)
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from gptx import __version__
from gptx.base import ONNX_EXPORT, ONNX_FUSED_ATTENTION
from gptx.components import Attention
from gptx.errors import GptxError, first_line
from gptx.fsutil import refuse_foreign_files, refuse_to_replace, refused_write, remove_stale_siblings, replace_dir, temp_sibling
from gptx.export import (
    ATTENTION_MASK, BATCH, IO_CONTRACT, IO_CONTRACT_VERSION, PAST, SEQ, TOTAL, input_names, output_names,
)

DEFAULT_OPSET = 18


class _Decoder(torch.nn.Module):
    """The model with the contract's argument order: (input_ids, attention_mask, position_ids, past)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, presents = self.model(input_ids, position_ids, attention_mask, past_key_values)
        return logits, presents


def check_exportable(config) -> None:
    """Refuse, naming every component that does not declare ONNX_EXPORT."""
    missing = [f"{key.removesuffix('.kind')} '{name}' ({cls.__module__}.{cls.__qualname__})"
               for key, name, cls in config.classes() if ONNX_EXPORT not in cls.supports]
    if missing:
        raise GptxError(f"cannot export to ONNX: {', '.join(missing)} does not support ONNX export (no '{ONNX_EXPORT}' in its supports)")


def export_cache(model) -> list[dict]:
    """The cache tensors each layer declares (``Attention.cache_layout``), as gptx_export.json
    records them; the I/O contract names every layer's the same way, so all layers must agree."""
    from gptx import components

    layouts = model.cache_layouts()
    if any(layout != layouts[0] for layout in layouts[1:]):
        raise GptxError("cannot export to ONNX: the layers declare different caches "
                        f"({[t.name for t in layouts[0]]} and others); the export needs one layout for every layer")
    symbolic = {components.BATCH: BATCH, components.SEQ: PAST}
    return [{"name": t.name, "dims": [symbolic.get(d, d) for d in t.dims], "seq_axis": t.seq_axis,
             "dtype": str(t.stored_as(torch.float32)).removeprefix("torch.")} for t in layouts[0]]  # the graph is fp32


def export_onnx(model, path: Path, opset: int = DEFAULT_OPSET, metadata: Optional[dict] = None,
                fused_attention: bool = False) -> onnx.ModelProto:
    """Export ``model`` (a gptx GPT in eval mode) to ``path``; returns the saved ModelProto. With
    ``fused_attention``, attentions that declare ONNX_FUSED_ATTENTION export onnxruntime's fused op."""
    from gptx.export import attention as onnx_attention
    from gptx import components

    cfg = model.config
    L, cache, layout = cfg.n_layer, export_cache(model), model.cache_layouts()[0]
    # example shapes: B=2, T=5, P=3 (never 0 or 1, which torch.export would specialise on)
    B, T, P = 2, min(5, max(2, cfg.block_size - 3)), 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, P + T, dtype=torch.int64)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    past = [tuple(t.empty(B, P, dtype=t.stored_as(torch.float32)) for t in layout) for _ in range(L)]  # as declared, floats fp32
    limit = max(cfg.block_size, 4)
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    seq = torch.export.Dim(SEQ, min=1, max=limit)
    past_len = torch.export.Dim(PAST, min=0, max=limit)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},  # = past + seq, inferred
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [tuple({t.dims.index(components.BATCH): batch, t.seq_axis: past_len} for t in layout)
                            for _ in range(L)],
    }
    with _quiet(), onnx_attention.fusing(model, fused_attention):
        program = torch.onnx.export(
            _Decoder(model).eval(),
            (ids, mask, pos, past),
            dynamic_shapes=dynamic_shapes,
            input_names=input_names(L, cache),
            output_names=output_names(L, cache),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    _name_dims(proto)
    _store_transposed_weights_once(proto)
    if metadata:
        set_metadata(proto, metadata)
    save(proto, path)
    return proto


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warns about torchvision ops; keep the CLI output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "torch.__trace", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _name_dims(proto: onnx.ModelProto) -> None:
    """Give the inferred total length (P + T) one readable name everywhere in the graph's I/O."""
    mask = next(i for i in proto.graph.input if i.name == ATTENTION_MASK)
    inferred = mask.type.tensor_type.shape.dim[1].dim_param
    renames = {inferred: TOTAL, f"{PAST} + {SEQ}": TOTAL, f"{SEQ} + {PAST}": TOTAL}
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in renames:
                d.dim_param = renames[d.dim_param]


def _store_transposed_weights_once(proto: onnx.ModelProto) -> None:
    """The optimizer folds the LM head's Transpose of the tied embedding into a second copy of the
    matrix. Store it once: replace the copy by a Transpose node (onnxruntime folds it at load)."""
    g = proto.graph
    mats = {t.name: t for t in g.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]}
    by_shape: dict[tuple, list] = {}
    for t in mats.values():
        by_shape.setdefault(tuple(t.dims), []).append(t)
    cache: dict[str, np.ndarray] = {}

    def arr(t):
        if t.name not in cache:
            cache[t.name] = numpy_helper.to_array(t)
        return cache[t.name]

    replaced = []
    for t in list(mats.values()):
        if t.name in replaced:
            continue
        for other in by_shape.get((t.dims[1], t.dims[0]), []):
            if other.name in replaced or t.name in replaced or other is t:
                continue
            if np.array_equal(arr(other).T, arr(t)):
                # keep the one another node reads directly under its parameter name; rebuild ``t``
                replaced.append(t.name)
                g.node.insert(0, onnx.helper.make_node("Transpose", [other.name], [t.name], perm=[1, 0], name=f"tied_{t.name}"))
                break
    keep = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(keep)


def set_metadata(proto: onnx.ModelProto, metadata: dict) -> None:
    props = {
        "gptx.io_contract": f"{IO_CONTRACT}/{IO_CONTRACT_VERSION}",
        "gptx.metadata": json.dumps(metadata, sort_keys=True),
    }
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in keep}, **props})
    proto.producer_name, proto.producer_version = "gptx", __version__
    proto.doc_string = "gptx decoder with a KV cache; see metadata_props['gptx.metadata']"


def save(proto: onnx.ModelProto, path: Path) -> None:
    """One file below protobuf's 2 GiB limit, else weights in ``<name>.data`` beside it."""
    large = proto.ByteSize() > 1_800_000_000
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data" if large else None)


# ---- the whole export: checkpoint -> verified OUT_DIR ------------------------------------------

def _check_out_dir(out_dir: Path, force: bool, protected: list[Path]) -> None:
    """OUT_DIR may be missing, empty, a previous gptx export, or anything with ``force``, but never
    a directory holding the source checkpoint, the working directory or the home directory."""
    from gptx.export import META_FILE

    refuse_to_replace(out_dir, protected)
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    refuse_foreign_files(out_dir, META_FILE, _written_by_export(out_dir), "a previous gptx export", "a previous gptx export")


def _written_by_export(out_dir: Path) -> set[str]:
    """The names a previous export in ``out_dir`` wrote (its gptx_export.json lists them)."""
    from gptx.export import META_FILE, MODEL_FILE

    try:
        files = json.loads((out_dir / META_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    listed = {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()
    return listed | {META_FILE, MODEL_FILE, MODEL_FILE + ".data"}


def export_checkpoint(source, out_dir, opset: int = DEFAULT_OPSET, quantize: Optional[str] = None,
                      force: bool = False, log: Callable[[str], None] = print, track: Optional[bool] = None) -> dict:
    """Export a checkpoint (directory or ``runs:/<id>``) to ``out_dir``, verified; returns the metadata
    written to gptx_export.json. Nothing is left half-written: the files are built in a temporary
    sibling directory that replaces ``out_dir`` only once everything passed."""
    import shutil

    from gptx import checkpoint
    from gptx.export import META_FILE, MODEL_FILE
    from gptx.export.manifest import ExportManifest, describe
    from gptx.export.quantize import SCHEMES

    if quantize is not None and quantize not in SCHEMES:
        raise GptxError(f"--quantize: unknown scheme {quantize!r}; supported: {', '.join(SCHEMES)}")
    if not 7 <= opset <= 23:  # dynamo export needs 18+, but torch converts down; let it say so
        raise GptxError(f"--opset: {opset} is out of range")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force, [Path.cwd()])
    t_start = time.perf_counter()
    ck = checkpoint.load(source)
    check_exportable(ck.config.model)
    _check_out_dir(out_dir, force, [Path.cwd(), ck.path])
    description = describe(ck, export_cache(ck.model), opset, quantize)
    # the graph's logits are -inf past the tokenizer's ids: no runtime, genai's own search included, samples them
    model = ck.model.float().eval().mask_padded_vocab(description.tokenizer.vocab_size)
    log(f"exporting {ck.path} ({description.model.parameters:,} parameters, {description.model.n_layer} layers) to {out_dir}")

    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir.resolve())  # what an export killed with -9 left behind
    tmp = temp_sibling(out_dir.resolve())
    try:
        graph = _export_verified(model, tmp / MODEL_FILE, opset, log)
        # the decoding the quantization is compared on, and genai's, follow the verified graph's cache sharing
        described = description.to_dict(graph.report.shared_buffer)
        quantization_report = _quantize(quantize, tmp / MODEL_FILE, tmp, described, log) if quantize else None
        files = [MODEL_FILE, META_FILE, *_runtime_files(tmp, ck.tokenizer, description, described, log)]
        manifest = ExportManifest(description, graph, quantization_report, files,
                                  total_seconds=round(time.perf_counter() - t_start, 2))
        _write_manifest(tmp, manifest)
        replace_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = refused_write(err, out_dir, "the export")  # a full disk names the folder, not our temporary
        if refused is not None:
            raise refused from None
        raise
    log(f"wrote {out_dir}: {', '.join(manifest.files)} ({manifest.total_seconds:.1f} s)")
    _log_to_mlflow(source, ck, out_dir, track, log)
    return manifest.to_dict()


def _runtime_files(tmp: Path, tokenizer, description, described: dict, log: Callable[[str], None]) -> list[str]:
    """Write what other runtimes read beside the graph: tokenizer.json where the tokenizer
    describes itself as one, and genai_config.json when onnxruntime-genai can run the graph
    (``described``: the description as genai reads it); returns the names written."""
    from gptx.export import GENAI_FILE
    from gptx.export import genai, tokenizer_json

    files = tokenizer_json.write(tmp, tokenizer, description.model.context_length)
    if files is None:
        files = []
        log(f"no tokenizer.json: {tokenizer_json.refusal(description.tokenizer.kind, 'Node and the web page')}; "
            "gptx generate runs the export")
    if genai.reads(described):
        (tmp / GENAI_FILE).write_text(json.dumps(genai.genai_config(described), indent=2))
        files.append(GENAI_FILE)
    else:
        log(f"no {GENAI_FILE}: onnxruntime-genai reads float32 key/value caches [B, K, P, D] only; this model caches "
            + ", ".join(f"{c['name']} {c['dtype']} {c['dims']}" for c in description.cache))
    return files


def _write_manifest(tmp: Path, manifest) -> None:
    """The one place the export's metadata is written: its copy in model.onnx and gptx_export.json."""
    from gptx.export import META_FILE, MODEL_FILE

    proto = onnx.load(str(tmp / MODEL_FILE))
    set_metadata(proto, manifest.graph_metadata())
    save(proto, tmp / MODEL_FILE)
    (tmp / META_FILE).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class _Exported:
    """A graph torch.onnx.export wrote, and how long that took."""

    proto: onnx.ModelProto
    seconds: float


def _export_verified(model, path: Path, opset: int, log: Callable[[str], None]):
    """Export ``model`` to ``path`` as the fastest graph that verifies, and return what was kept
    (``VerifiedGraph``): onnxruntime's fused attention op where the attention declares
    ONNX_FUSED_ATTENTION (else, or when onnxruntime or the exporter refuses that graph or it does
    not verify, the plain attention), then onnxruntime's operator fusions on top
    (``_fuse_and_verify``). Each fallback logs one line saying why."""
    from gptx.export.manifest import VerifiedGraph

    t0 = time.perf_counter()
    exported = report = None
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if any(ONNX_FUSED_ATTENTION in m.supports for m in attentions):
        exported, report = _fused_attention_graph(model, path, opset, log)
    else:
        narrowed = [m for m in attentions if ONNX_FUSED_ATTENTION in type(m).supports]  # its options rule the op out
        if narrowed:
            log(f"plain attention: {type(narrowed[0]).__name__} with these options does not export onnxruntime's "
                "fused attention (e.g. an int8 KV cache, which GroupQueryAttention cannot keep)")
    if exported is None:
        exported = _plain_graph(model, path, opset, log)
    report = _fuse_and_verify(model, exported.proto, path, log, report)
    cases = ", ".join(f"{k} {v:.2e}" for k, v in report.cases.items())
    codes = "" if report.max_code_diff is None else f"; quantised cache codes within {report.max_code_diff}"
    log(f"verified against PyTorch: max abs diff {report.max_abs_diff:.2e} in {report.worst} ({cases}){codes}")
    return VerifiedGraph(exported.seconds, report, round(time.perf_counter() - t0, 2))


def _fused_attention_graph(model, path: Path, opset: int, log: Callable[[str], None]):
    """The fused-attention graph and its verification report, or (None, None) when it is not kept:
    the exporter refused the trace, onnxruntime refused the graph, or it does not verify. Any
    other error (a bug, ours or an attention's) is raised, not hidden by the plain attention."""
    from gptx.export.runtime import ort_refusals
    from gptx.export.verify import VerificationError

    try:
        exported = _export_graph(model, path, opset, True, log)
        return exported, _verify(model, exported.proto, path)
    except (VerificationError, torch.onnx.errors.OnnxExporterError, *ort_refusals()) as err:
        bug = _programming_error(err)
        if bug is not None:
            raise bug from None
        log(f"fused attention not kept ({_why(err)}); exporting the plain attention")
        return None, None


# What a bug raises. torch.onnx.export runs the model's forward to capture it and reports what
# that raised as the cause of its own error; the exporter refusing an operation raises torch's
# own types.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def _why(err: BaseException) -> str:
    """A fallback's reason on one line: a verification mismatch says it all; a refusal, its type
    and first line."""
    from gptx.export.verify import VerificationError

    return str(err) if isinstance(err, VerificationError) else f"{type(err).__name__}: {first_line(err)}"


def _programming_error(err: BaseException) -> Optional[BaseException]:
    """The bug behind a torch.onnx.export error ``err`` (the first programming error among its
    causes), or None when the exporter refused the graph."""
    cause = err.__cause__ if isinstance(err, torch.onnx.errors.OnnxExporterError) else None
    while cause is not None and not isinstance(cause, PROGRAMMING_ERRORS):
        cause = cause.__cause__
    return cause


def _plain_graph(model, path: Path, opset: int, log: Callable[[str], None]) -> _Exported:
    """The plain attention's graph; the exporter refusing it is the user's one-line error (a
    component whose forward torch.onnx cannot trace)."""
    try:
        return _export_graph(model, path, opset, False, log)
    except torch.onnx.errors.OnnxExporterError as err:
        raise GptxError(f"torch.onnx.export failed: {type(err).__name__}: {first_line(err)}") from err


def _export_graph(model, path: Path, opset: int, fused_attention: bool, log: Callable[[str], None]) -> _Exported:
    t0 = time.perf_counter()
    proto = export_onnx(model, path, opset, fused_attention=fused_attention)
    seconds = round(time.perf_counter() - t0, 2)
    log(f"exported model.onnx, opset {opset} ({seconds:.1f} s, {path.stat().st_size / 2**20:.1f} MiB)")
    return _Exported(proto, seconds)


def _fuse_and_verify(model, plain: onnx.ModelProto, path: Path, log: Callable[[str], None], plain_report=None):
    """Verify the fused graph (``gptx.export.fuse``) and keep it, else fall back to ``plain``
    (already saved at ``path``) and verify that, unless ``plain_report`` already did; a
    VerificationError of the plain graph stands. Returns the verification report with ``fusions``
    (onnxruntime operator -> count in the graph kept; empty: nothing fused)."""
    from gptx.export.fuse import FusionFailed, fuse
    from gptx.export.runtime import ort_refusals
    from gptx.export.verify import VerificationError

    cfg = model.config
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its shape inference prints its failures
            fused, counts = fuse(plain, cfg.n_head, cfg.n_embd)
    except FusionFailed as err:  # the fusion pass is an optimisation: a graph it cannot read stays plain
        log(f"operator fusion skipped ({err})")
        fused, counts = None, {}
    if counts:
        save(fused, path)
        try:
            report = _verify(model, fused, path)
            log("fused for onnxruntime: " + ", ".join(f"{n} {op}" for op, n in sorted(report.fusions.items())))
            return report
        except (VerificationError, *ort_refusals()) as err:
            log(f"fused graph not kept ({_why(err)}); using the unfused graph")
            save(plain, path)
    return plain_report or _verify(model, plain, path)


def _verify(model, graph: onnx.ModelProto, path: Path):
    """Verify ``graph``, saved at ``path``; its report carries the graph's onnxruntime operators
    (``fusions``). One whose every layer is GroupQueryAttention (which reads the total length from
    the mask) is checked for shared-buffer decoding too, which it then declares."""
    from gptx.export.fuse import contrib_ops
    from gptx.export.verify import session, verify

    ops = contrib_ops(graph)
    report = verify(model, session(path), shared_buffer=ops.get("GroupQueryAttention", 0) == model.config.n_layer)
    report.fusions = ops
    return report


def _quantize(scheme: str, path: Path, tmp: Path, meta: dict, log: Callable[[str], None]) -> dict:
    """Replace the verified fp32 graph at ``path`` by its ``scheme`` quantization; returns the
    report: what was quantized, agreement with fp32 and both decoding speeds (decoding both
    graphs as ``meta``, the export's description, says)."""
    import os

    from gptx.export.quantize import compare, quantize
    from gptx.export.verify import session

    fp32_keep = tmp / "model.fp32.onnx.tmp"
    os.replace(path, fp32_keep)
    facts = quantize(scheme, fp32_keep, path, tmp)
    facts |= compare(session(fp32_keep), session(path), meta, scheme)
    fp32_keep.unlink()
    log(
        f"{scheme}: {facts['quantized_matmuls']} matmuls quantized; logits max abs diff vs fp32 "
        f"{facts['prompt_logits_max_abs_diff']:.3g} (logits up to {facts['prompt_logits_max_abs']:.3g}); "
        f"greedy tokens identical for {', '.join(map(str, facts['greedy_tokens_identical_prefix']))} of "
        f"{facts['greedy_tokens_compared']} on {len(facts['greedy_tokens_identical_prefix'])} prompts; "
        f"decode {facts['fp32_tokens_per_s']:.0f} -> {facts[f'{scheme}_tokens_per_s']:.0f} tokens/s ({facts['speedup']}x)"
    )
    return facts


def _log_to_mlflow(source, ck, out_dir: Path, track: Optional[bool], log) -> None:
    """Log the export to the MLflow run the checkpoint came from (``runs:/<id>`` or a run id in the
    checkpoint's metadata), under artifacts ``onnx/``. A tracking failure is a warning, not an error."""
    from gptx import tracking

    from_run = tracking.run_id_of(source)
    run_id = from_run or ck.meta.get("mlflow_run_id") or ck.meta.get("run_id")
    if track is False or (track is None and not run_id):
        return
    if not run_id:
        log("tracking: the checkpoint names no MLflow run; export not logged")
        return
    # The store the run was tracked in: where runs:/ was fetched from, else the one the checkpoint
    # recorded (a checkpoint from before gptx recorded it: $MLFLOW_TRACKING_URI or ./mlflow.db).
    # Never a new store: a run can only be logged to where it is.
    stored = ck.meta.get("mlflow_tracking_uri")
    uri = None if from_run or not isinstance(stored, str) else stored
    try:
        tracking.existing_client(uri, f"MLflow run {run_id}").log_artifacts(run_id, str(out_dir), "onnx")
        log(f"logged to MLflow run {run_id} in {tracking.store_uri(uri)} (artifacts onnx/)")
    except GptxError as err:  # the export itself succeeded
        log(f"Warning: export not logged: {err}")
    except Exception as err:
        log(f"Warning: could not log the export to MLflow run {run_id} in {tracking.store_uri(uri)}: "
            f"{type(err).__name__}: {first_line(err)}")
