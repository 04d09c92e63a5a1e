"""``gptx export``: the graph's I/O contract, verification, metadata, tokenizer.json, the fused
attention and its fallback, int8 and int4, the OUT_DIR rules, and greedy tokens from onnxruntime equal to PyTorch's for every exportable
component (one slot varied at a time, defaults elsewhere). Real torch.onnx exports and real
onnxruntime sessions throughout; tiny models so each export takes seconds."""
import contextlib
import json
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from helpers import tiny_checkpoint

from gptx import checkpoint
from gptx import registry as registry_mod
from gptx.base import KV_CACHE, ONNX_EXPORT
from gptx.cli import cli
from gptx.errors import GptxError
from gptx.export import IO_CONTRACT, IO_CONTRACT_VERSION, input_names, output_names
from gptx.export.onnx_export import export_checkpoint
from gptx.export.runtime import OnnxGenerator, make_session
from gptx.kinds import BY_NAME, KINDS
from gptx.generate import generate_ids
from gptx.sampling import Sampler

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64}


def make_checkpoint(run_dir, model=None, tokenizer="byte", seed=0, tokenizer_state=None):
    """Save a randomly initialised tiny model; returns the checkpoint directory."""
    return tiny_checkpoint(run_dir, tokenizer, tokenizer_state, seed, **(SMALL | (model or {})))


def quiet(_msg):
    pass


def greedy_both(ck_dir, out_dir, prompts, new_tokens=8):
    ck = checkpoint.load(ck_dir)
    want = generate_ids(ck.model, prompts, new_tokens, Sampler(temperature=0), ck.tokenizer.eot_id).ids
    got = OnnxGenerator(out_dir).generate(prompts, new_tokens, Sampler(temperature=0)).ids
    return want, got


# ---- every exportable component, one slot varied at a time ----------------------------------

def component_matrix():
    """(id, model overrides): the defaults, then each other registered component of each slot
    (and each norm placement) that declares ONNX_EXPORT, with defaults elsewhere."""
    reg = registry_mod.registry()
    combos = []  # the defaults (GPT-2) are covered by the gpt2 fixture below, with the real vocabulary
    for kind in (k for k in KINDS if k.path[:1] == ("model",)):
        slot = kind.path[1]
        for name in reg.names(kind.name):
            if name != kind.default and ONNX_EXPORT in reg.get(kind.name, name).supports:
                combos.append((f"{slot}={name}", {slot: {"kind": name}}))
    for name in reg.names("norm_placement"):
        if name != BY_NAME["norm_placement"].default and ONNX_EXPORT in reg.get("norm_placement", name).supports:
            combos.append((f"placement={name}", {"block": {"placement": name}}))
    # grouped-query attention and a sliding window ride along on the attention variants
    combos.append(("attention=causal(gqa,window)", {"attention": {"kind": "causal", "n_kv_heads": 2, "window": 6}}))
    # multi-head latent attention under RoPE caches a latent and a rotated key: two declared tensors
    combos.append(("attention=latent(rope)", {"attention": {"kind": "latent", "kv_rank": 8}, "positional": {"kind": "rope"}}))
    return combos


MATRIX = component_matrix()


