"""``gptx eval``: language-modelling loss on a text and multiple-choice accuracy, for a
checkpoint (PyTorch) or an ONNX export (onnxruntime alone: this module imports no torch; the
PyTorch scorer imports it when built).

Text (``--data``): every token after the first is scored exactly once, from windows of the
model's context: inputs ``ids[b : b + C]``, targets ``ids[b + 1 : b + C + 1]``, ``b`` advancing by
the stride (default ``C``: non-overlapping windows, the last one shorter). With a smaller stride
the windows overlap and each scores only its targets not scored before, so every token but
those of the first window sees at least ``C - stride`` tokens of context (the Hugging Face
perplexity recipe). ``loss`` is the mean of those token losses (nats), ``perplexity`` its exp,
``bits_per_byte`` the total nats / ln 2 / the text's UTF-8 bytes.

Multiple choice (``--task``, HellaSwag's jsonl: ``ctx``, ``endings``, ``label``), scored as llm.c's
dev/data/hellaswag.py: the context's tokens, then each ending tokenized with a leading space;
``acc`` picks the ending with the lowest summed loss over its tokens, ``acc_norm`` the lowest mean
loss per token. A context that does not fit the model's window with an ending loses its oldest
tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from gptx.errors import GptxError, first_line
from gptx.numeric import int_or_none

LOGITS_BUDGET = 2**27  # floats of logits per forward (512 MiB) when choosing rows per batch


class OnnxScorer:
    """Token losses from an export's ``model.onnx`` (an empty past, all positions at once)."""

    def __init__(self, directory: Path):
        from gptx.export.runtime import OnnxGenerator

        self.gen = OnnxGenerator(directory)
        self.tokenizer, self.context = self.gen.tokenizer, self.gen.context_length
        self.vocab_size = int(self.gen.meta["model"]["vocab_size"])
        self.step = self.gen.meta.get("source", {}).get("step")

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """inputs [B, L] int64 -> next-token logits [B, L, V] float32 (right padding is harmless: causal)."""
        from gptx.export import empty_past

        g = self.gen
        B, L = inputs.shape
        feeds = {"input_ids": inputs, "attention_mask": np.ones((B, L), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)).copy()}
        feeds |= dict(zip(g.inputs[3:], empty_past(g.cache, g.n_layer, B)))  # no past: every position at once
        try:
            return g.session.run(["logits"], feeds)[0]  # [B, L, V] float32
        except Exception as err:  # onnxruntime's own types (Fail, InvalidArgument, RuntimeException, ...)
            raise GptxError(f"{g.directory / 'model.onnx'}: onnxruntime failed to run the graph: "
                            f"{first_line(err) or type(err).__name__}") from None

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampler, stop=None):
        """gptx.export.runtime.OnnxGenerator.generate: KV cache, stops at end-of-text or ``stop``."""
        return self.gen.generate(prompts, max_new_tokens, sampler, stop=stop)

    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """inputs, targets [B, L] int64 -> next-token losses [B, L] float64 (nats)."""
        logits = self.logits(inputs)  # [B, L, V] float32
        top = logits.max(axis=-1, keepdims=True)  # [B, L, 1]
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]  # [B, L]
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
        return (lse - picked).astype(np.float64)


