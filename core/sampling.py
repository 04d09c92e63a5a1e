"""Choosing the next token from logits. NumPy only (no torch), so the PyTorch and onnxruntime
generators share one implementation: same logits + same seed -> same tokens."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class Generation:
    """What a generator returns (torch and onnxruntime alike)."""

    prompt_ids: list[list[int]]
    ids: list[list[int]]  # new tokens per prompt, stopped at (and including) end-of-text


class Collector:
    """The new tokens of each row, each row closed at its end-of-text token, or once ``stop`` says
    its new tokens are complete (lm-eval's stop sequences: text, so only the caller can decode)."""

    def __init__(self, rows: int, eot_id: Optional[int], stop: Optional[Callable[[list[int]], bool]] = None):
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = np.zeros(rows, dtype=bool)
        self.eot_id, self.stop = eot_id, stop

    def add(self, tokens: np.ndarray) -> bool:
        """Append tokens [B] to the open rows; True once every row is closed."""
        for i, tok in enumerate(tokens):
            if not self.done[i]:
                self.ids[i].append(int(tok))
                self.done[i] = (self.eot_id is not None and tok == self.eot_id) or (
                    self.stop is not None and self.stop(self.ids[i]))
        return bool(self.done.all())


class Sampler:
    """temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set
    whose probability reaches p (nucleus). One seeded generator per generation call."""

    def __init__(self, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None):
        if temperature < 0:
            raise ValueError("temperature must not be negative")
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be at least 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> next token ids [B] (int64)."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.temperature == 0:
            return logits.argmax(axis=-1).astype(np.int64)
        z = logits / self.temperature  # [B, V]
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k][:, None]  # [B, 1]
            z = np.where(z < kth, -np.inf, z)
        z = z - z.max(axis=-1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=-1, keepdims=True)  # [B, V]
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V]
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < self.top_p  # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        u = self.rng.random((probs.shape[0], 1))  # [B, 1]
        cdf = np.cumsum(probs, axis=-1)
        return np.minimum((cdf < u * cdf[:, -1:]).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> ids [B, T] and attention_mask [B, T], padded on the left
    so every row's next token lands in the same column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids [B, T] for a left-padded attention mask: 0 at each row's first real token."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)