@pytest.mark.parametrize("overrides", [m[1] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_onnx_greedy_tokens_equal_pytorch_for_every_component(tmp_path, overrides):
    ck = make_checkpoint(tmp_path / "run", overrides, seed=1)
    meta = export_checkpoint(ck, tmp_path / "out", log=quiet)
    assert meta["verification"]["max_abs_diff"] <= 1e-4
    # a graph whose every layer is GroupQueryAttention also decodes into a shared, preallocated cache
    shared = meta["fusions"].get("GroupQueryAttention") == meta["model"]["n_layer"]
    assert meta["io_contract"]["past_present_share_buffer"] is shared
    assert set(meta["verification"]["cases"]) == {"empty-past", "1-token", "chunked", "left-padded"} | ({"shared-buffer"} if shared else set())
    prompts = [list(b"To be, or not"), list(b"Ay")]  # different lengths: a left-padded batch
    want, got = greedy_both(ck, tmp_path / "out", prompts, new_tokens=10)
    assert got == want


def test_matrix_covers_every_builtin_component():
    ids = {m[0] for m in MATRIX}
    assert len(ids) == len(MATRIX)
    for expected in ("attention=einsum", "positional=rope", "positional=alibi", "positional=sinusoidal",
                     "positional=none", "ffn=swiglu", "ffn=geglu", "ffn=relu", "norm=rmsnorm",
                     "block=parallel", "placement=post", "placement=sandwich"):
        assert expected in ids


# ---- a GPT-2-vocabulary export, shared by the contract tests ------------------------------------

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    ck = make_checkpoint(root / "run", {"n_embd": 64, "block_size": 128}, tokenizer="gpt2", seed=2)
    logs = []
    meta = export_checkpoint(ck, root / "out", log=logs.append)
    return {"ck": ck, "out": root / "out", "meta": meta, "logs": logs}


def test_export_directory_holds_the_promised_files(gpt2):
    names = sorted(p.name for p in gpt2["out"].iterdir())
    assert names == ["genai_config.json", "gptx_export.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in gpt2["out"].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_graph_io_names_shapes_and_dynamic_dims(gpt2):
    model = onnx.load(str(gpt2["out"] / "model.onnx"))
    L = 2

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ins = {i.name: dims(i) for i in model.graph.input}
    outs = {o.name: dims(o) for o in model.graph.output}
    assert list(ins) == input_names(L) and list(outs) == output_names(L)
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 16]
    assert outs["logits"] == ["batch_size", "sequence_length", 50257]
    assert outs["present.1.value"] == ["batch_size", 4, "total_sequence_length", 16]
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["input_ids"] == types["attention_mask"] == types["position_ids"] == onnx.TensorProto.INT64


def test_tied_embedding_is_stored_once(gpt2):
    model = onnx.load(str(gpt2["out"] / "model.onnx"))
    big = [t for t in model.graph.initializer if np.prod(t.dims) == 50257 * 64]
    assert len(big) == 1
    params = checkpoint.load(gpt2["ck"]).model.num_params()
    stored = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert stored < params * 1.05  # a second 50257 x 64 copy would add ~80%


def test_one_graph_runs_empty_past_steps_and_batches(gpt2):
    sess = make_session(gpt2["out"] / "model.onnx")
    for B, T, P in [(1, 1, 0), (3, 7, 0), (2, 1, 9), (1, 4, 5)]:
        feeds = {"input_ids": np.zeros((B, T), np.int64), "attention_mask": np.ones((B, P + T), np.int64),
                 "position_ids": np.tile(np.arange(P, P + T), (B, 1))}
        for i in range(2):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((B, 4, P, 16), np.float32)
        logits, *presents = sess.run(None, feeds)
        assert logits.shape == (B, T, 50257)
        assert presents[0].shape == (B, 4, P + T, 16)


def test_metadata_in_json_and_in_onnx_metadata_props(gpt2):
    meta = json.loads((gpt2["out"] / "gptx_export.json").read_text())
    assert meta["io_contract"]["name"] == IO_CONTRACT and meta["io_contract"]["version"] == IO_CONTRACT_VERSION
    assert meta["config"]["model"]["n_embd"] == 64 and meta["config"]["model"]["positional"]["kind"] == "learned"
    assert meta["tokenizer"]["kind"] == "gpt2" and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["special_tokens"]["eot"] == {"id": 50256, "text": "<|endoftext|>"}
    assert meta["verification"]["max_abs_diff"] <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(gpt2["out"] / "model.onnx"), load_external_data=False).metadata_props}
    assert props["gptx.io_contract"] == f"{IO_CONTRACT}/{IO_CONTRACT_VERSION}"
    embedded = json.loads(props["gptx.metadata"])
    assert embedded["config"] == meta["config"] and embedded["tokenizer"] == meta["tokenizer"]


def test_export_prints_the_verification_max_diff(gpt2):
    line = next(x for x in gpt2["logs"] if x.startswith("verified against PyTorch"))
    assert "max abs diff" in line and "chunked" in line and "left-padded" in line