class TorchScorer:
    """Token losses from a checkpoint's model (PyTorch); with ``kv_cache`` ("float" or "int8", the
    causal attention's cache), token by token through that KV cache, as decoding sees the text."""

    def __init__(self, source: str, device: str = "cpu", kv_cache: Optional[str] = None):
        import torch

        from gptx import checkpoint
        from gptx.threads import choose_threads

        self.torch = torch
        torch.set_num_threads(choose_threads())  # the CPUs free now (gptx.threads)
        self.ck = checkpoint.load(source, device=device)
        self.model = self.ck.model
        if kv_cache is not None:
            from gptx.plugins.attention import with_kv_cache

            try:
                self.model = with_kv_cache(self.model, kv_cache)
            except GptxError as err:
                raise GptxError(f"--kv-cache: {err}") from None
        self.cached = kv_cache is not None
        self.tokenizer, self.context = self.ck.tokenizer, self.ck.config.model.block_size
        self.vocab_size = self.ck.config.model.vocab_size
        self.device, self.step = device, self.ck.meta.get("step")
        from gptx.training.machine import keep_freed_memory

        keep_freed_memory(torch.device(device))  # each batch's [B, L, V] logits: reused, not faulted in again

    def logits(self, inputs: np.ndarray):
        """inputs [B, L] int64 -> next-token logits [B, L, V], a float32 tensor on the model's device
        (through the KV cache, token by token, when one was chosen)."""
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(inputs).to(self.device)  # [B, L]
            return (self._cached_logits(x) if self.cached else self.model(x)[0]).float()  # [B, L, V]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampler, stop=None):
        """gptx.generate.generate_ids: KV cache, stops at end-of-text or ``stop``."""
        from gptx.generate import generate_ids

        return generate_ids(self.model, prompts, max_new_tokens, sampler, self.tokenizer.eot_id,
                            self.tokenizer.vocab_size, stop)

    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """inputs, targets [B, L] int64 -> next-token losses [B, L] float64 (nats)."""
        torch = self.torch
        with torch.no_grad():
            logits = self.logits(inputs)  # [B, L, V]
            y = torch.from_numpy(targets).to(self.device)  # [B, L]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, L]
        return losses.double().cpu().numpy()

    def _cached_logits(self, x):
        """x [B, L] -> logits [B, L, V], one token per call over the KV cache of the ones before."""
        past = self.model.empty_cache(x.shape[0], capacity=x.shape[1])
        out = []
        for t in range(x.shape[1]):
            logits, past = self.model(x[:, t:t + 1], past_key_values=past)  # [B, 1, V]
            out.append(logits)
        return self.torch.cat(out, dim=1)  # [B, L, V]


def open_scorer(source: str, device: str = "cpu", kv_cache: Optional[str] = None):
    """An ONNX export directory -> OnnxScorer (no torch); anything else is a checkpoint source."""
    if not str(source).startswith("runs:/") and (Path(source) / "model.onnx").is_file():
        if device != "cpu":
            raise GptxError(f"--device: an ONNX export is evaluated on onnxruntime's CPU provider, got {device}")
        if kv_cache is not None:
            raise GptxError("--kv-cache: scores a checkpoint token by token; an ONNX export's cache format is fixed at export")
        return OnnxScorer(Path(source))
    return TorchScorer(source, device, kv_cache)


