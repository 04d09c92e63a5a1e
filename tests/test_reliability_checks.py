"""Everything that can be known before the first step is checked before anything is created
(issue 26, cause 5), and the first probe's leftovers: through the real CLI, in subprocesses.

Each case asserts the exit code, the one ``Error:`` line naming the key, and that nothing was
created (no run folder, no mlflow.db)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import gptx, write_experiment


def one_error_line(proc, *fragments) -> str:
    """Exit 2, exactly one stderr line ``Error: ...`` holding every fragment; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def refused_before_anything(tmp_path: Path, sets: list[str], *fragments) -> None:
    """``validate`` and ``run`` give the same one line, and ``run`` creates nothing."""
    f = write_experiment(tmp_path / "e.toml")
    args = [a for s in sets for a in ("--set", s)]
    said = one_error_line(gptx("validate", f, *args, cwd=tmp_path), *fragments)
    ran = one_error_line(gptx("run", f, *args, cwd=tmp_path), *fragments)
    free = re.compile(r"[0-9.,]+ GiB is free")  # the machine's free memory moves between the two
    assert free.sub("", said) == free.sub("", ran)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ---- sizes no machine can hold: a memory estimate per component -------------------------------

@pytest.mark.parametrize("sets, key, what", [
    (["model.ffn.hidden=1099511627776"], "model.ffn", "ffn 'gelu' in 2 layers"),
    (['model.ffn={kind="moe", n_experts=1024, hidden=1073741824}'], "model.ffn", "ffn 'moe' in 2 layers"),
    (['model.attention={kind="latent", kv_rank=1099511627776}'], "model.attention", "attention 'latent' in 2 layers"),
    (["model.vocab_size=16777216", "model.n_embd=65536", "model.n_head=1"], "model.vocab_size", "the token embedding"),
    (["training.batch_size=100000000"], "training.batch_size", "micro-batch of 100000000 x 32 tokens"),
])
def test_sizes_no_machine_holds_are_refused_naming_the_component(tmp_path, sets, key, what):
    refused_before_anything(tmp_path, sets, f": {key}: training needs at least", what, "is free on this machine")


def test_a_size_beyond_any_tensor_is_refused_not_overflowed(tmp_path):
    """2**62 x n_embd overflows a 64-bit element count: one line naming the table, no traceback."""
    refused_before_anything(tmp_path, ["model.ffn.hidden=4611686018427387904"], ": model.ffn: gelu builds a tensor no machine can hold")


# ---- finite but absurd option values: ranges declared where the options are defined ----------

@pytest.mark.parametrize("sets, key, problem", [
    (["training.optimizer.weight_decay=1e300"], "training.optimizer.weight_decay", "must be in [0, 10], got 1e+300"),
    (['training.optimizer={kind="muon", lr=1e300}'], "training.optimizer.lr", "must be in (0, 10], got 1e+300"),
    (['training.optimizer={kind="muon", head_lr=1e300}'], "training.optimizer.head_lr", "must be in (0, 10]"),
    (['model.ffn={kind="moe", z_loss_weight=1e308}'], "model.ffn.z_loss_weight", "must be in [0, 100], got 1e+308"),
    (['model.ffn={kind="moe", aux_loss_weight=1e300}'], "model.ffn.aux_loss_weight", "must be in [0, 100]"),
    (["training.learning_rate=1e300"], "training.learning_rate", "must be in (0, 10], got 1e+300"),
    (["training.optimizer.eps=1e300"], "training.optimizer.eps", "must be in (0, 1]"),
    (["model.norm.eps=1e300"], "model.norm.eps", "must be in (0, 1]"),
    (['model.positional={kind="rope", base=1e300}'], "model.positional.base", "must be in (1, 1e+12]"),
    (["training.schedule.min_lr=1e300"], "training.schedule.min_lr", "must be in [0, 10]"),
    (["training.grad_clip=1e300"], "training.grad_clip", "must be in [-1e+06, 1e+06], got 1e+300"),  # no declared range: FLOAT_LIMIT
    (["training.sample_temperature=1e300"], "training.sample_temperature", "must be in [0, 10000]"),
    (['training.optimizer={kind="muon", ns_steps=100}'], "training.optimizer.ns_steps", "must be in [1, 99], got 100"),  # torch's limit
    (["training.optimizer.beta2=1.0"], "training.optimizer.beta2", "must be in [0, 1), got 1"),
    (["model.dropout=1.0"], "model.dropout", "must be in [0, 1), got 1"),
])
def test_absurd_option_values_are_refused_before_the_run(tmp_path, sets, key, problem):
    refused_before_anything(tmp_path, sets, f"{key}: {problem}")


