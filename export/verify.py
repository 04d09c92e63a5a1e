"""Check an exported graph against the PyTorch model it came from, before the export reports success.

Cases (each compares every output, logits and every present key/value, at real positions: rows
at left-padding positions are unspecified by the I/O contract):
  empty-past   a 2-prompt prefill with P = 0
  1-token      three single-token steps on the cache the graph itself produced
  chunked      a prefill in two chunks (the second with P > 0)
  left-padded  prompts of different lengths, left-padded, then two single-token steps
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from gptx.errors import GptxError
from gptx.export import input_names, output_names
from gptx.sampling import left_pad, positions_from_mask

TOLERANCE = 1e-4


class VerificationError(GptxError):
    """onnxruntime disagrees with PyTorch beyond the tolerance (exit code 2)."""


@dataclasses.dataclass
class Report:
    max_abs_diff: float = 0.0
    worst: str = ""  # "case: output"
    cases: dict = dataclasses.field(default_factory=dict)  # case -> max abs diff
    fusions: dict = dataclasses.field(default_factory=dict)  # fused operator -> count (gptx.export.fuse)

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "worst": self.worst, "cases": self.cases, "tolerance": TOLERANCE}


def session(path, threads: Optional[int] = None):
    from gptx.export.runtime import make_session

    return make_session(path, threads)


class _Pair:
    """Runs the same inputs through torch and onnxruntime, each keeping its own cache."""

    def __init__(self, model, sess, report: Report, case: str):
        self.model, self.sess, self.report, self.case = model, sess, report, case
        self.L = model.config.n_layer
        layout = model.cache_layouts()[0]  # one layout for every layer (checked before export)
        cache = [{"name": t.name} for t in layout]
        self.inputs, self.outputs = input_names(self.L, cache), output_names(self.L, cache)
        self.seq_axes = [t.seq_axis for t in layout] * self.L  # of each present, in output order
        self.t_past = model.empty_cache(0)  # replaced on the first call
        self.o_past = None

    def start(self, batch: int):
        self.t_past = self.model.empty_cache(batch)
        self.o_past = [p.numpy() for kv in self.t_past for p in kv]

    @torch.inference_mode()
    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray):
        logits, presents = self.model(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), self.t_past)
        feeds = dict(zip(self.inputs, [ids, mask, pos, *self.o_past]))
        outs = self.sess.run(None, feeds)
        torch_outs = [logits.numpy(), *(p.numpy() for kv in presents for p in kv)]
        for name, o, t, axis in zip(self.outputs, outs, torch_outs, [None, *self.seq_axes]):
            if o.shape != t.shape:
                raise VerificationError(f"export verification failed: {self.case}: {name} has shape {list(o.shape)} in onnxruntime, {list(t.shape)} in PyTorch")
            d = _real_rows_max_abs_diff(o, t, mask, axis)
            self.report.cases[self.case] = max(self.report.cases.get(self.case, 0.0), d)
            if d > self.report.max_abs_diff or not self.report.worst:
                self.report.max_abs_diff, self.report.worst = max(d, self.report.max_abs_diff), f"{self.case}: {name}"
        self.t_past = presents
        self.o_past = outs[1:]
        return outs[0]


def _real_rows_max_abs_diff(o: np.ndarray, t: np.ndarray, mask: np.ndarray, seq_axis: Optional[int]) -> float:
    """max |o - t| over real (non-padding) positions: logits [B, T, V] (``seq_axis`` None) at the new
    tokens' slots, a present (e.g. [B, K, S, D], ``seq_axis`` 2) at every slot of ``mask`` [B, S].
    Padding rows are unspecified by the contract (a fused attention op treats a padding query
    differently from PyTorch)."""
    if not o.size:
        return 0.0
    if seq_axis is None:
        real = mask[:, -o.shape[1]:].astype(bool)[:, :, None]  # [B, T, 1]
    else:
        shape = [1] * o.ndim
        shape[0], shape[seq_axis] = mask.shape  # batch first, the mask's slots along the sequence axis
        real = mask.astype(bool).reshape(shape)  # e.g. [B, 1, S, 1]
    d = float(np.max(np.where(real, np.abs(o - t).astype(np.float64), 0.0)))
    return d if np.isfinite(d) else float("inf")


def verify(model, sess, seed: int = 0) -> Report:
    """Compare onnxruntime with PyTorch on the four cases; raise VerificationError past TOLERANCE."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    n = min(12, cfg.block_size)  # longest context used
    V = cfg.vocab_size
    report = Report()
    model.eval()

    # empty past, then 1-token steps on the graph's own cache
    prefill = max(1, n - 3)
    p = _Pair(model, sess, report, "empty-past")
    p.start(2)
    ids = rng.integers(0, V, (2, prefill))
    mask = np.ones((2, prefill), dtype=np.int64)
    p.step(ids, mask, np.tile(np.arange(prefill), (2, 1)))
    p.case = "1-token"
    for t in range(prefill, n):
        mask = np.ones((2, t + 1), dtype=np.int64)
        p.step(rng.integers(0, V, (2, 1)), mask, np.full((2, 1), t, dtype=np.int64))

    # chunked prefill: first chunk, then the rest with a non-empty past
    if n >= 2:
        p = _Pair(model, sess, report, "chunked")
        p.start(2)
        ids = rng.integers(0, V, (2, n))
        cut = n // 2
        p.step(ids[:, :cut], np.ones((2, cut), dtype=np.int64), np.tile(np.arange(cut), (2, 1)))
        p.step(ids[:, cut:], np.ones((2, n), dtype=np.int64), np.tile(np.arange(cut, n), (2, 1)))

    # left-padded batch of different lengths, then 1-token steps
    steps = min(2, n - 1)
    longest = n - steps
    if longest >= 2:
        p = _Pair(model, sess, report, "left-padded")
        prompts = [list(rng.integers(0, V, longest)), list(rng.integers(0, V, max(1, longest // 3)))]
        ids, mask = left_pad([[int(x) for x in q] for q in prompts])
        pos = positions_from_mask(mask)
        p.start(2)
        p.step(ids, mask, pos)
        for _ in range(steps):
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            p.step(rng.integers(0, V, (2, 1)), mask, pos)

    if not report.max_abs_diff <= TOLERANCE:
        raise VerificationError(
            f"export verification failed: onnxruntime differs from PyTorch by {report.max_abs_diff:.3g} "
            f"(> {TOLERANCE:g}) in {report.worst}"
        )
    return report
