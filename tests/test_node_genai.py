"""The export outside gptx's Python: the Node.js example (onnxruntime-node) and onnxruntime-genai
generate the same greedy tokens as gptx's own onnxruntime generator, tokenizers included."""
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch

from gptx import checkpoint
from gptx import registry as registry_mod
from gptx.config import from_dict
from gptx.export.onnx_export import export_checkpoint
from gptx.export.runtime import OnnxGenerator
from gptx.model import GPT
from gptx.sampling import Sampler

pytestmark = pytest.mark.slow

PROMPTS = ["Hello world, it's a test", "Ünïcödé and <|endoftext|> too", "x"]


def export(root: Path, tokenizer: str, seed: int, state=None) -> Path:
    cfg = from_dict({"model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 96},
                     "tokenizer": {"kind": tokenizer}}, registry_mod.registry())
    tok = checkpoint.build_tokenizer(cfg.tokenizer, state)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    # larger weights than the default init, so greedy decoding wanders instead of repeating one token
    model = GPT(cfg.model)
    with torch.no_grad():
        model.wte.weight.mul_(20)
    ck = checkpoint.save(root / "run", 1, model, cfg, tok)
    export_checkpoint(ck, root / "out", log=lambda _m: None)
    return root / "out"


@pytest.fixture(scope="module")
def gpt2_out(tmp_path_factory):
    return export(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=4)


def python_greedy(out: Path, prompts, n: int):
    gen = OnnxGenerator(out)
    return [gen.generate([gen.tokenizer.encode(p)], n, Sampler(temperature=0)).ids[0] for p in prompts], gen


# ---- Node.js ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_modules(request, tmp_path_factory):
    """onnxruntime-node installed once into pytest's cache directory (.pytest_cache, git-ignored),
    or into the test's temporary directory when the cache is disabled."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed: the Node example cannot be run here")
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("gptx-onnxruntime-node"))
    else:
        cache = tmp_path_factory.mktemp("onnxruntime-node")
    if not (cache / "node_modules" / "onnxruntime-node" / "package.json").is_file():
        env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip")  # CPU binaries only: no CUDA download
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache), "onnxruntime-node"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, f"npm install onnxruntime-node failed:\n{r.stdout}\n{r.stderr}"
    return cache / "node_modules"


def run_node(node_modules, out, prompts, n):
    script = resources.files("gptx.export") / "node" / "generate.js"
    args = ["node", str(script), str(out), "--max-new-tokens", str(n)]
    for p in prompts:
        args += ["--prompt", p]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=dict(os.environ, NODE_PATH=str(node_modules)))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


@pytest.mark.xdist_group("node")
def test_node_example_generates_the_same_greedy_tokens(node_modules, gpt2_out):
    want, gen = python_greedy(gpt2_out, PROMPTS, 16)
    rows = run_node(node_modules, gpt2_out, PROMPTS, 16)
    assert [r["prompt_ids"] for r in rows] == [gen.tokenizer.encode(p) for p in PROMPTS]  # its own BPE agrees
    assert [r["ids"] for r in rows] == want
    assert [r["text"] for r in rows] == [gen.tokenizer.decode(ids) for ids in want]
    # a left-padded batch in Node gives the same tokens too
    batch = gen.generate([gen.tokenizer.encode(p) for p in PROMPTS], 16, Sampler(temperature=0)).ids
    assert batch == want


@pytest.mark.xdist_group("node")
def test_node_example_with_a_char_tokenizer(node_modules, tmp_path):
    out = export(tmp_path, "char", seed=5, state={"chars": list("\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")})
    prompts = ["To be, or not to be", "Ay"]
    want, _ = python_greedy(out, prompts, 20)
    rows = run_node(node_modules, out, prompts, 20)
    assert [r["ids"] for r in rows] == want


def test_node_example_ships_with_the_package():
    node_dir = resources.files("gptx.export") / "node"
    assert (node_dir / "generate.js").is_file()
    pkg = json.loads((node_dir / "package.json").read_text())
    assert "onnxruntime-node" in pkg["dependencies"]


# ---- onnxruntime-genai ----------------------------------------------------------------------------

def test_onnxruntime_genai_generates_the_same_greedy_tokens(gpt2_out):
    og = pytest.importorskip("onnxruntime_genai")
    want, gen = python_greedy(gpt2_out, PROMPTS, 16)
    model = og.Model(str(gpt2_out))
    tokenizer = og.Tokenizer(model)
    for prompt, expected in zip(PROMPTS, want):
        ids = [int(i) for i in tokenizer.encode(prompt)]
        assert ids == gen.tokenizer.encode(prompt)  # genai reads tokenizer.json
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 16, batch_size=1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        # genai stops after end-of-text as gptx does (including it)
        assert got == expected, prompt
        assert tokenizer.decode(got) == gen.tokenizer.decode([t for t in got if t != 50256])
