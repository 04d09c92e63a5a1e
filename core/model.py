"""The decoder-only transformer, assembled from the components a ModelConfig names.

    tokens -> wte (+ positional.embed) -> n_layer x Block -> final norm -> lm_head -> logits
    Block:  x = attn_placement(x, attention);  x = ffn_placement(x, ffn)

With the defaults (learned positions, causal attention, GELU MLP, pre-norm LayerNorm, tied
embeddings) this is exactly GPT-2, and Hugging Face GPT-2 weights load into it (gptx.hf).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gptx.components import KV, KVBuffer, gpt2_init_std
from gptx.config import ModelConfig


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        norm, attn, ffn = config.norm, config.attention, config.ffn
        make_norm = lambda: norm.cls(config.n_embd, norm.options)  # noqa: E731
        self.attn = attn.cls(config, attn.options)
        self.mlp = ffn.cls(config, ffn.options)
        self.attn_norm = norm.placement_cls(make_norm, None)  # owns the norm(s) around attention
        self.mlp_norm = norm.placement_cls(make_norm, None)  # owns the norm(s) around the MLP

    def forward(self, x, positions, positional, past: Optional[KV], attention_mask):
        present: list[KV] = []

        def attention(h):  # [B, T, C] -> [B, T, C], keeping the extended cache
            y, kv = self.attn(h, positions, positional, past, attention_mask)
            present.append(kv)
            return y

        x = self.attn_norm(x, attention)  # [B, T, C]
        x = self.mlp_norm(x, self.mlp)  # [B, T, C]
        return x, present[0]


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.positional = config.positional.cls(config, config.positional.options)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        final = config.norm.placement_cls.final_norm
        self.ln_f = config.norm.cls(config.n_embd, config.norm.options) if final else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix for input and output, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual output projections: GPT-2's scaled init
                nn.init.normal_(p, mean=0.0, std=gpt2_init_std(config, residual=True))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=gpt2_init_std(self.config, residual=False))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def kv_heads(self) -> int:
        return self.blocks[0].attn.n_kv_heads

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied matrix counted once; ``non_embedding`` leaves out the token and
        learned position tables (the N of the 6N flops-per-token estimate)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            n -= sum(p.numel() for p in self.positional.parameters())
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training flops per token: 6N + 12 * L * H * Q * T (PaLM appendix B, nanoGPT's MFU)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: Optional[torch.Tensor] = None,  # [B, T]; None: P..P+T-1
        attention_mask: Optional[torch.Tensor] = None,  # [B, P+T], 1 real / 0 left padding
        past_key_values: Optional[list[KV]] = None,  # n_layer x ([B, K, P, D], [B, K, P, D])
        last_logits_only: bool = False,  # decoding: the LM head on the last position alone
    ) -> tuple[torch.Tensor, list[KV]]:  # logits [B, T or 1, V], presents n_layer x ([B, K, P+T, D] x2)
        B, T = input_ids.shape
        if position_ids is None:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # [B, T]
        x = self.wte(input_ids)  # [B, T, C]
        pos = self.positional.embed(position_ids)  # [B, T, C] or None
        if pos is not None:
            x = x + pos
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            x, present = block(x, position_ids, self.positional, past, attention_mask)  # [B, T, C]
            presents.append(present)
        if last_logits_only:
            x = x[:, -1:]  # [B, 1, C]: a prefill needs the next token only, not T x V logits
        logits = self.lm_head(self.ln_f(x))  # [B, T or 1, V]
        return logits, presents

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; input_ids, targets [B, T]."""
        logits, _ = self(input_ids)  # [B, T, V]
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def empty_cache(self, batch: int, device=None, dtype=None, capacity: int = 0) -> list[KV]:
        """A zero-length past for every layer: ([B, K, 0, D], [B, K, 0, D]); with ``capacity``, as
        KVBuffers that later tokens are written into in place (up to that many positions)."""
        p = self.wte.weight
        make = lambda n: torch.zeros((batch, self.kv_heads, n, self.config.head_dim),  # noqa: E731
                                     device=device or p.device, dtype=dtype or p.dtype)  # [B, K, n, D]
        if capacity:
            return [KVBuffer(make(capacity), make(capacity), 0) for _ in self.blocks]
        return [(make(0),) * 2 for _ in self.blocks]


def build_model(config: ModelConfig) -> GPT:
    return GPT(config)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay 2-D weights (matmuls, embeddings); never biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

