"""The export outside gptx's Python: the Node.js example (onnxruntime-node) and onnxruntime-genai
generate the same greedy tokens as gptx's own onnxruntime generator, tokenizers included."""
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from gptx.export.runtime import OnnxGenerator
from gptx.sampling import Sampler
from helpers import node_example_modules, once, run_node, wandering_export

pytestmark = pytest.mark.slow

# Unicode, <|endoftext|> written in the text, and U+0085 / U+FEFF, where JavaScript's \s and tiktoken's differ
PROMPTS = ["Hello world, it's a test", "Ünïcödé and <|endoftext|> too", "x", "tabs\tand\u0085next\ufeff'll 🙂"]
STOP_PROMPT = "The end is near"


@pytest.fixture(scope="module")
def gpt2_out(tmp_path_factory):
    return once("gpt2-4-stop", lambda: wandering_export(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=4, stop_prompt=STOP_PROMPT))


def python_greedy(out: Path, prompts, n: int):
    gen = OnnxGenerator(out)
    return [gen.generate([gen.tokenizer.encode(p)], n, Sampler(temperature=0)).ids[0] for p in prompts], gen


# ---- Node.js ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_modules(request, tmp_path_factory):
    return node_example_modules(request, tmp_path_factory)


@pytest.mark.xdist_group("node")
def test_node_example_generates_the_same_greedy_tokens(node_modules, gpt2_out):
    want, gen = python_greedy(gpt2_out, PROMPTS, 16)
    assert len({t for ids in want for t in ids}) > 16, "the model repeats itself: a weak comparison"
    rows = run_node(node_modules, gpt2_out, PROMPTS, 16)
    assert [r["prompt_ids"] for r in rows] == [gen.tokenizer.encode(p) for p in PROMPTS]  # @huggingface/tokenizers agrees
    assert [r["ids"] for r in rows] == want
    assert [r["text"] for r in rows] == [gen.tokenizer.decode(ids) for ids in want]
    # a left-padded batch in Node gives the same tokens too
    batch = gen.generate([gen.tokenizer.encode(p) for p in PROMPTS], 16, Sampler(temperature=0)).ids
    assert batch == want
    # two spinning threads (what gptx bench asks for on free CPUs) decode the same tokens
    assert [r["ids"] for r in run_node(node_modules, gpt2_out, PROMPTS, 16, "--threads", "2", "--spin")] == want


@pytest.mark.xdist_group("node")
def test_node_example_stops_at_end_of_text(node_modules, gpt2_out):
    want, gen = python_greedy(gpt2_out, [STOP_PROMPT, "x"], 16)
    assert want[0][-1] == gen.eot_id and len(want[0]) < 16  # the export was built to end this prompt early
    rows = run_node(node_modules, gpt2_out, [STOP_PROMPT, "x"], 16)  # one row stops, the other runs on
    assert [r["ids"] for r in rows] == want
    assert rows[0]["text"].endswith("<|endoftext|>")


@pytest.mark.xdist_group("node")
def test_node_example_reads_the_cache_declaration(node_modules, gpt2_out, tmp_path):
    """gptx_export.json's `cache` (each layer's cache tensors) drives the past/present names and the
    empty past's shape; without it the GPT-2 key/value layout is assumed (the tests above)."""
    out = tmp_path / "declared"
    shutil.copytree(gpt2_out, out)
    meta = json.loads((out / "gptx_export.json").read_text())
    K, D = meta["model"]["kv_heads"], meta["model"]["head_dim"]
    meta["cache"] = [{"name": n, "dims": ["batch_size", K, "past_sequence_length", D], "seq_axis": 2, "dtype": "float32"}
                     for n in ("key", "value")]
    (out / "gptx_export.json").write_text(json.dumps(meta))
    want, _ = python_greedy(gpt2_out, PROMPTS[:2], 8)
    assert [r["ids"] for r in run_node(node_modules, out, PROMPTS[:2], 8)] == want
    script = resources.files("gptx.export") / "node" / "generate.js"
    key, value = meta["cache"]
    for cache, message in [([key], "inputs/outputs do not follow gptx.decoder/1"),  # the graph has values too
                           ([key, {**value, "name": "latent"}], "inputs/outputs do not follow gptx.decoder/1"),
                           ([key, {**value, "seq_axis": 4}], "cache[1].seq_axis"),
                           ([key, {**value, "dtype": "float64"}], "cache[1].dtype"),
                           ([key, {**value, "dims": ["batch_size", "heads", "past_sequence_length", D]}], "unknown symbolic dimension"),
                           ([key, {**value, "name": "../x"}], "cache[1].name"),
                           ({}, "cache: expected a list")]:
        (out / "gptx_export.json").write_text(json.dumps(meta | {"cache": cache}))
        r = subprocess.run(["node", str(script), str(out), "--prompt", "Hi"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, NODE_PATH=str(node_modules)))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (cache, r.stderr)


@pytest.mark.xdist_group("node")
def test_node_example_decodes_an_int8_cache(node_modules, tmp_path):
    """The causal attention's int8 KV cache: Node creates the empty pasts as the declared dtypes
    (Int8Array codes, Float32Array scales) and feeds each present back; past the 96-token context too."""
    out = wandering_export(tmp_path, "byte", seed=7, attention={"kind": "causal", "kv_cache": "int8"})
    assert {c["dtype"] for c in json.loads((out / "gptx_export.json").read_text())["cache"]} == {"int8", "float32"}
    prompts = ["To be, or not to be", "Ay", "The quick brown fox jumps over the lazy dog. " * 2]
    want, _ = python_greedy(out, prompts, 30)
    assert [r["ids"] for r in run_node(node_modules, out, prompts, 30)] == want


