"""The assembled model: cached decoding equals recomputation for every registered component,
left padding changes nothing, GPT-2's initialisation, tied embeddings and parameter count."""
import math

import pytest
import torch

from gptx import registry as registry_mod
from gptx.config import from_dict
from gptx.model import GPT
from gptx.sampling import left_pad, positions_from_mask

REG = registry_mod.registry()
VOCAB = 97
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": VOCAB}


def make_model(seed=0, **model) -> GPT:
    cfg = from_dict({"model": TINY | model, "tokenizer": {"kind": "byte"}}, REG)
    torch.manual_seed(seed)
    return GPT(cfg.model).eval()


def perturb(model: GPT, seed=1):
    """Non-trivial norm gains/biases and linear biases, so every parameter takes part in the check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def cached_logits(model: GPT, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Empty past, then prefill in the given chunk sizes, then 1-token steps to the end."""
    past = model.empty_cache(ids.shape[0])
    out, start = [], 0
    sizes = list(chunks) + [1] * (ids.shape[1] - sum(chunks))
    for n in sizes:
        logits, past = model(ids[:, start:start + n], past_key_values=past)  # [B, n, V]
        assert past[0][0].shape[model.seq_axis] == start + n
        out.append(logits)
        start += n
    return torch.cat(out, dim=1)


def _slot_params():
    cases = []
    for att in REG.names("attention"):
        for pos in REG.names("positional"):
            cases.append(pytest.param({"attention": {"kind": att}, "positional": {"kind": pos}}, id=f"attention={att}-positional={pos}"))
    for ffn in REG.names("ffn"):
        cases.append(pytest.param({"ffn": {"kind": ffn}}, id=f"ffn={ffn}"))
    for norm in REG.names("norm"):
        for placement in REG.names("norm_placement"):
            cases.append(pytest.param({"norm": {"kind": norm}, "block": {"placement": placement}}, id=f"norm={norm}-{placement}"))
    for att in ("causal", "einsum"):  # the options of the built-in multi-head attentions
        cases.append(pytest.param({"attention": {"kind": att, "n_kv_heads": 2}, "positional": {"kind": "rope"}}, id=f"{att}-gqa2-rope"))
        cases.append(pytest.param({"attention": {"kind": att, "n_kv_heads": 1}}, id=f"{att}-mqa"))
        cases.append(pytest.param({"attention": {"kind": att, "window": 4}, "positional": {"kind": "alibi"}}, id=f"{att}-window4-alibi"))
    return cases


SLOTS = _slot_params()


@pytest.mark.parametrize("slots", SLOTS)
def test_cached_decoding_equals_recomputation(slots):
    model = make_model(**slots)
    perturb(model)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(ids)  # no past: plain causal attention
        for chunks in ([5, 3], [1], [14]):
            got = cached_logits(model, ids, chunks)
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5, msg=lambda m: f"chunks {chunks}: {m}")


@pytest.mark.parametrize("slots", SLOTS)
def test_left_padded_batch_rows_equal_unpadded(slots):
    model = make_model(**slots)
    perturb(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 5)]
    steps = 4
    ids, mask = left_pad(prompts)
    pos = positions_from_mask(mask)
    ids, mask, pos = (torch.from_numpy(a) for a in (ids, mask, pos))
    nxt = torch.randint(0, VOCAB, (len(prompts), steps), generator=g)  # forced continuation tokens
    with torch.no_grad():
        logits, past = model(ids, pos, mask, model.empty_cache(len(prompts)))
        batch_steps = [logits[:, -1]]
        for s in range(steps):
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            pos = pos[:, -1:] + 1
            logits, past = model(nxt[:, s:s + 1], pos, mask, past)
            batch_steps.append(logits[:, -1])
        T = ids.shape[1]
        for i, p in enumerate(prompts):
            row = torch.tensor([p + nxt[i].tolist()])
            single, _ = model(row)  # [1, len + steps, V], no padding, no cache
            # prompt tokens: the padded prefill's real columns
            padded_prompt, _ = model(ids[i:i + 1, T - len(p):], None, None, None)
            torch.testing.assert_close(padded_prompt[0], single[0, :len(p)], atol=1e-5, rtol=1e-5)
            for s in range(steps + 1):
                torch.testing.assert_close(
                    batch_steps[s][i], single[0, len(p) - 1 + s], atol=1e-5, rtol=1e-5,
                    msg=lambda m: f"row {i} step {s}: {m}",
                )


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    model = make_model(n_layer=4, n_embd=256, n_head=4, vocab_size=2000, block_size=256)
    resid_std = 0.02 / math.sqrt(2 * 4)
    seen_proj = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
            seen_proj += 1
        elif name.endswith("norm.weight") or name == "ln_f.weight":
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 2:  # wte, wpe, c_attn, c_fc
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
    assert seen_proj == 2 * 4  # attention and MLP output projection in every block


