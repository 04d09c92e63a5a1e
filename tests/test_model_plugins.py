"""The model side extended from outside, for real: pip installs tests/plugin_packages/gptx-model-plugin
(blocks ``rezero`` and ``layerscale``, whose attention is ``self.mixer``; ffn ``sigmoid_moe``; attention
``token_major`` with its own [B, S, 2, K, D] cache) and the real CLI, in subprocesses, checks, trains,
exports and decodes with them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import install_plugin_packages, plugin_experiment, plugin_env

pytestmark = pytest.mark.slow

NAMES = ["rezero", "layerscale", "sigmoid_moe", "token_major"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_plugin_packages(tmp_path_factory.mktemp("model-plugin"), ["gptx-model-plugin"])


def gptx(site: Path, *args, cwd: Path, timeout: int = 600):
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **plugin_env(site, load="model"))
    return subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def test_check_plugin_passes_every_contract_of_the_model_plugin(site, tmp_path):
    listed = gptx(site, "components", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {rows[n]["kind"] for n in NAMES} == {"block", "ffn", "attention"}
    proc = gptx(site, "check-plugin", *NAMES, "--json", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert {r["name"] for r in results} == set(NAMES)
    assert not [r for r in results if r["status"] == "fail"], results
    passed = {(r["name"], r["check"]) for r in results if r["status"] == "pass"}
    # the token-major cache decodes and exports: the export follows the attention's declaration
    assert {(n, "ONNX export") for n in NAMES} <= passed


def test_a_model_of_plugin_parts_trains_exports_and_decodes_its_own_cache_on_onnxruntime(site, tmp_path):
    exp = plugin_experiment(tmp_path / "plugins.toml", """
        [model.block]
        kind = "rezero"
        [model.attention]
        kind = "token_major"
        n_kv_heads = 2
        [model.ffn]
        kind = "sigmoid_moe"
        n_experts = 4
        top_k = 2
        """, max_steps=20, sample_tokens=8)
    run = gptx(site, "run", exp, "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ckpt = next(line.split(":", 1)[1].strip() for line in run.stdout.splitlines() if line.startswith("checkpoint:"))
    out = tmp_path / "export"
    export = gptx(site, "export", ckpt, "-o", out, cwd=tmp_path)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    meta = json.loads((out / "gptx_export.json").read_text())
    assert meta["cache"] == [{"name": "kv", "dims": ["batch_size", "past_sequence_length", 2, 2, 8], "seq_axis": 1,
                              "dtype": "float32"}]
    assert "past_key_values.1.kv" in meta["io_contract"]["inputs"] and "present.0.kv" in meta["io_contract"]["outputs"]
    assert not (out / "genai_config.json").exists() and "no genai_config.json" in export.stdout  # genai reads [B, K, P, D] only

    def greedy(source):
        # 40 new tokens pass the 32-token context: both runtimes crop the same way past it
        r = gptx(site, "generate", source, "--prompt", "ROMEO:", "--prompt", "O", "--temperature", "0",
                 "--max-new-tokens", "40", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return [json.loads(line)["ids"] for line in r.stdout.splitlines()]

    assert greedy(out) == greedy(ckpt)


# every prompt's greedy ids with the cache (prompts of different lengths: a left-padded batch) and
# recomputed from scratch each token, one prompt at a time; run where the plugin is installed
CACHED_AND_UNCACHED = """
import json, sys
import torch
from gptx import checkpoint
from gptx.generate import generate_ids
from gptx.sampling import Sampler

ck = checkpoint.load(sys.argv[1])
model = ck.model.eval()
assert type(model.blocks[0]).__name__ == "LayerScaleBlock" and not hasattr(model.blocks[0], "attn")
prompts = [ck.tokenizer.encode(p) for p in ("ROMEO:", "O", "First Citizen")]
new = 20
cached = generate_ids(model, prompts, new, Sampler(temperature=0), None).ids
uncached = []
with torch.no_grad():
    for ids in prompts:
        full = list(ids)
        for _ in range(new):
            full.append(int(model(torch.tensor([full]))[0][0, -1].argmax()))  # logits [1, T, V]
        uncached.append(full[len(ids):])