@pytest.mark.xdist_group("node")
def test_node_example_generates_past_the_context_as_python_does(node_modules, gpt2_out):
    """Prompts near and beyond the 96-token context and 24 new tokens: nanoGPT's crop, in Node
    as in gptx's Python generators (a prompt keeps its last 95 tokens, then the window slides)."""
    gen = OnnxGenerator(gpt2_out)
    prompts = [" ".join(["one two three four"] * 40), " ".join(["to be or not"] * 20), "Hi"]
    assert len(gen.tokenizer.encode(prompts[0])) > 96
    want = gen.generate([gen.tokenizer.encode(p) for p in prompts], 24, Sampler(temperature=0)).ids
    assert [r["ids"] for r in run_node(node_modules, gpt2_out, prompts, 24)] == want


@pytest.mark.xdist_group("node")
def test_node_example_with_a_char_tokenizer(node_modules, tmp_path):
    out = wandering_export(tmp_path, "char", seed=5, state={"chars": list("\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")})
    prompts = ["To be, or not to be", "Ay"]
    want, _ = python_greedy(out, prompts, 20)
    rows = run_node(node_modules, out, prompts, 20)
    assert [r["ids"] for r in rows] == want


@pytest.mark.xdist_group("node")
def test_node_example_with_a_byte_tokenizer(node_modules, tmp_path):
    out = wandering_export(tmp_path, "byte", seed=6)
    prompts = ["Ünïcödé 🙂 text", "日本語"]
    want, gen = python_greedy(out, prompts, 20)
    rows = run_node(node_modules, out, prompts, 20)
    assert [r["prompt_ids"] for r in rows] == [gen.tokenizer.encode(p) for p in prompts]
    assert [r["ids"] for r in rows] == want
    assert [r["text"] for r in rows] == [gen.tokenizer.decode(ids) for ids in want]  # invalid UTF-8 becomes U+FFFD in both


@pytest.mark.xdist_group("node")
@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "x"], "Error: --max-new-tokens: expected an integer"),
    (["--max-new-tokens", "0"], "Error: --max-new-tokens: must be an integer from 1 to 16777216, got 0"),
    (["--temperature", "-1"], "Error: --temperature: must be a number in [0, 10000], got -1"),
    (["--top-p", "2"], "Error: --top-p: must be a number in (0, 1], got 2"),
])
def test_node_example_bad_arguments_are_one_line(node_modules, gpt2_out, args, message):
    script = resources.files("gptx.export") / "node" / "generate.js"
    r = subprocess.run(["node", str(script), str(gpt2_out), "--prompt", "Hi", *args], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, NODE_PATH=str(node_modules)))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_node_example_ships_with_the_package():
    node_dir = resources.files("gptx.export") / "node"
    assert (node_dir / "generate.js").is_file()
    pkg = json.loads((node_dir / "package.json").read_text())
    assert set(pkg["dependencies"]) == {"onnxruntime-node", "@huggingface/tokenizers"}
    assert '"..", "web", "gptx.mjs"' in (node_dir / "generate.js").read_text()  # the web page's module, shared


# ---- onnxruntime-genai ----------------------------------------------------------------------------

def genai_greedy(model, ids: list[int], n: int) -> list[int]:
    """Up to ``n`` greedy tokens after ``ids`` from onnxruntime-genai."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    return got


def test_onnxruntime_genai_generates_the_same_greedy_tokens(gpt2_out):
    import onnxruntime_genai as og  # a test dependency: its absence is a failure, not a skip

    want, gen = python_greedy(gpt2_out, PROMPTS, 16)
    model = og.Model(str(gpt2_out))
    tokenizer = og.Tokenizer(model)
    for prompt, expected in zip(PROMPTS, want):
        ids = [int(i) for i in tokenizer.encode(prompt)]
        assert ids == gen.tokenizer.encode(prompt)  # genai reads tokenizer.json
        got = genai_greedy(model, ids, 16)
        # genai stops after end-of-text as gptx does (including it)
        assert got == expected, prompt
        assert tokenizer.decode(got) == gen.tokenizer.decode([t for t in got if t != 50256])


def test_onnxruntime_genai_runs_the_int4_export_as_the_python_loop(tmp_path):
    """gptx export --quantize int4 writes genai_config.json too, and genai decodes that graph
    (MatMulNBits) to the same greedy ids as gptx's Python loop on the same file."""
    import onnxruntime_genai as og

    out = wandering_export(tmp_path, "gpt2", seed=4, quantize="int4")
    assert json.loads((out / "gptx_export.json").read_text())["quantization"] == "int4"
    assert (out / "genai_config.json").is_file()
    want, gen = python_greedy(out, PROMPTS[:2], 16)
    model = og.Model(str(out))
    for prompt, expected in zip(PROMPTS[:2], want):
        assert genai_greedy(model, gen.tokenizer.encode(prompt), 16) == expected, prompt


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_onnxruntime_genai_runs_exports_without_an_end_of_text_token(kind, tmp_path):
    """Char and byte vocabularies have no end-of-text id: genai must start and run to max_length
    with Python's greedy ids (gptx's tokenizer encodes; genai has no reader for these vocabularies)."""
    import onnxruntime_genai as og

    state = {"chars": list("\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")} if kind == "char" else None
    out = wandering_export(tmp_path, kind, seed=5, state=state)
    prompts = ["To be, or not to be", "Ay"]
    want, gen = python_greedy(out, prompts, 20)
    assert gen.eot_id is None and json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"] == []
    model = og.Model(str(out))
    for prompt, expected in zip(prompts, want):
        assert genai_greedy(model, gen.tokenizer.encode(prompt), 20) == expected, prompt