def test_genai_config_describes_a_decoder(gpt2):
    g = json.loads((gpt2["out"] / "genai_config.json").read_text())
    m = g["model"]
    assert m["type"] == "decoder" and m["eos_token_id"] == 50256 and m["vocab_size"] == 50257
    d = m["decoder"]
    assert d["filename"] == "model.onnx" and d["num_hidden_layers"] == 2 and d["num_key_value_heads"] == 4
    assert d["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert d["outputs"]["present_value_names"] == "present.%d.value"
    # gptx's own session settings: a thread per physical core (genai's default takes half the logical
    # CPUs: one of two cores without SMT) and no spinning (the search between runs needs the CPU)
    so = d["session_options"]
    assert so["intra_op_num_threads"] == 0 and so["session.intra_op.allow_spinning"] == "0"
    assert so["session.inter_op.allow_spinning"] == "0"


def test_tokenizer_json_encodes_like_tiktoken(gpt2):
    import tokenizers  # comes with transformers, a test dependency
    from gptx.plugins.tokenizers import gpt2_encoding

    hf = tokenizers.Tokenizer.from_file(str(gpt2["out"] / "tokenizer.json"))
    enc = gpt2_encoding()
    texts = [
        "Hello world", "  leading and trailing  ", "it's they're we'll I'd", "numbers 12345 and 3.14159",
        "tabs\tand\nnew\n\nlines\r\n", "Ünïcödé — 日本語 🎉 emoji", "<|endoftext|>after the end", "a" * 300,
        (gpt2["out"] / "gptx_export.json").read_text(),
    ]
    for text in texts:
        ids = hf.encode(text).ids
        assert ids == enc.encode(text, allowed_special="all"), text
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_greedy_tokens_equal_pytorch_with_gpt2_vocab(gpt2):
    tok = checkpoint.load(gpt2["ck"]).tokenizer
    prompts = [tok.encode("The quick brown fox"), tok.encode("Hi")]
    want, got = greedy_both(gpt2["ck"], gpt2["out"], prompts, new_tokens=12)
    assert got == want


# ---- int8 ------------------------------------------------------------------------------------------

def test_int8_quantizes_the_head_and_reports_agreement(tmp_path, gpt2):
    logs = []
    meta = export_checkpoint(gpt2["ck"], tmp_path / "q", quantize="int8", log=logs.append)
    q = meta["quantization_report"]
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # every weight matmul (2 layers x 4, and the LM head) runs on int8; none is left in fp32
    assert q["quantized_matmuls"] == 9 and q["fp32_matmuls_left"] == ops.count("MatMul")
    consts = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
                and any(np.prod(t.dims) == 50257 * 64 for t in model.graph.initializer if t.name == n.input[0])
                and not n.output[0].endswith("_output_quantized")]  # no whole-matrix dequantize per step
    assert (tmp_path / "q" / "model.onnx").stat().st_size < 0.6 * (gpt2["out"] / "model.onnx").stat().st_size
    assert q["prompt_logits_max_abs_diff"] < 0.1 * max(q["prompt_logits_max_abs"], 1.0)
    assert q["greedy_tokens_compared"] > 0 and q["int8_tokens_per_s"] > 0 and q["fp32_tokens_per_s"] > 0
    assert len(q["greedy_tokens_identical_prefix"]) == 3
    assert any(line.startswith("int8:") and "tokens/s" in line for line in logs)
    assert json.loads((tmp_path / "q" / "gptx_export.json").read_text())["quantization"] == "int8"
    # and it still generates through the same runtime
    tok = checkpoint.load(gpt2["ck"]).tokenizer
    out = OnnxGenerator(tmp_path / "q").generate([tok.encode("Hello")], 5, Sampler(temperature=0))
    assert len(out.ids[0]) == 5