print(json.dumps({"cached": cached, "uncached": uncached}))
"""


def built_in_aux_names() -> set[str]:
    """The aux names the built-in sequential block gives a 2-layer model of the same MoE."""
    import torch

    from gptx.config import from_dict
    from gptx.model import GPT

    cfg = from_dict({"model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 65,
                               "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2}}})
    ids = torch.randint(0, 65, (2, 9))
    out = GPT(cfg.model).train()(ids[:, :-1], targets=ids[:, 1:])
    return set(out.aux) | set(out.metrics)


def test_a_block_with_its_own_attention_name_decodes_exports_and_logs_aux_as_the_built_ins(site, tmp_path, mlflow_sqlite):
    """layerscale keeps its attention in self.mixer and merges its parts' Aux: cached decoding
    equals recomputation, the ONNX export decodes the same greedy ids, and the MoE's aux metrics
    reach MLflow and metrics.jsonl under the built-in blocks' names."""
    from mlflow.tracking import MlflowClient

    exp = plugin_experiment(tmp_path / "layerscale.toml", """
        [model.block]
        kind = "layerscale"
        [model.ffn]
        kind = "sigmoid_moe"
        n_experts = 4
        top_k = 2
        """, tracking=f"enabled = true\nuri = {json.dumps(mlflow_sqlite)}")
    run = gptx(site, "run", exp, "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ckpt = next(line.split(":", 1)[1].strip() for line in run.stdout.splitlines() if line.startswith("checkpoint:"))

    names = built_in_aux_names()
    assert "aux/layer0.ffn/load_balance" in names and "aux/layer1.ffn/expert_load.3" in names
    run_dir = Path(ckpt).parents[1]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in logged for k in r if k.startswith("aux/")} == names
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    in_mlflow = set(MlflowClient(mlflow_sqlite).get_run(run_id).data.metrics)
    assert {k for k in in_mlflow if k.startswith("aux/")} == names

    env = dict(os.environ, **plugin_env(site, load="model"))
    decoded = subprocess.run([sys.executable, "-c", CACHED_AND_UNCACHED, ckpt], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    ids = json.loads(decoded.stdout)
    assert ids["cached"] == ids["uncached"]

    out = tmp_path / "export"
    export = gptx(site, "export", ckpt, "-o", out, cwd=tmp_path)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    onnx = gptx(site, "generate", out, "--prompt", "ROMEO:", "--prompt", "O", "--prompt", "First Citizen",
                "--temperature", "0", "--max-new-tokens", "20", "--json", cwd=tmp_path)
    assert onnx.returncode == 0, onnx.stderr
    assert [json.loads(line)["ids"] for line in onnx.stdout.splitlines()] == ids["cached"]


def test_a_component_initialises_its_own_weights_after_gpt2s_and_touches_nothing_else():
    """The init contract (docs/plugins.md): init_weights(config) runs after GPT-2's init, on the
    components that define it; every other parameter is exactly the default model's."""
    import torch
    from torch import nn

    from gptx import registry as registry_mod
    from gptx.config import from_dict
    from gptx.model import GPT
    from gptx.plugins.ffn import GeluMLP

    seen = []

    class ZeroOutFFN(GeluMLP):
        def init_weights(self, config):
            seen.append(config.n_layer)
            nn.init.zeros_(self.c_proj.weight)

    class Plugin:
        @staticmethod
        @__import__("gptx").hookimpl
        def register_ffn(register):
            register("zero_out", ZeroOutFFN)

    reg = registry_mod.load(extra_plugins=(Plugin,))
    model = {"n_layer": 3, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 50}
    torch.manual_seed(0)
    default = GPT(from_dict({"model": model}, registry=reg).model)
    torch.manual_seed(0)
    zeroed = GPT(from_dict({"model": {**model, "ffn": {"kind": "zero_out"}}}, registry=reg).model)
    assert seen == [3, 3, 3]  # once per layer's FFN, with the model's config
    ours, theirs = dict(zeroed.named_parameters()), dict(default.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        if name.endswith("mlp.c_proj.weight"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert torch.equal(p, theirs[name]), name  # GPT-2's init, bit for bit


def test_a_block_may_call_its_attention_anything():
    """The default cache layout finds the block's one Attention, not an attribute named attn."""
    import torch

    from gptx import registry as registry_mod
    from gptx.components import Aux, AttentionOutput, Block, BlockOutput, FeedForwardOutput
    from gptx.config import from_dict
    from gptx.generate import generate_ids
    from gptx.model import GPT
    from gptx.sampling import Sampler

    class Renamed(Block):
        def __init__(self, config, options, layer):
            super().__init__(config, options, layer)
            self.mixer, self.mlp = self.make_attention(), self.make_ffn()
            self.n1, self.n2 = self.make_norm(), self.make_norm()

        def forward(self, x, positions, positional, past, attention_mask):
            a = AttentionOutput.of(self.mixer(self.n1(x), positions, positional, past, attention_mask), self.mixer)
            x = x + a.y  # [B, T, C]
            m = FeedForwardOutput.of(self.mlp(self.n2(x)), self.mlp)
            return BlockOutput(x + m.y, a.present, Aux.merged(attn=a.aux, ffn=m.aux))

    class Plugin:
        @staticmethod
        @__import__("gptx").hookimpl
        def register_block(register):
            register("renamed", Renamed)

    reg = registry_mod.load(extra_plugins=(Plugin,))
    cfg = from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 50,
                               "attention": {"kind": "causal", "n_kv_heads": 1}, "block": {"kind": "renamed"}}}, registry=reg)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    assert model.kv_heads == 1 and [t.name for t in model.cache_layouts()[0]] == ["key", "value"]
    ids = generate_ids(model, [[1, 2, 3]], 5, Sampler(temperature=0), None).ids  # decodes through the cache
    full = [1, 2, 3]
    for _ in range(5):
        full.append(int(model(torch.tensor([full]))[0][0, -1].argmax()))
    assert ids[0] == full[3:]


