"""Components that declare how they travel out of gptx.

- tokenizer ``letters``: the characters of a fixed alphabet (tiny Shakespeare's), anything else
  ``?``, and ``<|endoftext|>``; its own Python code, described for the ``tokenizers`` library by
  ``tokenizer_json()`` (a merge-free BPE over the alphabet), so its exports run in Node, the
  browser and transformers with the same ids.
- tokenizer ``shifted``: UTF-8 bytes shifted by one (id 0 is end-of-text); no tokenizer_json(),
  so only gptx's Python runs its exports.
- attention ``fast_causal``: GPT-2's attention spelled out with matmul and softmax (a stand-in for
  a faster kernel): the parameters of built-in ``causal``, declared with ``hf_equivalent``.
- attention ``plain_causal``: the same code without the declaration (the HF export refuses it).
- ffn ``relu_claims_gelu``: a ReLU MLP that falsely declares ``hf_equivalent = "gelu"``; the
  parameters agree, the function does not, and ``gptx check-plugin`` says so.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import Attention, AttentionOutput, FeedForward, Tokenizer, append_kv, attention_allowed, slot_indices
from gptx.errors import GptxError

EOT = "<|endoftext|>"
ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's
UNKNOWN = "?"


class LettersTokenizer(Tokenizer):
    """One id per character of ALPHABET, ``?`` for any other, and EOT last."""

    encodes_in_pieces = True

    def __init__(self, options, state=None):
        super().__init__(options, state)
        self.index = {c: i for i, c in enumerate(ALPHABET)}

    @property
    def vocab_size(self):
        return len(ALPHABET) + 1

    @property
    def eot_id(self):
        return len(ALPHABET)

    def encode(self, text):
        ids = []
        for n, part in enumerate(text.split(EOT)):  # EOT written in the text is one token, as in gptx's gpt2
            if n:
                ids.append(self.eot_id)
            ids += [self.index.get(c, self.index[UNKNOWN]) for c in part]
        return ids

    def decode(self, ids):
        return "".join(EOT if i == self.eot_id else ALPHABET[i] for i in ids)

    def tokenizer_json(self):
        return {
            "version": "1.0", "truncation": None, "padding": None, "pre_tokenizer": None, "post_processor": None,
            "added_tokens": [{"id": self.eot_id, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": None,
            "decoder": {"type": "Fuse"},  # the characters joined as they are
            # no merges: every character its own token, one outside the vocabulary the unknown "?"
            "model": {"type": "BPE", "dropout": None, "unk_token": UNKNOWN, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": dict(self.index), "merges": []},
        }


class ShiftedBytes(Tokenizer):
    """UTF-8 bytes as ids 1-256; id 0 ends a text. No tokenizer.json: it does not travel."""

    @property
    def vocab_size(self):
        return 257

    @property
    def eot_id(self):
        return 0

    def encode(self, text):
        try:
            return [b + 1 for b in text.encode("utf-8")]
        except UnicodeEncodeError:
            raise GptxError("the shifted tokenizer cannot encode a lone surrogate") from None

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class FastOptions:
    n_kv_heads: Optional[int] = None  # shared with causal by name: carried to it on export
    tile: int = 64  # a kernel setting that changes no result: causal has no such option, the export drops it


class PlainCausal(Attention):
    """Multi-head (or grouped-query) causal attention with explicit scores, softmax and mixing;
    c_attn and c_proj as gptx's causal names and shapes them."""

    Options = FastOptions

    def __init__(self, config, options):
        super().__init__(config, options)
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.n_kv = options.n_kv_heads or config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def n_kv_heads(self):
        return self.n_kv

    def forward(self, x, positions, positional, past=None, attention_mask=None):
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=2)  # [B, T, H*D], [B, T, K*D] x2
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, K, D).transpose(1, 2)  # [B, K, T, D]
        q, k = positional.rotate(q, k, positions)
        past_len = 0 if past is None else past[0].shape[2]
        present = append_kv(past, k, v)  # ([B, K, S, D], [B, K, S, D])
        k, v = (t.repeat_interleave(H // K, dim=1) for t in present)  # [B, H, S, D] x2
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # [B, H, T, S]
        q_index, k_index = slot_indices(past_len, T, x.device)  # [T], [S]
        bias = positional.score_bias(q_index, k_index)  # [H, T, S] or None
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        allowed = attention_allowed(q_index, k_index, attention_mask, None)  # [B|1, 1, T, S]
        att = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, H, T, S]
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return AttentionOutput(self.resid_dropout(self.c_proj(y)), present)  # [B, T, C], ([B, K, S, D], [B, K, S, D])


class FastCausal(PlainCausal):
    """PlainCausal, declared to be built-in ``causal``: the Hugging Face export maps it as causal."""

    hf_equivalent = "causal"


class ReluClaimsGelu(FeedForward):
    """Linear -> ReLU -> Linear, with gelu's parameters but not its function: a false declaration."""

    hf_equivalent = "gelu"

    def __init__(self, config, options):
        super().__init__(config, options)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):  # [B, T, C]
        return self.c_proj(F.relu(self.c_fc(x)))  # [B, T, C]


@gptx.hookimpl
def register_tokenizer(register):
    register("letters", LettersTokenizer)
    register("shifted", ShiftedBytes)


@gptx.hookimpl
def register_attention(register):
    register("fast_causal", FastCausal)
    register("plain_causal", PlainCausal)


@gptx.hookimpl
def register_ffn(register):
    register("relu_claims_gelu", ReluClaimsGelu)
