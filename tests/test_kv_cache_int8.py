"""The causal attention's int8 KV cache (``kv_cache = "int8"``): per-token absmax codes and scales,
declared as int8 and float32 cache tensors and honoured by PyTorch decoding, the ONNX export and its
verification, and the onnxruntime generator (Node and the browser: tests/test_node_genai.py,
tests/test_web_browser.py)."""
import json

import numpy as np
import pytest
import torch
from helpers import gptx, tiny_model, wandering_export, write_experiment

from gptx.components import kv_layout
from gptx.export.runtime import OnnxGenerator
from gptx.generate import generate_ids
from gptx.plugins.attention import dequantize, quantize_per_token, with_kv_cache
from gptx.sampling import Sampler

INT8 = {"kind": "causal", "kv_cache": "int8"}
# Cached int8 logits against the uncached (exact) ones: within 2% of the logits' largest magnitude,
# the bound gptx check-plugin holds a quantised cache to (gptx.conformance.QUANTIZED_CACHE_RTOL)
RTOL = 2e-2


def test_codes_and_scales_round_trip_to_half_a_step():
    x = torch.randn(2, 3, 5, 16) * 3  # [B, K, T, D]
    x[0, 0, 0] = 0  # an all-zero vector: scale clamped, codes 0, no NaN
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 5, 1) and int(codes.abs().max()) == 127
    err = (dequantize(codes, scale, torch.float32) - x).abs()  # [B, K, T, D]
    assert bool((err <= scale / 2 + 1e-6).all())  # rounding: at most half a step per element
    assert not codes[0, 0, 0].any() and torch.isfinite(scale).all()


def test_training_and_prefill_are_unchanged_and_cached_steps_stay_close():
    model, _, _ = tiny_model("byte", seed=3, n_layer=2, n_head=4, n_embd=64, block_size=96)
    model.eval()
    int8 = with_kv_cache(model, "int8")
    assert [t.dtype for t in int8.empty_cache(1)[0]] == [torch.int8, torch.int8, torch.float32, torch.float32]
    assert model.cache_layouts()[0] == kv_layout(4, 16)  # the default stays GPT-2's (what genai reads)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids[:, :-1], targets=ids[:, 1:]).loss, int8(ids[:, :-1], targets=ids[:, 1:]).loss)
        full = model(ids)[0]  # [B, 40, V]
        # a prefill attends over its own exact keys and values: bit for bit the float cache's
        assert torch.equal(int8(ids, past_key_values=int8.empty_cache(2))[0], model(ids, past_key_values=model.empty_cache(2))[0])
        past, steps = int8.empty_cache(2, capacity=40), []
        for t in range(40):
            logits, past = int8(ids[:, t:t + 1], past_key_values=past)  # [B, 1, V]
            steps.append(logits)
    assert [t.dtype for t in past[0]] == [torch.int8, torch.int8, torch.float32, torch.float32]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert 0 < diff <= RTOL * full.abs().max().item()


def test_cache_bytes_per_token():
    model, _, _ = tiny_model("byte", n_layer=3, n_head=4, n_embd=64)
    K, D, L = 4, 16, 3
    assert model.cache_bytes_per_token() == L * 2 * K * D * 4  # fp32 keys and values
    assert with_kv_cache(model, "int8").cache_bytes_per_token() == L * (2 * K * D + 2 * K * 4)  # codes + fp32 scales
    assert with_kv_cache(model, "int8").cache_bytes_per_token(torch.float16) == L * (2 * K * D + 2 * K * 2)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    lines = []
    out = wandering_export(tmp_path_factory.mktemp("int8"), "byte", seed=7, attention=INT8, log=lines.append)
    return out, lines