def test_a_third_party_components_float_options_are_held_to_the_default_limit(tmp_path):
    """A plugin's option that declares no range (the Lion optimizer of the test plugin package)
    still cannot be 1e300: every float option is held to FLOAT_LIMIT unless it declares more."""
    from helpers import install_plugin_packages, plugin_env

    env = plugin_env(install_plugin_packages(tmp_path, ["gptx-training-plugin"]))
    f = write_experiment(tmp_path / "e.toml")
    for command in ("validate", "run"):
        one_error_line(gptx(command, f, "--set", 'training.optimizer={kind="lion", weight_decay=1e300}', env=env, cwd=tmp_path),
                       "training.optimizer.weight_decay: must be in [-1e+06, 1e+06], got 1e+300")
    assert not (tmp_path / "runs").exists()
    proc = gptx("components", "lion", env=env, cwd=tmp_path)  # the catalog says the accepted range
    assert "weight_decay = 0.0  (number in [-1e+06, 1e+06])" in proc.stdout, proc.stdout


def test_values_training_survives_still_validate(tmp_path):
    """The ranges are not tighter than real recipes: nanoGPT's, modded-nanogpt's Muon, Llama 3's
    rope base, a big z-loss weight."""
    f = write_experiment(tmp_path / "e.toml")
    for sets in (["training.optimizer.weight_decay=1.0", "training.learning_rate=1.0"],
                 ['training.optimizer={kind="muon", lr=0.05, weight_decay=0.1, head_lr=0.008}'],
                 ['model.positional={kind="rope", base=500000.0}'],
                 ['model.ffn={kind="moe", n_experts=4, top_k=2, z_loss_weight=0.001}']):
        proc = gptx("validate", f, *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
        assert proc.returncode == 0 and ": OK" in proc.stdout, (sets, proc.stderr)


# ---- a padded vocabulary (nanoGPT's 50,304 for GPT-2's 50,257): its extra ids are never sampled ---

PADDED, CHARS = 128, 65  # model.vocab_size, and the char tokenizer's vocabulary of tiny Shakespeare
HOT = ["--temperature", "1000", "--seed", "3"]  # near-uniform: half the ids would be padding


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """A char model padded to 128 ids, trained 4 steps; its end-of-run sample drawn at temperature
    1000 (without the mask: about 30 padded ids, and a crash decoding the first)."""
    d = tmp_path_factory.mktemp("padded")
    f = write_experiment(d / "e.toml")
    text = f.read_text().replace("block_size = 32", f"block_size = 32\nvocab_size = {PADDED}")
    text = text.replace("max_steps = 20", "max_steps = 4\nsample_temperature = 1000.0").replace("sample_tokens = 10", "sample_tokens = 30")
    f.write_text(text)
    proc = gptx("run", f, "--quiet", cwd=d)
    assert proc.returncode == 0, proc.stderr
    run_dir = next((d / "runs" / "e").iterdir())
    return d, run_dir, proc


def new_ids(proc) -> list[int]:
    import json

    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    return [t for row in rows for t in row["ids"]]


def test_a_padded_vocabulary_trains_and_samples_at_the_end(padded_run):
    import json

    d, run_dir, proc = padded_run
    assert "---- sample ----" in proc.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FINISHED"


def test_torch_and_onnxruntime_generation_never_sample_padded_ids(padded_run):
    d, run_dir, _ = padded_run
    torch_ids = new_ids(gptx("generate", run_dir, "--prompt", "ROMEO:", "--prompt", "a", "--max-new-tokens", "60", "--json", *HOT, cwd=d))
    assert len(torch_ids) == 120 and max(torch_ids) < CHARS and len(set(torch_ids)) > 30  # sampled widely, never padding
    out = d / "export"
    proc = gptx("export", run_dir, "-o", out, "--no-track", cwd=d)
    assert proc.returncode == 0, proc.stderr
    import json

    meta = json.loads((out / "gptx_export.json").read_text())
    assert (meta["model"]["vocab_size"], meta["tokenizer"]["vocab_size"]) == (PADDED, CHARS)
    ort_ids = new_ids(gptx("generate", out, "--prompt", "ROMEO:", "--prompt", "a", "--max-new-tokens", "60", "--json", *HOT, cwd=d))
    assert ort_ids == torch_ids  # the same sampler on the same (masked) logits


def test_the_exported_graph_itself_never_offers_padded_ids(padded_run, tmp_path):
    """The mask is in model.onnx, so a runtime that samples on its own (onnxruntime-genai's search,
    or any other) cannot pick a padded id either: raw logits are -inf there, finite elsewhere, and
    genai sampling near-uniformly (temperature 1000, top-k over every id) stays below the tokenizer's."""
    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og

    d, run_dir, _ = padded_run
    out = tmp_path / "export"
    proc = gptx("export", run_dir, "-o", out, "--no-track", cwd=d)
    assert proc.returncode == 0, proc.stderr
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "position_ids": np.arange(3, dtype=np.int64)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros([1 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape], dtype=np.float32)
    logits = sess.run(["logits"], feeds)[0]  # [1, 3, PADDED]
    assert logits.shape == (1, 3, PADDED)
    assert np.isneginf(logits[..., CHARS:]).all() and np.isfinite(logits[..., :CHARS]).all()
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=True, temperature=1000.0, top_k=PADDED, top_p=1.0, random_seed=3,
                              max_length=32, min_length=32, batch_size=1)  # the model's whole context
    gen = og.Generator(model, params)
    gen.append_tokens([1, 2, 3])
    while not gen.is_done():
        gen.generate_next_token()
    ids = list(gen.get_sequence(0))[3:]
    assert len(ids) == 29 and max(ids) < CHARS and len(set(ids)) > 15, ids  # sampled widely, never padding


