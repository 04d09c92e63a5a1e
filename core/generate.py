"""Text generation in PyTorch with the KV cache: one prefill of the (left-padded) prompts, then one
token per step (a model with a component that declares no KV cache is recomputed instead).
Sampling is shared with the onnxruntime generator (gptx.sampling)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from gptx.base import KV_CACHE
from gptx.sampling import Collector, Generation, Sampler, left_pad, positions_from_mask  # noqa: F401 (Generation re-exported)


def decoding_layout(model):
    """Re-store every ``nn.Linear`` weight on CPU as the transposed view of a contiguous [in, out]
    matrix: same values, same modules, tied weights still one tensor, but ``F.linear`` then
    multiplies by a contiguous [in, out] matrix, which CPU matrix-vector products (batch-1
    decoding) read faster than [out, in] (same tokens; `gptx bench --only generate` measures the torch
    backend with it). For inference: returns the model."""
    with torch.no_grad():
        for module in model.modules():
            w = module.weight if isinstance(module, torch.nn.Linear) else None
            if w is not None and w.device.type == "cpu" and w.is_contiguous():
                w.data = w.data.t().contiguous().t()  # [out, in] view of [in, out] storage
    return model


def uses_kv_cache(model) -> bool:
    """Whether every component of the model declares ``KV_CACHE``. A model with one that does not
    is decoded by recomputing the whole sequence each step: slower, but never a wrong cache."""
    return all(KV_CACHE in cls.supports for _, _, cls in model.config.classes())


@torch.inference_mode()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampler: Sampler,
    eot_id: Optional[int] = None,
    vocab: Optional[int] = None,
    stop: Optional[Callable[[list[int]], bool]] = None,
) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens, with the KV cache while the
    sequence fits the model's context (block_size). Beyond it, as nanoGPT does, each new token
    sees the last block_size tokens only: the window is recomputed every step, positions
    counted from its start (any positional encoding allows it: none is asked for a position it
    was not trained on). A prompt longer than the context keeps its last block_size - 1 tokens.
    ``vocab``: the tokenizer's vocabulary size; a model padded beyond it (nanoGPT's 50,304 for
    GPT-2's 50,257) never samples the padding's ids, which no tokenizer can decode. ``stop``: a
    row whose new ids it is true of is closed, as at end-of-text (``sampling.Collector``)."""
    limit = model.config.block_size
    model.eval()
    device = model.wte.weight.device
    ids, mask = left_pad([p[-(limit - 1):] if limit > 1 else p[-1:] for p in prompts])
    seq = torch.from_numpy(ids).to(device)  # [B, S]: every token so far (the window's source)
    attention_mask = torch.from_numpy(mask).to(device)  # [B, S]
    cache = uses_kv_cache(model)
    past = model.empty_cache(len(prompts), capacity=min(limit, seq.shape[1] + max_new_tokens)) if cache else None
    input_ids, position_ids = seq, torch.from_numpy(positions_from_mask(mask)).to(device)  # [B, S] x2
    cached = 0  # tokens in the cache
    out = Collector(len(prompts), eot_id, stop)
    for _ in range(max_new_tokens):
        context = attention_mask[:, -(cached + input_ids.shape[1]):]  # [B, P+T]
        logits, present = model(input_ids, position_ids, context, past, last_logits_only=True)  # [B, 1, V]
        nxt = sampler(logits[:, -1, :vocab].float().cpu().numpy())  # [B]: ids the tokenizer has
        if out.add(nxt):
            break
        step = torch.from_numpy(nxt).to(device)[:, None]  # [B, 1]
        seq = torch.cat([seq, step], dim=1)  # [B, S+1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)  # [B, S+1]
        if cache and seq.shape[1] <= limit:  # the cache holds the whole context: feed the new token alone
            past, cached = present, cached + input_ids.shape[1]
            input_ids, position_ids = step, position_ids[:, -1:] + 1  # [B, 1] x2
        else:  # recompute the window: the last `limit` tokens, positions counted from its start
            past, cached, input_ids = None, 0, seq[:, -limit:]  # [B, <= limit]
            position_ids = (attention_mask[:, -limit:].cumsum(dim=1) - 1).clamp(min=0)  # [B, <= limit]
    return Generation(prompt_ids=[list(p) for p in prompts], ids=out.ids)