def test_tied_embeddings_are_one_tensor(tmp_path):
    model = make_model()
    assert model.lm_head.weight is model.wte.weight
    assert sum(1 for _ in model.parameters()) == len({id(p) for p in model.parameters()})
    from safetensors import safe_open

    from gptx import checkpoint

    model = make_model(vocab_size=256)  # the byte tokenizer's vocabulary: a checkpoint may not hold less
    cfg = from_dict({"model": TINY | {"vocab_size": 256}, "tokenizer": {"kind": "byte"}}, REG)
    tok = checkpoint.build_tokenizer(cfg.tokenizer)
    path = checkpoint.save(tmp_path, 3, model, cfg, tok)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("wte.weight" in keys) != ("lm_head.weight" in keys)  # stored once
    loaded = checkpoint.load(tmp_path).model
    assert loaded.lm_head.weight is loaded.wte.weight
    torch.testing.assert_close(loaded.wte.weight, model.wte.weight, atol=0, rtol=0)

    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_gpt2_124m_parameter_count():
    cfg = from_dict({"model": {"vocab_size": 50257}, "tokenizer": {"kind": "gpt2"}}, REG)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_generate_greedy_matches_argmax_of_full_recompute():
    from gptx.generate import generate_ids
    from gptx.sampling import Sampler

    model = make_model()
    prompt = [5, 17, 42]
    out = generate_ids(model, [prompt, prompt[1:]], 6, Sampler(temperature=0)).ids
    for p, new in zip([prompt, prompt[1:]], out):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                logits, _ = model(torch.tensor([seq]))
                seq.append(int(logits[0, -1].argmax()))
        assert new == seq[len(p):]


def test_preallocated_cache_writes_in_place_and_equals_concatenation():
    from gptx.components import CacheBuffer

    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = cached_logits(model, ids, [4])  # concatenating cache
        past = model.empty_cache(2, capacity=7)  # room for 7 of the 9 positions: the rest concatenates
        buffer_ptr = past[0].buffers[0].data_ptr()
        out, start = [], 0
        for n in [4, 1, 1, 1, 1, 1]:
            logits, past = model(ids[:, start:start + n], past_key_values=past)  # [B, n, V]
            out.append(logits)
            start += n
            in_place = start <= 7
            assert isinstance(past[0], CacheBuffer) == in_place and past[0][0].shape[2] == start
            if in_place:
                assert past[0][0].data_ptr() == buffer_ptr  # the same storage, no copy of the cache
    torch.testing.assert_close(torch.cat(out, dim=1), plain, rtol=0, atol=1e-6)


def test_last_logits_only_is_the_last_row_of_the_full_logits():
    model = make_model()
    ids = torch.tensor([[5, 17, 42, 7], [3, 1, 4, 1]])
    with torch.no_grad():
        full, presents = model(ids)
        last, presents_last = model(ids, last_logits_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for p, q in zip(presents, presents_last) for a, b in zip(p, q))


def test_decoding_layout_keeps_values_ties_and_tokens():
    from gptx.generate import decoding_layout, generate_ids
    from gptx.sampling import Sampler

    model = make_model(bias=True)
    perturb(model)
    ids = torch.tensor([[5, 17, 42, 7, 3]])
    with torch.no_grad():
        before = model(ids)[0]
    greedy = generate_ids(model, [[5, 17, 42]], 8, Sampler(temperature=0)).ids
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert decoding_layout(decoding_layout(model)) is model  # idempotent
    assert model.lm_head.weight is model.wte.weight  # still one tensor
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], before, rtol=0, atol=1e-5)
    assert generate_ids(model, [[5, 17, 42]], 8, Sampler(temperature=0)).ids == greedy


def test_generate_recomputes_when_a_component_declares_no_kv_cache():
    """A third-party attention without KV_CACHE support is never handed a cache."""
    import gptx
    from gptx.components import ONNX_EXPORT
    from gptx.generate import generate_ids, uses_kv_cache
    from gptx.plugins.attention import CausalSelfAttention
    from gptx.sampling import Sampler

    class NoCacheAttention(CausalSelfAttention):
        supports = frozenset({ONNX_EXPORT})

        def forward(self, x, positions, positional, past=None, attention_mask=None):
            assert past is None, "handed a cache although it declared no KV_CACHE support"
            return super().forward(x, positions, positional, None, attention_mask)

    def register_attention(register):
        register("nocache", NoCacheAttention)

    import types

    plugin = types.ModuleType("nocache_plugin")
    plugin.register_attention = gptx.hookimpl(register_attention)
    reg = registry_mod.load(extra_plugins=(plugin,))
    cfg = from_dict({"model": TINY | {"attention": {"kind": "nocache"}}, "tokenizer": {"kind": "byte"}}, reg)
    model = GPT(cfg.model).eval()
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    assert not uses_kv_cache(model) and uses_kv_cache(reference)
    prompts = [[5, 17, 42, 8], [3, 9]]
    for sampler in (lambda: Sampler(temperature=0), lambda: Sampler(temperature=1.0, seed=7)):
        got = generate_ids(model, prompts, 7, sampler()).ids
        assert got == generate_ids(reference, prompts, 7, sampler()).ids


def test_the_old_cache_buffer_name_still_imports_with_a_warning():
    import gptx.components as components

    with pytest.warns(DeprecationWarning, match="now CacheBuffer"):
        assert components.KVBuffer is components.CacheBuffer