def test_a_vocab_size_below_the_tokenizers_stays_an_error(tmp_path):
    refused_before_anything(tmp_path, ["model.vocab_size=64"], "model.vocab_size: 64 is smaller than the tokenizer's 65")


@pytest.mark.slow
def test_node_never_samples_padded_ids(padded_run, request, tmp_path_factory):
    """export/web/gptx.mjs (shared by Node and the page) masks ids at or above the tokenizer's."""
    import json
    import shutil
    import subprocess
    from importlib import resources

    from helpers import npm_install_pinned

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js (node and npm) is not installed: the Node example cannot be run here")
    cache = getattr(request.config, "cache", None)  # the same folder as test_node_genai's install
    root = Path(cache.mkdir("gptx-node")) if cache is not None else tmp_path_factory.mktemp("gptx-node")
    package_json = Path(str(resources.files("gptx.export") / "node" / "package.json"))
    modules = npm_install_pinned(root, package_json, env={"ONNXRUNTIME_NODE_INSTALL": "skip"})
    d, run_dir, _ = padded_run
    out = d / "export-node"
    assert gptx("export", run_dir, "-o", out, "--no-track", cwd=d).returncode == 0
    script = resources.files("gptx.export") / "node" / "generate.js"
    r = subprocess.run(["node", str(script), str(out), "--prompt", "ROMEO:", "--max-new-tokens", "60", "--temperature", "1000",
                        "--seed", "3"], capture_output=True, text=True, timeout=120, env=dict(os.environ, NODE_PATH=str(modules)))
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout.strip().splitlines()[0])["ids"]
    assert len(ids) == 60 and max(ids) < CHARS and len(set(ids)) > 20
    piped = d / "export-fifo"  # the Node example refuses a FIFO too, instead of waiting for a writer
    piped.mkdir()
    (piped / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    fifo(piped / "gptx_export.json")
    r = subprocess.run(["node", str(script), str(piped), "--prompt", "a"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NODE_PATH=str(modules)))
    assert r.returncode == 2 and "gptx_export.json: is not a regular file" in r.stderr, r.stderr


# ---- the first probe's leftovers: files that never end, messages of one line ----------------------

@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A 1-layer byte-level checkpoint and its export (random weights)."""
    from helpers import tiny_checkpoint_and_export

    return tiny_checkpoint_and_export(tmp_path_factory.mktemp("byte"))


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_wherever_gptx_reads_a_file(tmp_path, byte_model):
    """A FIFO blocks the reader until someone writes: every file gptx reads is refused unless regular."""
    ck, out = byte_model
    pipe = fifo(tmp_path / "pipe.txt")
    f = write_experiment(tmp_path / "e.toml")
    refused = "is not a regular file (a FIFO, socket or device, which would block or never end)"
    one_error_line(gptx("validate", pipe, timeout=60, cwd=tmp_path), "pipe.txt: is not a regular file")
    one_error_line(gptx("validate", f, "--set", f'data.path="{pipe}"', timeout=60, cwd=tmp_path), "data.path", refused)
    one_error_line(gptx("prepare", pipe, "-o", tmp_path / "tokens", "--tokenizer", "byte", timeout=60, cwd=tmp_path), refused)
    one_error_line(gptx("eval", ck, "--data", pipe, timeout=60, cwd=tmp_path), "--data", refused)
    one_error_line(gptx("eval", ck, "--task", pipe, timeout=60, cwd=tmp_path), "--task", refused)
    hf = tmp_path / "hf"
    hf.mkdir()
    fifo(hf / "config.json")
    one_error_line(gptx("import-hf", hf, "-o", tmp_path / "imported", timeout=60, cwd=tmp_path), "config.json", refused)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    fifo(export / "gptx_export.json")
    one_error_line(gptx("generate", export, "--prompt", "a", timeout=60, cwd=tmp_path), "gptx_export.json", refused)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "imported").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_tiktoken_encoding_is_one_line_listing_the_known_ones(tmp_path):
    proc = gptx("prepare", write_experiment(tmp_path / "e.toml"), "-o", tmp_path / "out", "--tokenizer", "tiktoken",
                "--tokenizer-option", "encoding=cl100k_bas", cwd=tmp_path)
    one_error_line(proc, "tokenizer.encoding: unknown tiktoken encoding 'cl100k_bas' (did you mean 'cl100k_base'?)",
                   "available: cl100k_base, gpt2, ")
    f = write_experiment(tmp_path / "e.toml")
    one_error_line(gptx("validate", f, "--set", 'tokenizer={kind="tiktoken", encoding="nope"}', cwd=tmp_path),
                   "unknown tiktoken encoding 'nope'; available: ")


@pytest.mark.parametrize("option, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", str(2**70)),
    ("--temperature", "warm"), ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "-inf"), ("--top-p", "1.5"),
])
def test_every_float_option_of_generate_is_one_line(tmp_path, byte_model, option, value):
    ck, _ = byte_model
    one_error_line(gptx("generate", ck, "--prompt", "a", option, value, cwd=tmp_path), f"{option}: ")


def test_a_prompt_that_is_not_utf8_is_its_bytes_for_the_byte_tokenizer(tmp_path, byte_model):
    """A command-line argument with bytes that are not UTF-8 reaches Python as lone surrogates: the
    byte tokenizer encodes the bytes they were, in torch and onnxruntime alike."""
    import json
    import subprocess
    import sys

    for source in byte_model:
        proc = subprocess.run([sys.executable, "-m", "gptx", "generate", str(source), "--prompt", b"a\xff\xfeb",
                               "--max-new-tokens", "2", "--json"], capture_output=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[0])["prompt_ids"] == [97, 255, 254, 98]


def test_a_batch_size_that_cannot_fit_is_refused_before_scoring(tmp_path, byte_model):
    ck, out = byte_model
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    for source in (ck, out):
        one_error_line(gptx("eval", source, "--data", text, "--batch-size", str(10**12), cwd=tmp_path),
                       "--batch-size: 1,000,000,000,000 windows of 32 tokens need at least", "for their logits;", "is free")
    proc = gptx("eval", ck, "--data", text, "--batch-size", "1000", cwd=tmp_path)  # more rows than windows: fine
    assert proc.returncode == 0, proc.stderr


def test_a_shard_holding_ids_above_its_manifests_max_is_refused_before_the_run(tmp_path):
    """An id above max_token_id (still inside the byte vocabulary, so training would not notice)
    is found when the shards are opened: validate and run refuse it, nothing is created."""
    import json

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    tokens = tmp_path / "tokens"
    assert gptx("prepare", text, "-o", tokens, "--tokenizer", "byte", "--quiet", cwd=tmp_path).returncode == 0
    manifest = json.loads((tokens / "gptx_data.json").read_text())
    shard = tokens / manifest["shards"]["train"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-2:] = (200).to_bytes(2, "little")  # the last uint16 token; the text's highest byte is 'z' (122)
    shard.write_bytes(bytes(raw))
    f = write_experiment(tmp_path / "e.toml", data=tokens)
    f.write_text(f.read_text().replace('kind = "char"', 'kind = "byte"').replace("[data]", '[data]\nkind = "tokens"'))
    for command in ("validate", "run"):
        one_error_line(gptx(command, f, cwd=tmp_path), "data.path", f"{shard}: holds token id 200, above the max_token_id 122")
    assert not (tmp_path / "runs").exists()


def test_bench_checks_its_sections_inputs_before_measuring_the_machine(tmp_path):
    """One error line and nothing else: no 'measuring ...' progress line came first."""
    one_error_line(gptx("bench", "--only", "peak,generate", "--backends", "torch", "--prompt-tokens", "2000", cwd=tmp_path),
                   "--prompt-tokens + --new-tokens = 2128 exceeds the model's context of 1024")
    f = write_experiment(tmp_path / "e.toml")
    one_error_line(gptx("bench", "--only", "peak,train", "--experiment", f, "--set", "training.batch_size=100000000", cwd=tmp_path),
                   "e.toml: training.batch_size: training needs at least")


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
def test_the_browser_page_never_samples_padded_ids(padded_run, page, web_cache):
    """The page (export/web, in headless Chromium, served by gptx web) at temperature 1000 on the
    padded export: every id is the tokenizer's."""
    from test_web_browser import open_page

    from helpers import WebServer

    d, run_dir, _ = padded_run
    out = d / "export-web"
    assert gptx("export", run_dir, "-o", out, "--no-track", cwd=d).returncode == 0
    site = WebServer(out, env={"GPTX_CACHE_DIR": str(web_cache)})
    try:
        result = open_page(page, site, prompt="ROMEO:", max_new_tokens=60, temperature=1000, seed=3)
    finally:
        site.stop()
    assert result["status"] == "done", result
    ids = result["result"]["ids"]
    assert len(ids) == 60 and max(ids) < CHARS and len(set(ids)) > 20