def rows_per_batch(scorer, length: int, requested: Optional[int]) -> int:
    """Windows per forward pass: as asked, if their logits fit the free memory; else by LOGITS_BUDGET."""
    from gptx import memory

    if requested is None:
        return max(1, min(32, LOGITS_BUDGET // max(1, length * scorer.vocab_size)))
    need = 3 * 4 * requested * length * scorer.vocab_size  # fp32 logits, their log-softmax and the losses' gather
    free = memory.free_bytes()
    if need > free:
        raise GptxError(f"--batch-size: {requested:,} windows of {length} tokens need at least {memory.size(need)} for "
                        f"their logits; {memory.size(free)} is free (lower it, or leave it out to choose by memory)")
    return requested


# ---- --data --------------------------------------------------------------------------------

def text_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) per window over ``n`` tokens: inputs ids[begin:end],
    targets ids[begin + 1:end + 1], scoring targets at index >= first scored."""
    windows, next_target, begin = [], 1, 0
    while next_target < n:
        end = min(begin + context, n - 1)
        windows.append((begin, end, next_target))
        next_target, begin = end + 1, begin + stride
    return windows


def text_ids(path: Path, tokenizer, progress=None):
    """The text at ``path`` as a ``Source`` and its ids (through the token cache), at least 2 of
    them: what ``evaluate_text`` scores. A problem is one line starting ``--data:``."""
    from gptx.data import cached_tokens
    from gptx.prepare import Source

    try:
        source = Source(path)
        if source.jsonl:
            raise GptxError(f"{path}: expected text (a file or a directory of .txt files), not jsonl documents")
        ids = cached_tokens(source, tokenizer, progress)
    except GptxError as err:
        raise GptxError(f"--data: {err}" if str(path) in str(err) else f"--data: {path}: {err}") from None
    if len(ids) < 2:
        raise GptxError(f"--data: {path}: {len(ids)} token(s); at least 2 are needed to score one")
    return source, ids


def evaluate_text(scorer, path: Path, stride: Optional[int] = None, batch: Optional[int] = None, progress=None) -> dict:
    """loss, perplexity, bits per byte and the number of scored tokens of the text at ``path``."""
    C = scorer.context
    stride = C if stride is None else stride
    if not 1 <= stride <= C:
        raise GptxError(f"--stride: must be between 1 and the model's context of {C}, got {stride}")
    source, ids = text_ids(path, scorer.tokenizer, progress)
    windows = text_windows(len(ids), C, stride)
    total, count, last = 0.0, 0, time.monotonic()
    rows = rows_per_batch(scorer, C, batch)
    for group in _same_length_groups(windows, rows):
        if progress and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            progress(f"scoring {path.name}: {count:,}/{len(ids) - 1:,} tokens")
        span = np.arange(group[0][1] - group[0][0] + 1)  # [L + 1]
        tokens = np.stack([np.asarray(ids[b + span], dtype=np.int64) for b, _, _ in group])  # [B, L + 1]
        losses = scorer.token_losses(tokens[:, :-1], tokens[:, 1:])  # [B, L]
        for (b, _, first), row in zip(group, losses):
            scored = row[first - b - 1:]  # targets b+1+t for t >= first-b-1
            total += float(scored.sum())
            count += len(scored)
    text_bytes = source.total_bytes + 2 * (len(source.files) - 1)  # a directory's files joined by blank lines
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": total / math.log(2) / text_bytes,
            "tokens": count}


def _same_length_groups(windows: list[tuple[int, int, int]], rows: int) -> list[list[tuple[int, int, int]]]:
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < rows and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


# ---- --task --------------------------------------------------------------------------------

@dataclasses.dataclass
class Example:
    context: list[int]
    endings: list[list[int]]
    label: int


def read_examples(path: Path, tokenizer, context: int):
    """HellaSwag-format examples, one per non-blank line, tokenized; problems name the line."""
    from gptx.fsutil import open_regular

    try:
        fh = open_regular(path, "--task")
    except FileNotFoundError:
        raise GptxError(f"--task: {path}: no such file") from None
    except OSError as err:
        raise GptxError(f"--task: {path}: {err.strerror}") from None
    with fh:
        for number, raw in enumerate(fh, 1):
            if raw.strip():
                yield _example(raw, tokenizer, context, f"--task: {path}: line {number}")


def _example(raw: bytes, tokenizer, context: int, where: str) -> Example:
    try:
        ex = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptxError(f"{where}: not valid JSON ({first_line(err)})") from None
    if not isinstance(ex, dict):
        raise GptxError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise GptxError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise GptxError(f"{where}: 'endings' must be a list of at least 2 strings")
    if isinstance(label, str) and int_or_none(label, 0) is not None:
        label = int_or_none(label, 0)  # some HellaSwag copies store it as a string ('²' is none)
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings)):
        raise GptxError(f"{where}: 'label' must be an integer from 0 to {len(endings) - 1}, got {label!r}")
    try:
        ctx_ids = tokenizer.encode(ctx)
        end_ids = [tokenizer.encode(" " + e) for e in endings]
    except GptxError as err:
        raise GptxError(f"{where}: {err}") from None
    if not all(end_ids):
        raise GptxError(f"{where}: an ending encodes to no tokens")
    longest = max(len(e) for e in end_ids)
    if longest > context:  # a row needs one context token before the ending
        raise GptxError(f"{where}: an ending of {longest} tokens does not fit the model's context of {context} tokens")
    return Example(ctx_ids, end_ids, label)


def score_example(scorer, ex: Example) -> tuple[int, int]:
    """(the ending with the lowest summed loss, the one with the lowest mean loss per token)."""
    C = scorer.context
    rows = [ex.context[-(C + 1 - len(e)):] + e for e in ex.endings]  # each at most C + 1 tokens
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int64)  # [E, W], right-padded
    mask = np.zeros((len(rows), width - 1), dtype=np.float64)  # [E, W - 1] 1 on the ending's targets
    for i, (r, e) in enumerate(zip(rows, ex.endings)):
        tokens[i, :len(r)] = r
        mask[i, len(r) - len(e) - 1:len(r) - 1] = 1.0
    losses = scorer.token_losses(tokens[:, :-1], tokens[:, 1:])  # [E, W - 1]
    summed = (losses * mask).sum(axis=1)  # [E]
    return int(summed.argmin()), int((summed / mask.sum(axis=1)).argmin())


def evaluate_task(scorer, path: Path, progress=None) -> dict:
    """acc, acc_norm and the number of examples of a HellaSwag-format jsonl file."""
    n = correct = correct_norm = 0
    for ex in read_examples(path, scorer.tokenizer, scorer.context):
        pred, pred_norm = score_example(scorer, ex)
        n += 1
        correct += pred == ex.label
        correct_norm += pred_norm == ex.label
        if progress and n % 100 == 0:
            progress(f"{path.name}: {n} examples, acc_norm {correct_norm / n:.4f}")
    if n == 0:
        raise GptxError(f"--task: {path}: holds no examples (one JSON object per line)")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# ---- the command ---------------------------------------------------------------------------

def evaluate(source: str, data: Optional[str] = None, task: Optional[str] = None, stride: Optional[int] = None,
             batch: Optional[int] = None, device: str = "cpu", progress=None, kv_cache: Optional[str] = None) -> dict:
    """Evaluate ``source`` on a text and/or a multiple-choice task; with an MLflow source
    (``runs:/<id>``) the results are logged to that run as ``eval/<file stem>/<metric>``.
    ``kv_cache``: score token by token through the causal attention's cache in that format."""
    if data is None and task is None:
        raise GptxError("give --data FILE (loss, perplexity, bits per byte) and/or --task FILE.jsonl (accuracy)")
    for option, path in (("--data", data), ("--task", task)):
        if path is not None and not Path(path).exists():
            raise GptxError(f"{option}: {path}: no such file")
    if stride is not None and stride < 1:
        raise GptxError(f"--stride: must be at least 1, got {stride}")
    if batch is not None and batch < 1:
        raise GptxError(f"--batch-size: must be at least 1, got {batch}")
    scorer = open_scorer(source, device, kv_cache)
    rows_per_batch(scorer, scorer.context, batch)  # a batch that cannot fit fails before any tokenizing
    results: dict = {}
    if data is not None:
        results["data"] = evaluate_text(scorer, Path(data), stride, batch, progress) | {"file": str(data)}
    if task is not None:
        results["task"] = evaluate_task(scorer, Path(task), progress) | {"file": str(task)}
    if str(source).startswith("runs:/"):
        log_to_run(str(source), results, scorer.step)
    return results


def log_to_run(uri: str, results: dict, step: Optional[int]) -> None:
    """eval/<file stem>/<metric> metrics on the MLflow run the checkpoint came from."""
    from mlflow.entities import Metric

    from gptx import tracking

    run_id = tracking.run_id_of(uri)
    ts = int(time.time() * 1000)
    step = int_or_none(step, 0) or 0  # the checkpoint's stored step; a foreign value logs at step 0
    metrics = [Metric(f"eval/{Path(r['file']).stem}/{k}", float(v), ts, step)
               for r in results.values() for k, v in r.items() if k != "file"]
    client = tracking.existing_client(None, uri)  # the store the checkpoint came from, never a new one
    try:
        client.log_batch(run_id, metrics=metrics)
    except Exception as err:
        raise GptxError(f"{uri}: evaluated, but cannot log the results to the run ({type(err).__name__}: "
                        f"{first_line(err)})") from None


def table(results: dict) -> str:
    lines = []
    if "data" in results:
        d = results["data"]
        lines.append(f"{Path(d['file']).name}: loss {d['loss']:.4f}  perplexity {d['perplexity']:.2f}  "
                     f"bits/byte {d['bits_per_byte']:.4f}  ({d['tokens']:,} tokens)")
    if "task" in results:
        t = results["task"]
        lines.append(f"{Path(t['file']).name}: acc {t['acc']:.4f}  acc_norm {t['acc_norm']:.4f}  (n = {t['n']:,})")
    return "\n".join(lines)