def test_export_declares_int8_pasts_and_verifies(int8_export):
    out, lines = int8_export
    meta = json.loads((out / "gptx_export.json").read_text())
    assert [(c["name"], c["dtype"]) for c in meta["cache"]] == [
        ("key", "int8"), ("value", "int8"), ("key_scale", "float32"), ("value_scale", "float32")]
    assert meta["cache"][2]["dims"] == ["batch_size", 4, "past_sequence_length", 1]
    gen = OnnxGenerator(out)
    types = {i.name: i.type for i in gen.session.get_inputs()}
    assert types["past_key_values.1.key"] == "tensor(int8)" and types["past_key_values.1.key_scale"] == "tensor(float)"
    assert {o.type for o in gen.session.get_outputs() if o.name.endswith(".value")} == {"tensor(int8)"}
    v = meta["verification"]
    assert v["max_abs_diff"] <= 1e-4 and v["max_code_diff"] <= v["code_tolerance"] == 1
    assert "GroupQueryAttention" not in meta["fusions"]  # onnxruntime's fused op keeps a float cache
    assert any(line.startswith("plain attention: CausalSelfAttention") for line in lines)
    # onnxruntime-genai reads float32 key/value pasts only: no genai_config.json, said in one line
    assert "genai_config.json" not in meta["files"] and not (out / "genai_config.json").exists()
    assert any(line.startswith("no genai_config.json") and "key int8" in line for line in lines)


def test_onnxruntime_generates_pytorchs_int8_greedy_ids(int8_export):
    """A left-padded batch, then prompts past the 96-token context (the window recomputed)."""
    from gptx import checkpoint

    out, _ = int8_export
    model = checkpoint.load(out.parent / "run").model.eval()
    gen = OnnxGenerator(out)
    for prompts, n in (([list(b"To be, or not to be"), list(b"Ay"), list(b"x")], 24), ([list(b"The quick brown fox jumps over the lazy dog. " * 2)], 30)):
        want = generate_ids(model, prompts, n, Sampler(temperature=0)).ids
        assert len({t for ids in want for t in ids}) > 5, "the model repeats itself: a weak comparison"
        assert gen.generate(prompts, n, Sampler(temperature=0)).ids == want


def test_eval_reads_an_int8_export_and_refuses_to_recache_it(int8_export, tmp_path):
    out, _ = int8_export
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 4, encoding="utf-8")
    r = gptx("eval", out, "--data", text, "--json")  # an empty past of the declared dtypes
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] > 100, r.stderr
    r = gptx("eval", out, "--data", text, "--kv-cache", "int8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--kv-cache" in r.stderr, r.stderr


def test_a_bad_kv_cache_value_is_one_line(tmp_path):
    exp = write_experiment(tmp_path / "e.toml")
    r = gptx("validate", exp, "--set", "model.attention.kv_cache=int4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.attention.kv_cache" in r.stderr and "'float', 'int8'" in r.stderr and "Traceback" not in r.stderr
    r = gptx("validate", exp, "--set", "model.attention.kind=einsum", "--set", "model.attention.kv_cache=int8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "kv_cache" in r.stderr, r.stderr


def test_check_plugin_passes_the_int8_cache():
    r = gptx("check-plugin", "causal", "--set", "model.attention.kv_cache=int8", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    results = {row["check"]: row for row in json.loads(r.stdout)["results"]}
    assert all(row["status"] == "pass" for row in results.values()), results
    assert "quantised cache key, value" in results["cached decoding"]["detail"]


def test_eval_scores_through_the_int8_cache(tmp_path):
    """gptx eval --kv-cache: token by token through the cache; float equals the uncached loss."""
    from helpers import SHAKESPEARE, tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "run", "byte", seed=2, n_layer=2, n_head=2, n_embd=32, block_size=64)
    text = tmp_path / "held.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:600], encoding="utf-8")
    runs = {}
    for flag in (None, "float", "int8"):
        r = gptx("eval", ck, "--data", text, "--json", *(["--kv-cache", flag] if flag else []))
        assert r.returncode == 0, r.stderr
        runs[flag] = json.loads(r.stdout)["loss"]
    assert runs["float"] == pytest.approx(runs[None], abs=1e-5)
    assert runs["int8"] == pytest.approx(runs[None], rel=1e-2)
    r = gptx("eval", ck, "--data", text, "--kv-cache", "int4")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_quantised_codes_are_compared_to_within_one():
    """Verification reads integer cache tensors as codes: a difference of one (a rounding tie
    broken the other way by float noise) passes, two fail."""
    from gptx.export.verify import CODE_TOLERANCE, _real_rows_max_abs_diff

    a = np.zeros((1, 2, 3, 4), dtype=np.int8)
    b = a.copy()
    b[0, 1, 2, 3] = 1
    mask = np.ones((1, 3), dtype=np.int64)
    assert _real_rows_max_abs_diff(a, b, mask, 2) == CODE_TOLERANCE