def test_a_cache_declared_int8_is_preallocated_as_int8():
    """GPT.empty_cache honours a non-float declared dtype (a quantized cache's codes); float
    tensors (its scales, the default key and value) follow the model's dtype."""
    import torch

    from gptx import registry as registry_mod
    from gptx.components import BATCH, SEQ, CacheTensor
    from gptx.config import from_dict
    from gptx.model import GPT
    from gptx.plugins.attention import CausalSelfAttention

    class Int8Cache(CausalSelfAttention):
        def cache_layout(self):
            K, D = self.n_kv_heads, self.config.head_dim
            return (CacheTensor("key_codes", (BATCH, K, SEQ, D), torch.int8), CacheTensor("key_scale", (BATCH, K, SEQ, 1)),
                    CacheTensor("value_codes", (BATCH, K, SEQ, D), torch.int8), CacheTensor("value_scale", (BATCH, K, SEQ, 1)))

    class Plugin:
        @staticmethod
        @__import__("gptx").hookimpl
        def register_attention(register):
            register("int8_cache", Int8Cache)

    reg = registry_mod.load(extra_plugins=(Plugin,))
    cfg = from_dict({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 50,
                               "attention": {"kind": "int8_cache"}}}, registry=reg)
    model = GPT(cfg.model)
    for capacity in (0, 8):
        (layer,) = model.empty_cache(2, capacity=capacity)
        tensors = list(layer.buffers) if capacity else list(layer)
        assert [t.dtype for t in tensors] == [torch.int8, torch.float32, torch.int8, torch.float32]
    assert [t.dtype for t in model.empty_cache(1, dtype=torch.bfloat16)[0]] == [torch.int8, torch.bfloat16] * 2
