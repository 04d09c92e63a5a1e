"""The whole menu: every registered component, in its slot, paired with the defaults elsewhere,
keeps the contract that ``gptx check-plugin`` checks: this module runs that very kit
(``gptx.conformance``), so the two can never drift. A component an installed plugin registers is
tested here too: install your plugin and run ``pytest tests/test_menu.py -k <name>`` (or simply
``gptx check-plugin <name>``).

Below the menu, checks of the alternatives against their papers (RoPE, ALiBi, sinusoidal,
SwiGLU, sandwich norm, sliding window, grouped-query attention, mixture of experts, latent
attention).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gptx import conformance
from gptx import registry as registry_mod
from gptx.config import from_dict
from gptx.model import GPT

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64}

# option variants the built-in attention offers, checked like components of their own
VARIANTS = [("attention", kind, extra) for kind in ("causal", "einsum")
            for extra in ({"n_kv_heads": 1}, {"n_kv_heads": 2}, {"window": 5}, {"n_kv_heads": 2, "window": 3},
                          {"qk_norm": True})]
VARIANTS += [("attention", "latent", {"qk_norm": True, "kv_rank": 4}), ("ffn", "moe", {"n_experts": 3, "top_k": 1})]
# The tiktoken tokenizer's default encoding (cl100k_base) downloads its files; gptx ships gpt2's,
# so the contract is checked offline on that one (tests/test_tokenizers.py checks the offline error).
OFFLINE_OPTIONS = {("tokenizer", "tiktoken"): {"encoding": "gpt2"}}


def _menu() -> list:
    reg = registry_mod.registry()
    cases = []
    for entry in conformance.select(reg, [], None):
        options = OFFLINE_OPTIONS.get((entry.kind, entry.name))
        for check, fn in conformance.checks_for(entry, reg, options):
            if fn is not None:  # a check the component declares it has nothing for is not a case
                cases.append(pytest.param(entry.kind, entry.name, options, check, id=f"{entry.kind}={entry.name}-{check}"))
    for kind, name, options in VARIANTS:
        label = ",".join(f"{k}={v}" for k, v in options.items())
        for check, fn in conformance.checks_for(reg.get(kind, name), reg, options):
            if fn is not None:
                cases.append(pytest.param(kind, name, options, check, id=f"{kind}={name},{label}-{check}"))
    return cases


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and leaves the other core to a second
    xdist worker (two threads per worker on a shared 2-core machine ran 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind,name,options,check", _menu())
def test_component_keeps_the_contract(kind, name, options, check):
    reg = registry_mod.registry()
    fn = dict(conformance.checks_for(reg.get(kind, name), reg, options))[check]
    torch.manual_seed(0)
    try:
        fn()
    except conformance.CheckFailed as err:
        pytest.fail(f"{kind} '{name}': {check}: {err}")


def make_config(slot: str | None = None, table: dict | None = None, vocab_size: int = 256, **model):
    raw_model = {**TINY, "vocab_size": vocab_size, **model}
    if slot is not None:
        raw_model[slot] = table
    return from_dict({"model": raw_model, "tokenizer": {"kind": "byte"}}).model


def make_model(slot=None, table=None, seed=0, **model):
    torch.manual_seed(seed)
    return GPT(make_config(slot, table, **model)).eval()


def test_tiktoken_by_name_works_offline_with_the_shipped_gpt2_files():
    """``tiktoken`` with ``encoding = "gpt2"`` works offline from the shipped files (another
    encoding offline fails naming TIKTOKEN_CACHE_DIR: tests/test_tokenizers.py, network refused)."""
    spec = from_dict({"tokenizer": {"kind": "tiktoken", "encoding": "gpt2"}}).tokenizer
    gpt2 = spec.cls(spec.options, None)
    assert gpt2.vocab_size == 50257 and gpt2.encode("Hello world") == [15496, 995]


# ---- the alternatives against their papers ----------------------------------------------------

def test_rope_is_relative_and_norm_preserving():
    """RoPE (Su et al. 2021): rotation keeps lengths, and q_m . k_n depends only on m - n."""
    cfg = make_config("positional", {"kind": "rope"})
    rope = cfg.positional.cls(cfg, cfg.positional.options)
    D = cfg.head_dim
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        qm, _ = rope.rotate(q, q, torch.tensor([[m]]))
        _, kn = rope.rotate(k, k, torch.tensor([[n]]))
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(5, 5) == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    qr, _ = rope.rotate(q, k, torch.tensor([[123]]))
    assert qr.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)
    # frequencies theta_i = base^(-2i/D), the pair (i, i + D/2) turned by position * theta_i
    i = torch.arange(D // 2)
    torch.testing.assert_close(rope.inv_freq, 10000.0 ** (-2 * i / D))
    e = torch.zeros(1, 1, 1, D)
    e[..., 0] = 1.0  # unit vector in the first coordinate of pair 0 (frequency 1)
    turned, _ = rope.rotate(e, e, torch.tensor([[2]]))
    assert turned[0, 0, 0, 0].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert turned[0, 0, 0, D // 2].item() == pytest.approx(math.sin(2.0), abs=1e-6)


def test_alibi_slopes_and_bias():
    """ALiBi (Press et al. 2022): slopes 2^(-8/n * (i+1)); for a non-power-of-two n the
    reference implementation appends every other slope of the next power of two."""
    from gptx.plugins.positional import AlibiPositions

    torch.testing.assert_close(AlibiPositions.head_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(AlibiPositions.head_slopes(4), torch.tensor([2.0 ** -(2 * (i + 1)) for i in range(4)]))
    six = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    torch.testing.assert_close(AlibiPositions.head_slopes(6), torch.tensor(six))
    assert len(AlibiPositions.head_slopes(12)) == 12
    cfg = make_config("positional", {"kind": "alibi"})
    alibi = cfg.positional.cls(cfg, cfg.positional.options)
    bias = alibi.score_bias(torch.arange(3, 5), torch.arange(5))  # queries at slots 3, 4; keys 0..4
    assert bias.shape == (cfg.n_head, 2, 5)
    assert bias[0, 0, 3].item() == 0.0  # a query on itself: no penalty
    assert bias[0, 1, 0].item() == pytest.approx(-0.25 * 4)  # head 0 (slope 1/4 with 4 heads), distance 4


def test_sinusoidal_matches_the_transformer_formula():
    """PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(...) (sines and cosines stored
    as two halves rather than interleaved: a fixed permutation of the channels), times ``scale``:
    by default 0.02, the std of GPT-2's token embeddings, which amplitude 1 would drown."""
    cfg = make_config("positional", {"kind": "sinusoidal", "scale": 1.0})
    enc = cfg.positional.cls(cfg, cfg.positional.options)
    pe = enc.embed(torch.tensor([[0, 1, 50]]))[0]  # [3, C]
    default = make_config("positional", {"kind": "sinusoidal"})
    scaled = default.positional.cls(default, default.positional.options).embed(torch.tensor([[0, 1, 50]]))[0]
    torch.testing.assert_close(scaled, 0.02 * pe)
    C = cfg.n_embd
    for pos_i, pos in enumerate((0, 1, 50)):
        for i in range(C // 2):
            angle = pos / 10000 ** (2 * i / C)
            assert pe[pos_i, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos_i, C // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_gated_ffns_match_their_formula():
    """SwiGLU / GEGLU (Shazeer 2020): W2 (act(x W) * (x V)), with act SiLU / GELU."""
    for kind, act in (("swiglu", torch.nn.functional.silu), ("geglu", torch.nn.functional.gelu)):
        cfg = make_config("ffn", {"kind": kind, "hidden": 24})
        torch.manual_seed(0)
        ffn = cfg.ffn.cls(cfg, cfg.ffn.options)
        x = torch.randn(2, 3, cfg.n_embd)
        W, V = ffn.c_fc.weight[:24], ffn.c_fc.weight[24:]
        bw, bv = ffn.c_fc.bias[:24], ffn.c_fc.bias[24:]
        expected = ffn.c_proj(act(x @ W.T + bw) * (x @ V.T + bv))
        torch.testing.assert_close(ffn(x), expected)
    default = make_config("ffn", {"kind": "swiglu"}, n_embd=768, n_head=12)
    assert default.ffn.cls(default, default.ffn.options).c_proj.in_features == 2048  # 8/3 * 768


def test_norm_placements():
    """pre: x + f(n(x)); post: n(x + f(x)) with no final norm; sandwich: x + n2(f(n1(x)))."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    f = lambda h: 3 * h + 1  # noqa: E731
    made = []

    def make_norm():
        made.append(torch.nn.LayerNorm(8))
        with torch.no_grad():
            made[-1].weight.uniform_(0.5, 2)
            made[-1].bias.uniform_(-1, 1)
        return made[-1]

    reg = registry_mod.registry()
    pre, post, sandwich = (reg.get("norm_placement", n).cls for n in ("pre", "post", "sandwich"))
    p = pre(make_norm, None)
    torch.testing.assert_close(p(x, f), x + f(made[-1](x)))
    p = post(make_norm, None)
    torch.testing.assert_close(p(x, f), made[-1](x + f(x)))
    assert post.final_norm is False and pre.final_norm is True and sandwich.final_norm is True
    made.clear()
    p = sandwich(make_norm, None)
    n_in, n_out = made
    torch.testing.assert_close(p(x, f), x + n_out(f(n_in(x))))
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in p.modules()) == 2


def test_rmsnorm_matches_its_formula():
    cfg = make_config("norm", {"kind": "rmsnorm", "eps": 1e-6})
    norm = cfg.norm.cls(8, cfg.norm.options)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)


@pytest.mark.parametrize("attention", ["causal", "einsum"])
@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window_sees_exactly_window_keys(attention, window):
    """With one layer, the output at position t depends on tokens t-window+1..t and no others."""
    model = make_model("attention", {"kind": attention, "window": window}, n_layer=1, seed=5)
    torch.manual_seed(6)
    ids = torch.randint(0, 256, (1, 12))
    t = 10
    with torch.no_grad():
        base = model(ids)[0][0, t]
        for j in range(t + 1):
            other = ids.clone()
            other[0, j] = (other[0, j] + 1) % 256
            changed = not torch.allclose(model(other)[0][0, t], base, atol=1e-6)
            assert changed == (t - j < window), f"token {j} {'seen' if changed else 'unseen'} from {t}"


def _expand_kv(weight: torch.Tensor, n_kv: int, group: int, head_dim: int) -> torch.Tensor:
    """[K*D, C] key or value weight -> [H*D, C] with each kv head repeated for its query group."""
    return weight.view(n_kv, head_dim, -1).repeat_interleave(group, dim=0).reshape(n_kv * group * head_dim, -1)


@pytest.mark.parametrize("attention", ["causal", "einsum"])
@pytest.mark.parametrize("n_kv", [1, 2])
def test_grouped_query_equals_multi_head_with_shared_kv(attention, n_kv):
    """GQA (Ainslie et al. 2023): query head h reads kv head h // (H / K). A K-head model equals a
    multi-head model whose key/value projections repeat each kv head for its group of queries."""
    gqa = make_model("attention", {"kind": attention, "n_kv_heads": n_kv}, seed=7)
    mha = make_model("attention", {"kind": attention}, seed=8)
    H, D, C = gqa.config.n_head, gqa.config.head_dim, gqa.config.n_embd
    G = H // n_kv
    state = dict(gqa.state_dict())
    for i, block in enumerate(gqa.blocks):
        pre = f"blocks.{i}.attn."
        if attention == "causal":
            for part in ("weight", "bias"):
                w = state[pre + f"c_attn.{part}"]
                q, k, v = w.split([C, n_kv * D, n_kv * D])
                if part == "weight":
                    k, v = _expand_kv(k, n_kv, G, D), _expand_kv(v, n_kv, G, D)
                else:
                    k, v = (_expand_kv(b[:, None], n_kv, G, D)[:, 0] for b in (k, v))
                state[pre + f"c_attn.{part}"] = torch.cat([q, k, v])
        else:
            for name in ("key", "value"):
                state[pre + f"{name}.weight"] = _expand_kv(state[pre + f"{name}.weight"], n_kv, G, D)
                state[pre + f"{name}.bias"] = _expand_kv(state[pre + f"{name}.bias"][:, None], n_kv, G, D)[:, 0]
    mha.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        (a, pa), (b, pb) = gqa(ids), mha(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert pa[0][0].shape == (2, n_kv, 9, D) and pb[0][0].shape == (2, H, 9, D)


@pytest.mark.parametrize("positional", ["learned", "alibi", "rope"])
def test_einsum_attention_equals_causal(positional):
    """The einsum attention is the same function as the SDPA one given the same weights."""
    causal = make_model("attention", {"kind": "causal", "window": 4}, positional={"kind": positional}, seed=9)
    einsum = make_model("attention", {"kind": "einsum", "window": 4}, positional={"kind": positional}, seed=10)
    state = dict(causal.state_dict())
    for i in range(causal.config.n_layer):
        pre = f"blocks.{i}.attn."
        for part in ("weight", "bias"):
            q, k, v = state.pop(pre + f"c_attn.{part}").chunk(3)
            state |= {pre + f"query.{part}": q, pre + f"key.{part}": k, pre + f"value.{part}": v}
    einsum.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(einsum(ids)[0], causal(ids)[0], atol=1e-5, rtol=1e-4)


def test_invalid_options_are_refused_with_their_key():
    from gptx.errors import ConfigError

    cases = [
        ({"attention": {"kind": "causal", "n_kv_heads": 3}}, "model.attention.n_kv_heads"),
        ({"attention": {"kind": "einsum", "n_kv_heads": 0}}, "model.attention.n_kv_heads"),
        ({"attention": {"kind": "causal", "window": 0}}, "model.attention.window"),
        ({"positional": {"kind": "rope", "base": 1}}, "model.positional.base"),
        ({"positional": {"kind": "sinusoidal", "scale": 0}}, "model.positional.scale"),
        ({"ffn": {"kind": "swiglu", "hidden": 0}}, "model.ffn.hidden"),
        ({"norm": {"kind": "rmsnorm", "eps": 0}}, "model.norm.eps"),
        ({"block": {"kind": "sequential", "placement": "middle"}}, "model.block.placement"),
        ({"norm": {"kind": "layernorm", "placement": "middle"}}, "model.block.placement"),  # a config of gptx < 0.2
        ({"positional": {"kind": "rope"}, "n_head": 4, "n_embd": 12}, "model.n_embd"),  # odd head size 3
    ]
    for model, key in cases:
        with pytest.raises(ConfigError) as err:
            from_dict({"model": {**TINY, **model}})
        assert err.value.key == key, (model, str(err.value))


@pytest.mark.parametrize(
    "name,choices",
    [
        ("gpt_lite", {"attention": "einsum", "positional": "sinusoidal", "ffn": "relu", "norm": "layernorm",
                      "block": "sequential"}),
        ("modern", {"attention": "causal", "positional": "rope", "ffn": "swiglu", "norm": "rmsnorm",
                    "block": "sequential"}),
    ],
)
def test_experiment_files_make_the_choices_they_describe(name, choices):
    from gptx.config import load_experiment

    cfg = load_experiment(ROOT / "experiments" / f"{name}.toml")
    for slot, kind in choices.items():
        assert getattr(cfg.model, slot).name == kind, slot
    assert cfg.model.block.options.placement == {"gpt_lite": "post", "modern": "pre"}[name]
    assert cfg.tokenizer.name == "char"
    assert Path(cfg.data.options.path) == (ROOT / "experiments" / "data" / "tinyshakespeare.txt").resolve()
    if name == "modern":
        assert 1 < cfg.model.attention.options.n_kv_heads < cfg.model.n_head  # grouped-query, not MHA or MQA


def test_mixture_of_experts_routes_top_k_and_balances_the_load():
    """Switch/GShard: each token's output mixes its top-k experts by renormalised router
    probabilities; the load-balancing loss is E * sum_i f_i * P_i; the export's dense form (every
    expert, weighted) equals the training dispatch; flops count the active experts only."""
    cfg = make_config("ffn", {"kind": "moe", "n_experts": 4, "top_k": 2, "hidden": 16})
    torch.manual_seed(0)
    moe = cfg.ffn.cls(cfg, cfg.ffn.options).train()
    x = torch.randn(2, 5, cfg.n_embd)
    out = moe(x)
    y, aux = out.y, out.aux
    flat = x.reshape(10, -1)
    probs = moe.router(flat).softmax(-1)  # [10, 4]
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack([sum(w[n, j] * moe.expert(int(idx[n, j]), flat[n:n + 1])[0] for j in range(2)) for n in range(10)])
    torch.testing.assert_close(y.reshape(10, -1), want, atol=1e-6, rtol=1e-5)
    f = torch.bincount(idx.reshape(-1), minlength=4).float() / idx.numel()
    value, weight = aux.losses["load_balance"]
    assert value.item() == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-6) and weight == 0.01
    assert [aux.metrics[f"expert_load.{e}"].item() for e in range(4)] == pytest.approx(f.tolist())
    torch.testing.assert_close(moe.dense(flat, *moe.route(flat)[2:]), moe.dispatch(flat, *moe.route(flat)[2:]))
    model = GPT(make_config("ffn", {"kind": "moe", "n_experts": 4, "top_k": 2, "hidden": 16}))
    per_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    assert model.num_params() - model.active_params() == TINY["n_layer"] * 2 * per_expert


def test_latent_attention_caches_a_latent_much_smaller_than_keys_and_values():
    """DeepSeek-V2's MLA: the cache is a [B, S, kv_rank] latent (+ a [B, S, head_dim] rotated key
    under RoPE), not keys and values [B, H, S, D] x 2."""
    causal = make_model(n_embd=64, n_head=4)
    latent = make_model("attention", {"kind": "latent", "kv_rank": 16}, n_embd=64, n_head=4)
    rope = make_model("attention", {"kind": "latent", "kv_rank": 16}, n_embd=64, n_head=4, positional={"kind": "rope"})
    per_token = lambda m: sum(math.prod(d for d in t.dims if isinstance(d, int)) for t in m.cache_layouts()[0])  # noqa: E731
    assert per_token(causal) == 2 * 64 and per_token(latent) == 16 and per_token(rope) == 16 + 16
    with pytest.raises(Exception, match="rope_dim"):
        make_config("attention", {"kind": "latent", "rope_dim": 4}, positional={"kind": "rope"})  # head size 8


def test_qk_norm_gives_queries_and_keys_unit_rms_per_head():
    model = make_model("attention", {"kind": "causal", "qk_norm": True})
    attn = model.blocks[0].attn
    q = torch.randn(2, 4, 5, 8) * 7
    k = torch.randn(2, 4, 5, 8) * 0.1
    qn, kn = attn._qk_normed(q, k)
    assert qn.pow(2).mean(-1).sqrt().sub(1).abs().max() < 1e-3 and kn.pow(2).mean(-1).sqrt().sub(1).abs().max() < 1e-3
