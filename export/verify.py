"""Check an exported graph against the PyTorch model it came from, before the export reports success.

Cases (each compares every output, logits and every present key/value, at real positions: rows
at left-padding positions are unspecified by the I/O contract):
  empty-past   a 2-prompt prefill with P = 0
  1-token      three single-token steps on the cache the graph itself produced
  chunked      a prefill in two chunks (the second with P > 0), batch 1
  left-padded  prompts of different lengths, left-padded, then two single-token steps
  shared-buffer  (graphs that declare past_present_share_buffer) the left-padded case again, the
               cache a preallocated buffer bound as both past and present, written in place

Each cache tensor travels in the dtype its attention declares (``CacheTensor.dtype``): integer
codes are compared to within CODE_TOLERANCE, everything else to within TOLERANCE.
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
# Quantised cache codes (an integer cache tensor: the causal attention's int8 keys and values) may
# differ by one: a value that lands on a rounding tie in PyTorch can fall either side of it after
# onnxruntime's float noise (1e-7). Such a cache is handed back to onnxruntime from PyTorch's each
# step, so one flipped code is reported as itself, not compounded into the next steps' logits.
CODE_TOLERANCE = 1


class VerificationError(GptxError):
    """onnxruntime disagrees with PyTorch beyond the tolerance (exit code 2)."""


@dataclasses.dataclass
class Report:
    max_abs_diff: float = 0.0
    worst: str = ""  # "case: output"
    cases: dict = dataclasses.field(default_factory=dict)  # case -> max abs diff
    fusions: dict = dataclasses.field(default_factory=dict)  # fused operator -> count (gptx.export.fuse)
    shared_buffer: bool = False  # the shared-buffer case was run and passed
    max_code_diff: Optional[int] = None  # integer (quantised) cache codes; None: the cache has none

    def to_dict(self) -> dict:
        out = {"max_abs_diff": self.max_abs_diff, "worst": self.worst, "cases": self.cases, "tolerance": TOLERANCE}
        if self.max_code_diff is not None:
            out |= {"max_code_diff": self.max_code_diff, "code_tolerance": CODE_TOLERANCE}
        return out


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
        self.codes = [not t.dtype.is_floating_point for t in layout] * self.L  # quantised codes, in output order
        self.t_past = model.empty_cache(0)  # replaced on the first call
        self.o_past = None
        self.buffers = None  # shared decoding: one OrtValue per cache tensor, bound as past and present

    def start(self, batch: int, capacity: int = 0):
        """A new batch with an empty cache; ``capacity`` > 0: onnxruntime's cache is a preallocated
        buffer of that many slots, shared by past and present (past_present_share_buffer)."""
        from onnxruntime import OrtValue

        self.t_past = self.model.empty_cache(batch)
        self.o_past = [p.numpy() for kv in self.t_past for p in kv]
        if capacity:
            shapes = [[capacity if a == axis else n for a, n in enumerate(p.shape)] for p, axis in zip(self.o_past, self.seq_axes)]
            self.buffers = [OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=p.dtype)) for shape, p in zip(shapes, self.o_past)]

    def _run_shared(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> list[np.ndarray]:
        """One step with the buffers bound as past and present (the runtime's ``run_shared``); the
        presents returned are the buffers' first S = mask width slots (the rest is not written yet)."""
        from onnxruntime import OrtValue

        from gptx.export.runtime import run_shared

        feeds = [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x)) for x in (ids, mask, pos)] + self.buffers
        logits = run_shared(self.sess, self.inputs, self.outputs, feeds)
        S = mask.shape[1]
        return [logits, *(np.take(b.numpy(), np.arange(S), axis=axis) for b, axis in zip(self.buffers, self.seq_axes))]

    @torch.inference_mode()
    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray):
        logits, presents = self.model(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), self.t_past)
        if self.buffers:
            outs = self._run_shared(ids, mask, pos)
        else:
            outs = self.sess.run(None, dict(zip(self.inputs, [ids, mask, pos, *self.o_past])))
        torch_outs = [logits.numpy(), *(p.numpy() for kv in presents for p in kv)]
        for name, o, t, axis, codes in zip(self.outputs, outs, torch_outs, [None, *self.seq_axes], [False, *self.codes]):
            if o.shape != t.shape or o.dtype != t.dtype:
                raise VerificationError(f"export verification failed: {self.case}: {name} is {o.dtype} {list(o.shape)} in "
                                        f"onnxruntime, {t.dtype} {list(t.shape)} in PyTorch")
            d = _real_rows_max_abs_diff(o, t, mask, axis)
            if codes:
                self.report.max_code_diff = max(self.report.max_code_diff or 0, int(d))
                continue
            self.report.cases[self.case] = max(self.report.cases.get(self.case, 0.0), d)
            if d > self.report.max_abs_diff or not self.report.worst:
                self.report.max_abs_diff, self.report.worst = max(d, self.report.max_abs_diff), f"{self.case}: {name}"
        self.t_past = presents
        self.o_past = torch_outs[1:] if any(self.codes) and not self.buffers else outs[1:]  # see CODE_TOLERANCE
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
    d = float(np.max(np.where(real, abs_diff(o, t), 0.0)))
    return d if np.isfinite(d) else float("inf")


def abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float64, 0 where both hold the same value: the -inf logits of a padded vocabulary
    agree (inf - inf would be NaN); one -inf against a finite value is an infinite difference."""
    return np.where(a == b, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))


def verify(model, sess, seed: int = 0, shared_buffer: bool = False) -> Report:
    """Compare onnxruntime with PyTorch on the four cases (five with ``shared_buffer``: the graph
    claims past_present_share_buffer); raise VerificationError past TOLERANCE."""
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

    # chunked prefill: first chunk, then the rest with a non-empty past; one row, the contract's
    # promise (onnxruntime's GroupQueryAttention refuses T > 1 over a past for a batch, as a
    # runtime that prefills in chunks does one sequence at a time)
    if n >= 2:
        p = _Pair(model, sess, report, "chunked")
        p.start(1)
        ids = rng.integers(0, V, (1, n))
        cut = n // 2
        p.step(ids[:, :cut], np.ones((1, cut), dtype=np.int64), np.arange(cut)[None])
        p.step(ids[:, cut:], np.ones((1, n), dtype=np.int64), np.arange(cut, n)[None])

    # left-padded batch of different lengths, then 1-token steps; again on a shared buffer
    steps = min(2, n - 1)
    longest = n - steps
    prompts = [list(rng.integers(0, V, max(1, longest))), list(rng.integers(0, V, max(1, longest // 3)))]
    new_ids = rng.integers(0, V, (steps, 2, 1))
    cases = [("left-padded", 0)] + ([("shared-buffer", n + 1)] if shared_buffer else [])  # (name, buffer slots)
    for case, capacity in cases:
        if longest < 2 and not capacity:
            continue
        p = _Pair(model, sess, report, case)
        ids, mask = left_pad([[int(x) for x in q] for q in prompts])
        pos = positions_from_mask(mask)
        p.start(2, capacity)
        p.step(ids, mask, pos)
        for t in range(steps):
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            p.step(new_ids[t], mask, pos)
    report.shared_buffer = shared_buffer

    if report.max_code_diff is not None and report.max_code_diff > CODE_TOLERANCE:
        raise VerificationError(f"export verification failed: onnxruntime's quantised cache codes differ from PyTorch's "
                                f"by {report.max_code_diff} (> {CODE_TOLERANCE})")
    if not report.max_abs_diff <= TOLERANCE:
        raise VerificationError(
            f"export verification failed: onnxruntime differs from PyTorch by {report.max_abs_diff:.3g} "
            f"(> {TOLERANCE:g}) in {report.worst}"
        )
    return report
