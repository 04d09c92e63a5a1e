"""The whole menu: every registered component, in every slot, paired with the defaults elsewhere.

The cases come from the plugin registry, so a component that an installed plugin registers is
tested here too, with no change to this file: install your plugin and run
``pytest tests/test_menu.py`` (``-k <name>`` to pick yours).

For each component: a forward pass with the documented shapes, cached decoding that matches the
uncached forward (empty past, chunked prefill, one token at a time, left padding), and a short
training run on real text whose loss goes down clearly. Below the menu, checks of the
alternatives against their papers (RoPE, ALiBi, sinusoidal, SwiGLU, sandwich norm, sliding
window, grouped-query attention).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gptx import registry as registry_mod
from gptx.base import KV_CACHE
from gptx.config import COMPONENT_SLOTS, from_dict
from gptx.errors import GptxError
from gptx.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = [ROOT / "experiments" / "data" / "tinyshakespeare.txt", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"]

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64}
B, T = 2, 20  # forward / decoding checks
TRAIN_B, TRAIN_T, TRAIN_STEPS = 8, 32, 30


def _text() -> str:
    for path in TEXT_FILES:
        if path.is_file():
            return path.read_text(encoding="utf-8")[:20_000]
    pytest.skip("tiny Shakespeare not found")  # pragma: no cover


def _menu() -> list:
    """(slot, table) for every registered component of every model slot, plus the option variants
    of the built-in attention and every norm placement (with the default norm)."""
    reg = registry_mod.registry()
    cases = []
    for slot, (kind, _default) in COMPONENT_SLOTS.items():
        for name in reg.names(kind):
            cases.append(pytest.param(slot, {"kind": name}, id=f"{slot}={name}"))
    for placement in reg.names("norm_placement"):
        cases.append(pytest.param("norm", {"kind": "layernorm", "placement": placement}, id=f"norm.placement={placement}"))
    for attention in ("causal", "einsum"):
        for extra in ({"n_kv_heads": 1}, {"n_kv_heads": 2}, {"window": 5}, {"n_kv_heads": 2, "window": 3}):
            label = ",".join(f"{k}={v}" for k, v in extra.items())
            cases.append(pytest.param("attention", {"kind": attention, **extra}, id=f"attention={attention},{label}"))
    return cases


MENU = _menu()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and leaves the other core to a second
    xdist worker (two threads per worker on a shared 2-core machine ran 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(slot: str | None = None, table: dict | None = None, vocab_size: int = 256, **model):
    raw_model = {**TINY, "vocab_size": vocab_size, **model}
    if slot is not None:
        raw_model[slot] = table
    return from_dict({"model": raw_model, "tokenizer": {"kind": "byte"}}).model


def make_model(slot=None, table=None, seed=0, **model):
    torch.manual_seed(seed)
    return build_model(make_config(slot, table, **model)).eval()


def _entry(slot, table):
    kind = COMPONENT_SLOTS[slot][0]
    return registry_mod.registry().get(kind, table["kind"])


# ---- the menu ---------------------------------------------------------------------------------

@pytest.mark.parametrize("slot,table", MENU)
def test_forward_shapes(slot, table):
    model = make_model(slot, table)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    logits, presents = model(ids)
    assert logits.shape == (B, T, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(presents) == cfg.n_layer
    K = model.kv_heads
    assert K == (table.get("n_kv_heads") or cfg.n_head)
    for k, v in presents:
        assert k.shape == v.shape == (B, K, T, cfg.head_dim)


@pytest.mark.parametrize("slot,table", MENU)
def test_cached_decoding_matches_uncached(slot, table):
    entry = _entry(slot, table)
    if KV_CACHE not in entry.supports:
        pytest.skip(f"{slot} '{table['kind']}' does not declare {KV_CACHE}")
    model = make_model(slot, table, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        full, _ = model(ids)

        def decode(chunks):
            past, out = model.empty_cache(B), []
            for a, b in chunks:
                logits, past = model(ids[:, a:b], past_key_values=past)
                out.append(logits)
            assert past[0][0].shape[2] == T
            return torch.cat(out, dim=1)

        at_once = decode([(0, T)])  # an empty (zero-length) past
        chunked = decode([(0, 7), (7, 8), (8, 13), (13, T)])  # chunked prefill, including a 1-token chunk
        stepwise = decode([(0, 5)] + [(t, t + 1) for t in range(5, T)])  # prefill, then 1-token steps
    for got in (at_once, chunked, stepwise):
        torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slot,table", MENU)
def test_left_padding_matches_unpadded(slot, table):
    """A left-padded batch (attention_mask, position ids from the mask) gives each real token the
    logits it gets alone, prefill and then cached steps: masks come from slots, not sizes."""
    entry = _entry(slot, table)
    if KV_CACHE not in entry.supports:
        pytest.skip(f"{slot} '{table['kind']}' does not declare {KV_CACHE}")
    model = make_model(slot, table, seed=2)
    V, pad, steps = model.config.vocab_size, 4, 3
    long = torch.randint(0, V, (1, 12 + steps))
    short = torch.randint(0, V, (1, 12 - pad + steps))
    with torch.no_grad():
        alone = [model(long)[0], model(short)[0]]
        ids = torch.cat([long[:, :12], torch.cat([torch.zeros(1, pad, dtype=torch.long), short[:, : 12 - pad]], 1)])
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :pad] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits, past = model(ids, pos, mask, model.empty_cache(2))
        got = [logits[0], logits[1, pad:]]
        for s in range(steps):
            nxt = torch.stack([long[0, 12 + s], short[0, 12 - pad + s]])[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            step, past = model(nxt, pos, mask, past)
            got = [torch.cat([got[0], step[0]]), torch.cat([got[1], step[1]])]
    torch.testing.assert_close(got[0], alone[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], alone[1][0], atol=2e-5, rtol=1e-4)


def train(model, ids: torch.Tensor, steps: int = TRAIN_STEPS, lr: float = 1e-2) -> list[float]:
    """AdamW on one fixed batch; returns the loss at every step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def text_batch(tokenizer, b=TRAIN_B, t=TRAIN_T) -> torch.Tensor:
    ids = torch.tensor(tokenizer.encode(_text()[: 40 * b * t]))
    starts = torch.arange(b) * (len(ids) // b)
    return torch.stack([ids[s : s + t + 1] for s in starts])  # [b, t + 1]


@pytest.fixture(scope="module")
def byte_batch():
    return text_batch(registry_mod.registry().get("tokenizer", "byte").cls(None))


def assert_learns(losses: list[float]):
    first, last = losses[0], min(losses[-3:])
    assert all(math.isfinite(x) for x in losses), losses
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}: not clearly down ({[round(x, 2) for x in losses]})"