def test_int4_block_quantizes_matmuls_and_embeddings_and_reports_agreement(tmp_path, gpt2):
    logs = []
    meta = export_checkpoint(gpt2["ck"], tmp_path / "q", quantize="int4", log=logs.append)
    q = meta["quantization_report"]
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    # every weight matmul (2 layers x 4, and the LM head on its own copy of the tied embedding) is MatMulNBits
    assert ops.count(("com.microsoft", "MatMulNBits")) == q["quantized_matmuls"] == 9
    assert q["fp32_matmuls_left"] == 0 and q["untied_transposes"] == 1
    nbits = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits.attribute}
    # blocks of 128 inputs at most: the fixture's 64-wide layers get one block of 64 per column
    assert attrs["bits"] == 4 and attrs["block_size"] == q["block_size"] == 64 and attrs["accuracy_level"] == 4
    # the token and position tables are gathered from 4-bit blocks: no fp32 table, no whole-table dequantize
    assert ops.count(("com.microsoft", "GatherBlockQuantized")) == 2
    big = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 50257 * 64 // 8]
    assert not big and ("", "DequantizeLinear") not in ops
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 2  # the fused attention stays
    # 4 bits + one fp32 scale per block, the tied matrix stored twice (head and table): ~0.29 here
    assert (tmp_path / "q" / "model.onnx").stat().st_size < 0.33 * (gpt2["out"] / "model.onnx").stat().st_size
    assert q["prompt_logits_max_abs_diff"] < 0.2 * max(q["prompt_logits_max_abs"], 1.0)
    assert len(q["greedy_tokens_identical_prefix"]) == 3  # prompts
    assert all(0 <= n <= q["greedy_tokens_compared"] == 32 for n in q["greedy_tokens_identical_prefix"])
    assert q["int4_tokens_per_s"] > 0 and q["fp32_tokens_per_s"] > 0 and "int4" in q["weights"]
    assert any(line.startswith("int4: 9 matmuls quantized") and "tokens/s" in line for line in logs)
    written = json.loads((tmp_path / "q" / "gptx_export.json").read_text())
    assert written["quantization"] == "int4" and written["quantization_report"] == q
    # it generates through the same runtime, and its first greedy tokens are the fp32 export's
    tok = checkpoint.load(gpt2["ck"]).tokenizer
    prompt = [tok.encode("The quick brown fox")]
    want = OnnxGenerator(gpt2["out"]).generate(prompt, 6, Sampler(temperature=0)).ids[0]
    got = OnnxGenerator(tmp_path / "q").generate(prompt, 6, Sampler(temperature=0)).ids[0]
    assert len(got) == 6 and got[0] == want[0]


# ---- refusals and the OUT_DIR rules --------------------------------------------------------------

