"""The decoder-only transformer, assembled from the components a ModelConfig names.

    tokens -> wte (+ positional.embed) -> n_layer x block -> final norm -> lm_head -> logits
    block (sequential, the default): x = placement(x, attention); x = placement(x, ffn)

With the defaults (learned positions, causal attention, GELU MLP, pre-norm LayerNorm, tied
embeddings) this is exactly GPT-2, and Hugging Face GPT-2 weights load into it (gptx.hf).
The model owns the one loss every path trains and evaluates with: ``model(x, targets=y)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gptx.base import Component
from gptx.components import Aux, BlockOutput, Cache, CacheBuffer, gpt2_init_std
from gptx.config import ModelConfig


class Loss(NamedTuple):
    """What ``model(x, targets=y)`` returns: ``loss`` the training objective (cross-entropy + each
    auxiliary loss times its weight), ``ce`` the cross-entropy alone (what is printed and
    compared), ``aux`` the unweighted auxiliary losses and ``metrics`` the components' metrics,
    each named ``aux/layer<i>.<part>/<name>`` (0-d tensors)."""

    loss: torch.Tensor
    ce: torch.Tensor
    aux: dict
    metrics: dict


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.positional = config.positional.cls(config, config.positional.options)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(config.block.cls(config, config.block.options, i) for i in range(config.n_layer))
        final = self.blocks[0].final_norm
        self.ln_f = config.norm.cls(config.n_embd, config.norm.options) if final else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix for input and output, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual output projections: GPT-2's scaled init
                nn.init.normal_(p, mean=0.0, std=gpt2_init_std(config, residual=True))
        for module in self.modules():  # then each component's own, if it has one (docs/plugins.md)
            if isinstance(module, Component) and hasattr(module, "init_weights"):
                module.init_weights(config)
        self.seq_axis = self.blocks[0].cache_layout()[0].seq_axis  # where the first cache tensor grows
        self.register_buffer("padded_vocab_bias", None, persistent=False)  # see mask_padded_vocab

    def mask_padded_vocab(self, vocab: int) -> "GPT":
        """For inference on a vocabulary padded past the tokenizer's (nanoGPT pads GPT-2's 50,257 to
        50,304): the logits of ids >= ``vocab`` become -inf, so neither this model nor its ONNX export
        lets any runtime (onnxruntime, onnxruntime-genai, Node, the browser) sample an id the
        tokenizer cannot decode. Not for training: the padding's logits would leave the softmax.
        Returns the model."""
        V = self.config.vocab_size
        if vocab < V:
            bias = torch.zeros(V, device=self.lm_head.weight.device)  # [V]
            bias[vocab:] = float("-inf")
            self.padded_vocab_bias = bias
        return self

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=gpt2_init_std(self.config, residual=False))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def kv_heads(self) -> int:
        """K of the default cache layout (what genai_config.json and the export metadata name)."""
        return self.blocks[0].attention().n_kv_heads

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied matrix counted once; ``non_embedding`` leaves out the token and
        learned position tables (the N of the 6N flops-per-token estimate)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            n -= sum(p.numel() for p in self.positional.parameters())
        return n

    def active_params(self, non_embedding: bool = False) -> int:
        """Parameters one token passes through: ``num_params`` less what a component declares
        inactive per token (a mixture of experts' unchosen experts, ``inactive_params()``)."""
        inactive = sum(m.inactive_params() for m in self.modules() if m is not self and hasattr(m, "inactive_params"))
        return self.num_params(non_embedding) - inactive

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training flops per token: 6N + 12 * L * H * Q * T (PaLM appendix B, nanoGPT's MFU), N the
        active non-embedding parameters."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.active_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: Optional[torch.Tensor] = None,  # [B, T]; None: P..P+T-1
        attention_mask: Optional[torch.Tensor] = None,  # [B, P+T], 1 real / 0 left padding
        past_key_values: Optional[list[Cache]] = None,  # n_layer x the declared cache with P entries
        last_logits_only: bool = False,  # decoding: the LM head on the last position alone
        targets: Optional[torch.Tensor] = None,  # [B, T]: return the Loss instead
    ):  # (logits [B, T or 1, V], presents n_layer x cache with P+T entries), or Loss with targets
        B, T = input_ids.shape
        if position_ids is None:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[self.seq_axis]
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # [B, T]
        x = self.wte(input_ids)  # [B, T, C]
        pos = self.positional.embed(position_ids)  # [B, T, C] or None
        if pos is not None:
            x = x + pos
        x = self.drop(x)
        presents, auxes = [], {}
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            out = BlockOutput.of(block(x, position_ids, self.positional, past, attention_mask), block)
            x = out.x  # [B, T, C]
            presents.append(out.present)
            if out.aux is not None:
                auxes[f"layer{i}"] = out.aux
        if last_logits_only:
            x = x[:, -1:]  # [B, 1, C]: a prefill needs the next token only, not T x V logits
        logits = self.lm_head(self.ln_f(x))  # [B, T or 1, V]
        if self.padded_vocab_bias is not None:
            logits = logits + self.padded_vocab_bias  # [B, T or 1, V]: -inf past the tokenizer's ids
        if targets is None:
            return logits, presents
        return self.objective(logits, targets, auxes)

    @staticmethod
    def objective(logits: torch.Tensor, targets: torch.Tensor, auxes: dict[str, Aux]) -> Loss:
        """Cross-entropy in fp32 (logits may be bf16 under autocast) plus the weighted auxiliary losses."""
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss, aux, metrics = ce, {}, {}
        for where, a in auxes.items():
            for name, (value, weight) in a.losses.items():
                loss = loss + weight * value
                aux[f"aux/{where}.{name}"] = value.detach()
            metrics.update({f"aux/{where}.{name}": value.detach() for name, value in a.metrics.items()})
        return Loss(loss, ce, aux, metrics)

    def cache_layouts(self) -> list:
        return [block.cache_layout() for block in self.blocks]

    def cache_bytes_per_token(self, dtype=None) -> int:
        """Bytes the cache holds per token (one row), all layers together: each declared tensor's
        fixed sizes times its element size, floating-point tensors in the model's dtype (or
        ``dtype``) as ``empty_cache`` makes them."""
        dtype = dtype or self.wte.weight.dtype
        total = 0
        for layout in self.cache_layouts():
            for t in layout:
                element = t.stored_as(dtype).itemsize
                total += element * math.prod(d for d in t.dims if isinstance(d, int))
        return total

    def empty_cache(self, batch: int, device=None, dtype=None, capacity: int = 0) -> list[Cache]:
        """A zero-length past for every layer, as each layer's attention declares it; with
        ``capacity``, CacheBuffers that later tokens are written into in place (up to that many).
        Floating-point tensors take the model's dtype (or ``dtype``); others (an int8 cache)
        keep the dtype their attention declares."""
        p = self.wte.weight
        device, dtype = device or p.device, dtype or p.dtype
        caches = []
        for layout in self.cache_layouts():
            kinds = [t.stored_as(dtype) for t in layout]
            if capacity:
                buffers = [t.empty(batch, capacity, device, k) for t, k in zip(layout, kinds)]
                caches.append(CacheBuffer(buffers, [t.seq_axis for t in layout], 0))
            else:
                caches.append(tuple(t.empty(batch, 0, device, k) for t, k in zip(layout, kinds)))
        return caches