@pytest.mark.parametrize("slot,table", MENU)
def test_short_training_run_learns(slot, table, byte_batch):
    model = make_model(slot, table, seed=3)
    assert_learns(train(model, byte_batch))


# ---- tokenizers -------------------------------------------------------------------------------

TOKENIZERS = [pytest.param(name, id=f"tokenizer={name}") for name in registry_mod.registry().names("tokenizer")]


def build_tokenizer(name: str, options: dict | None = None):
    spec = from_dict({"tokenizer": {"kind": name, **(options or {})}}).tokenizer
    try:
        tok = spec.cls(spec.options, None)
    except GptxError as err:  # e.g. a tiktoken encoding whose files cannot be fetched offline
        pytest.skip(f"tokenizer '{name}' cannot be built here: {err}")
    if tok.requires_fit:
        assert tok.state() == {}, "a tokenizer that learns from data must have an empty state() until fitted"
        tok.fit(_text())
        assert tok.state(), "a fitted tokenizer's state() must hold its vocabulary"
    return tok


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_round_trip_and_training(name):
    tok = build_tokenizer(name)
    text = _text()[:2000].rsplit("\n", 1)[0] + "\n"  # whole lines: a learned vocabulary may be word-level
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.eot_id is None or 0 <= tok.eot_id < tok.vocab_size
    state = tok.state()
    again = type(tok)(tok.options, state)  # the checkpoint path: options + state rebuild it
    assert again.encode(text) == ids
    # a tiny model on this vocabulary trains (fewer, shorter sequences: vocabularies can be 50k+)
    torch.manual_seed(4)
    model = build_model(make_config(vocab_size=tok.vocab_size, n_layer=1))
    assert_learns(train(model, text_batch(tok, b=4, t=16), steps=20, lr=2e-2))


def test_tiktoken_by_name_offline_or_clear_error():
    """``tiktoken`` with ``encoding = "gpt2"`` works offline from the shipped files; another
    encoding either loads (files cached or network) or fails naming TIKTOKEN_CACHE_DIR."""
    gpt2 = build_tokenizer("tiktoken", {"encoding": "gpt2"})
    assert gpt2.vocab_size == 50257 and gpt2.encode("Hello world") == [15496, 995]
    spec = from_dict({"tokenizer": {"kind": "tiktoken", "encoding": "cl100k_base"}}).tokenizer
    try:
        tok = spec.cls(spec.options, None)
    except GptxError as err:
        assert "TIKTOKEN_CACHE_DIR" in str(err) and "cl100k_base" in str(err)
    else:
        assert tok.decode(tok.encode("Hello world")) == "Hello world"


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
        ({"norm": {"kind": "layernorm", "placement": "middle"}}, "model.norm.placement"),
        ({"positional": {"kind": "rope"}, "n_head": 4, "n_embd": 12}, "model.n_embd"),  # odd head size 3
    ]
    for model, key in cases:
        with pytest.raises(ConfigError) as err:
            from_dict({"model": {**TINY, **model}})
        assert err.value.key == key, (model, str(err.value))


@pytest.mark.parametrize(
    "name,choices",
    [
        ("gpt_lite", {"attention": ("einsum", None), "positional": ("sinusoidal", None), "ffn": ("relu", None),
                      "norm": ("layernorm", "post")}),
        ("modern", {"attention": ("causal", None), "positional": ("rope", None), "ffn": ("swiglu", None),
                    "norm": ("rmsnorm", "pre")}),
    ],
)
def test_experiment_files_make_the_choices_they_describe(name, choices):
    from gptx.config import load_experiment

    cfg = load_experiment(ROOT / "experiments" / f"{name}.toml")
    for slot, (kind, placement) in choices.items():
        spec = getattr(cfg.model, slot)
        assert (spec.kind, spec.placement) == (kind, placement), slot
    assert cfg.tokenizer.kind == "char"
    assert cfg.data_path == (ROOT / "experiments" / "data" / "tinyshakespeare.txt").resolve()
    if name == "modern":
        assert 1 < cfg.model.attention.options.n_kv_heads < cfg.model.n_head  # grouped-query, not MHA or MQA