def test_component_without_onnx_export_is_refused(tmp_path):
    from gptx.plugins.attention import CausalSelfAttention

    class NoExport(CausalSelfAttention):
        supports = frozenset({KV_CACHE})

    with attention_registered("no-export", NoExport):
        ck = make_checkpoint(tmp_path / "run", {"attention": {"kind": "no-export"}})
        with pytest.raises(GptxError, match=r"model\.attention 'no-export'.*does not support ONNX export"):
            export_checkpoint(ck, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def attention_registered(name, cls):
    """The process-wide registry with one more attention, as a third-party plugin would add it."""
    class Plugin:
        @staticmethod
        @__import__("gptx").hookimpl
        def register_attention(register):
            register(name, cls)

    registry_mod.use(registry_mod.load(extra_plugins=(Plugin,)))
    try:
        yield
    finally:
        registry_mod.use(None)


@pytest.fixture
def byte_ckpt(tmp_path):
    return make_checkpoint(tmp_path / "run")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_export_refuses_a_foreign_dir_and_replaces_a_previous_export(tmp_path, byte_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = invoke("export", byte_ckpt, "-o", out)
    assert r.exit_code == 2 and "not empty and not a previous gptx export" in r.output
    assert (out / "notes.txt").read_text() == "keep me"

    r = invoke("export", byte_ckpt, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert "max abs diff" in r.output and (out / "model.onnx").is_file()
    assert not (out / "notes.txt").exists()
    assert (out / "tokenizer.json").is_file()  # the byte tokenizer describes itself as one (Tokenizer.tokenizer_json)

    (out / "mine.txt").write_text("the user's, not gptx's")
    r = invoke("export", byte_ckpt, "-o", out)  # replacing would delete a file gptx did not write
    assert r.exit_code == 2 and "mine.txt" in r.output
    assert (out / "mine.txt").read_text() == "the user's, not gptx's"
    (out / "mine.txt").unlink()
    r = invoke("export", byte_ckpt, "-o", out)  # a previous gptx export is replaced without --force
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temp dirs left behind


def test_cli_refuses_to_replace_the_checkpoint_it_reads(tmp_path, byte_ckpt):
    r = invoke("export", byte_ckpt, "-o", tmp_path / "run", "--force")
    assert r.exit_code == 2 and "refusing to replace" in r.output
    assert checkpoint.load(byte_ckpt)


def test_failed_verification_exits_2_naming_the_output_and_leaves_nothing(tmp_path, byte_ckpt, monkeypatch):
    from gptx.export import verify

    monkeypatch.setattr(verify, "TOLERANCE", -1.0)  # any difference, even 0, now fails
    r = invoke("export", byte_ckpt, "-o", tmp_path / "out")
    assert r.exit_code == 2
    # one Error line naming the worst case and output; which one is worst is float rounding noise
    error = r.output.strip().splitlines()[-1]
    assert re.fullmatch(r"Error: export verification failed: onnxruntime differs from PyTorch by \S+ \(> -1\) "
                        r"in (empty-past|1-token|chunked|left-padded): (logits|present\.[01]\.[a-z_]+)", error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no OUT_DIR, no temp dir


def test_gpt2_graph_is_fused_for_onnxruntime(gpt2):
    L = 2
    assert gpt2["meta"]["fusions"] == {"SkipLayerNormalization": 2 * L + 1, "FastGelu": L, "GroupQueryAttention": L}
    model = onnx.load(str(gpt2["out"] / "model.onnx"), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "SkipLayerNormalization")) == 2 * L + 1  # + the final norm
    assert ("", "Tanh") not in ops  # the GELU formula is one FastGelu kernel now
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    assert any(x.startswith("fused for onnxruntime: 2 FastGelu, 2 GroupQueryAttention, 5 SkipLayerNormalization")
               for x in gpt2["logs"])


def _cache_concats(model: onnx.ModelProto) -> list:
    """Concat nodes that read a past_key_values input: the plain graph's per-layer cache append."""
    pasts = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    return [n for n in model.graph.node if n.op_type == "Concat" and pasts & set(n.input)]


def test_a_bias_free_model_gets_the_same_fusions_without_a_message(tmp_path):
    """bias = false: no LayerNorm bias for SkipLayerNormalization to read; the fusions still apply."""
    ck = make_checkpoint(tmp_path / "run", model={"bias": False})
    lines = []
    meta = export_checkpoint(ck, tmp_path / "out", log=lines.append)
    L = SMALL["n_layer"]
    assert meta["fusions"] == {"SkipLayerNormalization": 2 * L + 1, "FastGelu": L, "GroupQueryAttention": L}
    assert not any("skipped" in line for line in lines), lines
    want, got = greedy_both(ck, tmp_path / "out", [list(b"To be"), list(b"or not")])
    assert got == want


def test_gpt2_attention_is_onnxruntimes_fused_op_reading_the_cache_itself(gpt2):
    """GPT-2's attention (K == H) exports as GroupQueryAttention with kv_num_heads = num_heads: it
    appends to the cache itself, and into a shared preallocated buffer, which the export declares."""
    model = onnx.load(str(gpt2["out"] / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if (n.domain, n.op_type) == ("com.microsoft", "GroupQueryAttention")]
    assert len(gqa) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs == {"num_heads": 4, "kv_num_heads": 4}
    assert gqa[0].input[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert gqa[1].output[1:] == ["present.1.key", "present.1.value"]
    assert len(gqa[0].input) <= 16  # onnxruntime 1.30's schema (Node, the browser) takes at most 16
    assert not _cache_concats(model)
    assert gpt2["meta"]["io_contract"]["past_present_share_buffer"] is True
    assert "shared-buffer" in gpt2["meta"]["verification"]["cases"]
    genai = json.loads((gpt2["out"] / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    weights = {t.name for t in model.graph.initializer}
    leftover = [(n.op_type, n.input[0] in weights) for n in model.graph.node if n.op_type in ("Softmax", "Where", "Transpose", "Reshape")]
    # no attention arithmetic or head views: the padding mask turned into the additive bias once
    # for all layers, and the tied LM head's transpose
    assert sorted(leftover) == [("Transpose", True), ("Where", False)]
    # the left-padded batch's real rows decode as PyTorch does (test_greedy_tokens_equal_pytorch_with_gpt2_vocab)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_exports_group_query_attention(tmp_path, kv_heads):
    ck = make_checkpoint(tmp_path / "run", {"attention": {"n_kv_heads": kv_heads}, "positional": {"kind": "rope"}}, seed=3)
    meta = export_checkpoint(ck, tmp_path / "out", log=quiet)
    assert meta["fusions"]["GroupQueryAttention"] == 2 and "MultiHeadAttention" not in meta["fusions"]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs == {"num_heads": 4, "kv_num_heads": kv_heads}
    assert not _cache_concats(model)
    assert [d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim[1::2]] == [kv_heads, 8]  # [B, K, P, D]
    prompts = [list(b"To be, or not"), list(b"Ay"), list(b"x")]  # a left-padded batch
    want, got = greedy_both(ck, tmp_path / "out", prompts, new_tokens=10)
    assert got == want


def test_a_head_size_groupqueryattention_refuses_exports_multiheadattention(tmp_path):
    """onnxruntime's GroupQueryAttention needs head_dim % 8 == 0; with 12 (3 heads of a 36-wide
    model) K == H attention exports MultiHeadAttention, which cannot share a preallocated cache."""
    ck = make_checkpoint(tmp_path / "run", {"n_embd": 36, "n_head": 3}, seed=4)
    meta = export_checkpoint(ck, tmp_path / "out", log=quiet)
    assert meta["fusions"]["MultiHeadAttention"] == 2 and "GroupQueryAttention" not in meta["fusions"]
    assert meta["io_contract"]["past_present_share_buffer"] is False
    assert "shared-buffer" not in meta["verification"]["cases"]
    want, got = greedy_both(ck, tmp_path / "out", [list(b"To be, or not"), list(b"Ay")], new_tokens=10)
    assert got == want
    # gptx_export.json altered to claim a shared cache: one clear error, naming the file and the claim
    # the graph (whose own copy of the metadata says otherwise) does not support
    meta["io_contract"]["past_present_share_buffer"] = True
    (tmp_path / "out" / "gptx_export.json").write_text(json.dumps(meta))
    with pytest.raises(GptxError, match=r"gptx_export\.json: io_contract\.past_present_share_buffer: True here, False in the graph"):
        OnnxGenerator(tmp_path / "out").generate([list(b"To be")], 4, Sampler(temperature=0))


def _swap_keys_and_values(monkeypatch):
    """A fused attention that runs but computes the wrong thing: keys and values swapped."""
    from gptx.export import attention as onnx_attention

    real = onnx_attention.fused_attention

    def swapped(q, k, v, past, attention_mask):
        y, (pk, pv) = real(q, v, k, (past[1], past[0]), attention_mask)
        return y, (pv, pk)

    monkeypatch.setattr(onnx_attention, "fused_attention", swapped)
    return "fused attention not kept (export verification failed"


def _wrong_head_count(monkeypatch):
    """A fused attention node that onnxruntime refuses: 3 heads do not divide the 32-wide q/k/v."""
    real = torch.onnx.ops.symbolic_multi_out

    def three_heads(domain_op, inputs, attrs=None, **kwargs):
        return real(domain_op, inputs, {**(attrs or {}), "num_heads": 3}, **kwargs)

    monkeypatch.setattr(torch.onnx.ops, "symbolic_multi_out", three_heads)
    return "fused attention not kept ("


@pytest.mark.parametrize("break_it", [_swap_keys_and_values, _wrong_head_count], ids=["wrong", "refused"])
def test_a_broken_fused_attention_falls_back_to_the_plain_attention(tmp_path, byte_ckpt, monkeypatch, break_it):
    expected = break_it(monkeypatch)
    logs = []
    meta = export_checkpoint(byte_ckpt, tmp_path / "out", log=logs.append)
    fallback = [x for x in logs if "not kept" in x]  # one line, naming the fused attention
    assert len(fallback) == 1 and fallback[0].startswith(expected), logs
    assert fallback[0].endswith("; exporting the plain attention")
    assert not {"MultiHeadAttention", "GroupQueryAttention"} & set(meta["fusions"]) and meta["fusions"]  # the operator fusions remain
    assert meta["io_contract"]["past_present_share_buffer"] is False
    assert meta["verification"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert not [n for n in graph.graph.node if "Attention" in n.op_type]
    torch_ids, onnx_ids = greedy_both(byte_ckpt, tmp_path / "out", [[1, 2, 3], [4]])
    assert onnx_ids == torch_ids


class _FusedBranchBug:
    """An attention that declares ONNX_FUSED_ATTENTION and whose fused branch has a bug (a
    TypeError, as calling a helper with the wrong arguments raises)."""

    def forward(self, x, positions, positional, past=None, attention_mask=None):
        from gptx.export import attention as onnx_attention

        if onnx_attention.enabled(self, positional):
            raise TypeError("fused branch: unexpected keyword argument 'mask'")
        return super().forward(x, positions, positional, past, attention_mask)


def test_a_bug_in_the_fused_attention_is_raised_not_hidden_by_the_fallback(tmp_path):
    """Only a refusal (the exporter's, onnxruntime's) or a verification mismatch falls back to the
    plain attention: a programming error in the fused branch stops the export with that error."""
    from gptx.plugins.attention import CausalSelfAttention

    Buggy = type("Buggy", (_FusedBranchBug, CausalSelfAttention), {})
    logs = []
    with attention_registered("buggy_fused", Buggy):
        ck = make_checkpoint(tmp_path / "run", {"attention": {"kind": "buggy_fused"}})
        with pytest.raises(TypeError, match="fused branch: unexpected keyword argument 'mask'"):
            export_checkpoint(ck, tmp_path / "out", log=logs.append)
    assert not [x for x in logs if "not kept" in x], logs
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_fusing_asks_only_the_traced_models_attentions_and_puts_them_back():
    """No process-wide switch: fusing(model) marks that model's attention modules for the
    duration of the block (nested blocks restore the outer state), no other model's."""
    from helpers import tiny_model

    from gptx.components import Attention
    from gptx.export import attention as onnx_attention

    traced, other = tiny_model(n_layer=2)[0], tiny_model(n_layer=2)[0]
    attns = [m for m in traced.modules() if isinstance(m, Attention)]
    others = [m for m in other.modules() if isinstance(m, Attention)]
    before = [dict(vars(m)) for m in attns]
    with onnx_attention.fusing(traced):
        assert len(attns) == 2 and all(onnx_attention.requested(m) for m in attns)
        assert not any(onnx_attention.requested(m) for m in others)
        with onnx_attention.fusing(traced, False):
            assert not any(onnx_attention.requested(m) for m in attns)
        assert all(onnx_attention.requested(m) for m in attns)
    assert not any(onnx_attention.requested(m) for m in attns)
    assert [dict(vars(m)) for m in attns] == before  # nothing left on the modules


def test_only_attentions_that_declare_it_export_fused_attention(tmp_path):
    from gptx.base import DEFAULT_SUPPORTS, ONNX_FUSED_ATTENTION
    from gptx.components import Attention
    from gptx.plugins.attention import CausalSelfAttention, EinsumAttention

    assert ONNX_FUSED_ATTENTION not in DEFAULT_SUPPORTS  # a third-party component never gets it by default
    assert Attention.supports == EinsumAttention.supports == DEFAULT_SUPPORTS
    assert ONNX_FUSED_ATTENTION in CausalSelfAttention.supports

    class Undeclared(CausalSelfAttention):  # a subclass that does not promise the fused op
        supports = DEFAULT_SUPPORTS

    with attention_registered("undeclared", Undeclared):
        ck = make_checkpoint(tmp_path / "run", {"attention": {"kind": "undeclared"}})
        meta = export_checkpoint(ck, tmp_path / "out", log=quiet)
    assert not {"MultiHeadAttention", "GroupQueryAttention"} & set(meta["fusions"])
    assert _cache_concats(onnx.load(str(tmp_path / "out" / "model.onnx")))


def test_verification_compares_real_positions_only():
    from gptx.export.verify import _real_rows_max_abs_diff

    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])  # row 0 is left-padded by two slots
    logits_t = np.zeros((2, 3, 5), np.float32)  # the last 3 slots are new tokens
    logits_o = logits_t.copy()
    logits_o[0, 0] = np.nan  # slot 1 of row 0: padding, unspecified
    assert _real_rows_max_abs_diff(logits_o, logits_t, mask, None) == 0.0
    logits_o[0, 1, 2] = 0.5  # slot 2 of row 0: real
    assert _real_rows_max_abs_diff(logits_o, logits_t, mask, None) == 0.5
    present_t = np.zeros((2, 3, 4, 2), np.float32)
    present_o = present_t.copy()
    present_o[0, :, :2] = 7.0  # padding slots
    assert _real_rows_max_abs_diff(present_o, present_t, mask, 2) == 0.0
    present_o[1, 2, 0, 1] = -0.25
    assert _real_rows_max_abs_diff(present_o, present_t, mask, 2) == 0.25
    present_o[1, 0, 3, 0] = np.inf
    assert _real_rows_max_abs_diff(present_o, present_t, mask, 2) == float("inf")
    token_major_t = np.zeros((2, 4, 2, 3, 2), np.float32)  # [B, S, 2, K, D]: the sequence on axis 1
    token_major_o = token_major_t.copy()
    token_major_o[0, :2] = 9.0  # padding slots of row 0
    assert _real_rows_max_abs_diff(token_major_o, token_major_t, mask, 1) == 0.0
    token_major_o[1, 3, 1, 2, 0] = 0.125
    assert _real_rows_max_abs_diff(token_major_o, token_major_t, mask, 1) == 0.125


def test_a_fused_graph_off_tolerance_falls_back_to_the_plain_one(tmp_path, byte_ckpt, monkeypatch):
    from onnx import numpy_helper

    from gptx.export import fuse as fuse_mod

    real = fuse_mod.fuse

    def fuse_wrong(proto, n_head, n_embd):  # the real fusion, then one weight off by 5%
        fused, counts = real(proto, n_head, n_embd)
        inits = {t.name: t for t in fused.graph.initializer}
        t = inits[next(n.input[1] for n in fused.graph.node if n.op_type == "MatMul" and n.input[1] in inits)]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.05, t.name))
        return fused, counts

    monkeypatch.setattr(fuse_mod, "fuse", fuse_wrong)
    logs = []
    meta = export_checkpoint(byte_ckpt, tmp_path / "out", log=logs.append)
    # the plain (operator-unfused) graph of the fused attention is kept: its own verification passed
    assert meta["fusions"] == {"GroupQueryAttention": 2} and meta["verification"]["max_abs_diff"] <= 1e-4
    assert any(x.startswith("fused graph not kept (export verification failed") for x in logs), logs
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [n.op_type for n in graph.graph.node if n.domain == "com.microsoft"] == ["GroupQueryAttention"] * 2
    torch_ids, onnx_ids = greedy_both(byte_ckpt, tmp_path / "out", [[1, 2, 3]])
    assert onnx_ids == torch_ids


def test_verification_catches_a_wrong_graph(gpt2):
    from gptx.export.verify import VerificationError, verify

    model = checkpoint.load(gpt2["ck"]).model
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight.mul_(1.01)  # the graph no longer matches this model
    with pytest.raises(VerificationError, match=r"differs from PyTorch by .* in (empty-past|1-token|chunked|left-padded): (logits|present)"):
        verify(model, make_session(gpt2["out"] / "model.onnx"))


def test_unknown_quantization_and_missing_source(tmp_path, byte_ckpt):
    with pytest.raises(GptxError, match="unknown scheme 'int5'; supported: int8, int4"):
        export_checkpoint(byte_ckpt, tmp_path / "o", quantize="int5", log=quiet)
    r = invoke("export", tmp_path / "nope", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "no such checkpoint" in r.output


def test_an_moe_model_is_fused_too_and_says_nothing_about_skipping(tmp_path):
    """The MoE router is a bias-free Linear on 2-D rows (a Gemm without bias or Reshape after it),
    which onnxruntime's GPT-2 pass misread and the whole fusion was skipped with an IndexError."""
    ck = make_checkpoint(tmp_path / "run", model={"ffn": {"kind": "moe"}})
    lines = []
    meta = export_checkpoint(ck, tmp_path / "out", log=lines.append)
    L = SMALL["n_layer"]
    assert meta["fusions"]["SkipLayerNormalization"] == 2 * L + 1 and meta["fusions"]["GroupQueryAttention"] == L
    assert not any("skipped" in line for line in lines), lines
    want, got = greedy_both(ck, tmp_path / "out", [list(b"To be"), list(b"or not")])
    assert got == want
