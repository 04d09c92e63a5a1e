"""Components that declare how they travel out of gptx, for real:

- ``Tokenizer.tokenizer_json``: the built-in ``hf`` kind (any tokenizer.json, kept in the
  checkpoint) and a third-party tokenizer (tests/plugin_packages/gptx-travel-plugin, ``letters``)
  export a tokenizer.json with which Node encodes and generates exactly the ids gptx's Python
  does; one without (``shifted``) still exports for Python, and Node, ``gptx web`` and the Hugging
  Face export refuse it on one line.
- ``Component.hf_equivalent``: an attention declaring built-in ``causal`` exports to transformers
  and agrees with gptx; one that declares nothing is refused naming it; a false declaration fails
  ``gptx check-plugin``.
(tests/test_web_browser.py runs the same exports in Chromium.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import gptx, install_plugin_packages, node_example, node_example_modules, plugin_env, run_node, tiny_checkpoint, wandering_export
from tokenizers import Tokenizer as Backend

from gptx import checkpoint
from gptx import registry as registry_mod
from gptx.export.runtime import OnnxGenerator
from gptx.sampling import Sampler

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "experiments" / "data" / "tokenizer.json"  # a byte-level BPE of tiny Shakespeare, 512 tokens
ODD = ["", "ROMEO: hello there, world", "<|endoftext|>  x\u0085y \ufeffz\n\n", "naïve café 🙂 '''s  \t end",
       "İstanbul ΣΑΣ ǅ \u200d\u0301", "日本語\r\n\x7f"]  # no NUL: prompts travel as command-line arguments
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}


def hf_state(path: Path = SHIPPED) -> dict:
    return {"tokenizer_json": json.loads(path.read_text(encoding="utf-8"))}


# ---- the hf kind in Python ------------------------------------------------------------------------

def hf_tokenizer(path: Path, eot: str = "<|endoftext|>"):
    from gptx.config import from_dict

    cfg = from_dict({"tokenizer": {"kind": "hf", "path": str(path), "eot": eot}})
    return checkpoint.build_tokenizer(cfg.tokenizer)


def wordpiece_file(tmp_path: Path) -> Path:
    """A tokenizer.json of another shape than GPT-2's: normalizer, Whitespace split, WordPiece, [UNK]."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = Backend(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([(ROOT / "experiments" / "data" / "tinyshakespeare.txt").read_text()[:50_000]],
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[EOS]"], show_progress=False))
    tok.save(str(tmp_path / "wordpiece.json"))
    return tmp_path / "wordpiece.json"


def test_the_hf_kind_encodes_and_decodes_as_the_tokenizers_library(tmp_path):
    for path, eot in [(SHIPPED, "<|endoftext|>"), (wordpiece_file(tmp_path), "[EOS]")]:
        ours, theirs = hf_tokenizer(path, eot), Backend.from_file(str(path))
        assert ours.eot_id == theirs.token_to_id(eot) and ours.vocab_size == theirs.get_vocab_size()
        for text in ODD:
            ids = theirs.encode(text, add_special_tokens=False).ids
            assert ours.encode(text) == ids, (path.name, text)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
        assert ours.tokenizer_json() == json.loads(path.read_text(encoding="utf-8"))  # the file's content, as it is
    assert hf_tokenizer(SHIPPED).encodes_in_pieces and not hf_tokenizer(tmp_path / "wordpiece.json", "[EOS]").encodes_in_pieces
    assert hf_tokenizer(SHIPPED, "").eot_id is None  # "" for no end-of-text token


def test_a_checkpoint_keeps_the_tokenizer_json_and_needs_no_file(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    ck = tiny_checkpoint(tmp_path / "run", "hf", hf_state(path), **MODEL)
    path.unlink()  # the original is gone; the checkpoint holds its content
    tok = checkpoint.load(ck).tokenizer
    assert tok.encode(ODD[3]) == Backend.from_file(str(SHIPPED)).encode(ODD[3]).ids
    meta = json.loads((ck / "gptx.json").read_text())
    meta["tokenizer_state"] = {"tokenizer_json": {"model": {"type": "Nonsense"}}}
    (ck / "gptx.json").write_text(json.dumps(meta))
    p = gptx("generate", ck, "--prompt", "x", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "tokenizer_state.tokenizer_json: not a Hugging Face tokenizer.json" in p.stderr


@pytest.mark.parametrize("content, eot, problem", [
    (None, "<|endoftext|>", "cannot read it (No such file or directory)"),
    ("{not json", "<|endoftext|>", "not JSON"),
    ('{"version": "1.0", "model": {"type": "Nonsense"}}', "<|endoftext|>", "not a Hugging Face tokenizer.json"),
    ("[1, 2]", "<|endoftext|>", "not a Hugging Face tokenizer.json"),
    (SHIPPED.read_text(encoding="utf-8"), "</s>", "tokenizer.eot: '</s>' is not a token of"),
])
def test_a_bad_tokenizer_json_is_one_line(tmp_path, content, eot, problem):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be " * 50)
    p = gptx("prepare", text, "-o", tmp_path / "out", "--tokenizer", "hf", "--tokenizer-option", f'path="{path}"',
             "--tokenizer-option", f'eot="{eot}"', cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert problem in lines[0] and "tokenizer" in lines[0], lines[0]


# ---- Node.js: the hf kind and a plugin's tokenizer ----------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_plugin_packages(tmp_path_factory.mktemp("plugins"), ["gptx-travel-plugin"])


@pytest.fixture
def plugin_registry(site, monkeypatch):
    """This process's registry with the travel plugin installed (as `gptx` in a shell would see it)."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("GPTX_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("PYTHONPATH", plugin_env(site)["PYTHONPATH"])  # for the CLI subprocesses too
    registry_mod.use(None)
    yield registry_mod.registry()
    registry_mod.use(None)


@pytest.fixture(scope="module")
def node_modules(request, tmp_path_factory):
    return node_example_modules(request, tmp_path_factory)


def python_greedy(out: Path, prompts, n: int):
    gen = OnnxGenerator(out)
    return gen, [gen.generate([gen.tokenizer.encode(p)], n, Sampler(temperature=0)).ids[0] for p in prompts]


def same_in_node(node_modules, out: Path, prompts) -> None:
    gen, want = python_greedy(out, prompts, 12)
    rows = run_node(node_modules, out, prompts, 12)
    assert [r["prompt_ids"] for r in rows] == [gen.tokenizer.encode(p) for p in prompts]
    assert [r["ids"] for r in rows] == want
    assert [r["text"] for r in rows] == [gen.tokenizer.decode(ids) for ids in want]


PROMPTS = [p for p in ODD if p]  # the Node example refuses an empty prompt


@pytest.mark.slow
@pytest.mark.xdist_group("node")
def test_node_runs_an_hf_kind_export_with_pythons_ids(node_modules, tmp_path):
    out = wandering_export(tmp_path, "hf", seed=3, state=hf_state())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    same_in_node(node_modules, out, PROMPTS)


@pytest.mark.slow
@pytest.mark.xdist_group("node")
def test_node_runs_a_plugin_tokenizer_through_its_tokenizer_json(node_modules, plugin_registry, tmp_path):
    out = wandering_export(tmp_path, "letters", seed=3)
    described = Backend.from_file(str(out / "tokenizer.json"))
    gen = OnnxGenerator(out)
    for text in ODD:
        assert described.encode(text, add_special_tokens=False).ids == gen.tokenizer.encode(text), text
    same_in_node(node_modules, out, PROMPTS)


@pytest.mark.slow
@pytest.mark.xdist_group("node")
def test_a_tokenizer_without_tokenizer_json_exports_for_python_and_is_refused_elsewhere(node_modules, plugin_registry, tmp_path):
    out = wandering_export(tmp_path, "shifted", seed=3)
    assert "tokenizer.json" not in os.listdir(out)
    gen, [ids] = python_greedy(out, ["To be"], 4)  # gptx's Python runs it
    assert len(ids) == 4
    r = node_example(node_modules, out, ["To be"], 4)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "Error: tokenizer 'shifted' has no tokenizer.json, which JavaScript needs (its Tokenizer.tokenizer_json() gives none)"]
    web = gptx("web", out, cwd=tmp_path)
    assert web.returncode == 2 and len(web.stderr.strip().splitlines()) == 1, web.stderr
    assert "tokenizer 'shifted' has no tokenizer.json, which the web page needs" in web.stderr
    ck = tiny_checkpoint(tmp_path / "run", "shifted", **MODEL)
    hf = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert hf.returncode == 2 and hf.stderr.strip().splitlines() == [
        "Error: --format hf: tokenizer 'shifted' has no tokenizer.json, which transformers needs "
        "(its Tokenizer.tokenizer_json() gives none)"], hf.stderr
    assert not (tmp_path / "hf").exists()


# ---- hf_equivalent: the Hugging Face export of a plugin's component -------------------------------------

@pytest.mark.slow  # transformers' import
def test_a_declared_equivalent_exports_to_transformers_and_agrees(plugin_registry, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck_dir = tiny_checkpoint(tmp_path / "run", "letters", **MODEL, attention={"kind": "fast_causal", "tile": 16})
    p = gptx("export", ck_dir, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 0 and "GPT2LMHeadModel" in p.stdout, p.stderr
    ck = checkpoint.load(ck_dir)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ODD:
        assert tok(text)["input_ids"] == ck.tokenizer.encode(text), text  # the plugin's tokenizer, in transformers
    ids = ck.tokenizer.encode("ROMEO: What say you, my lord?")
    with torch.no_grad():
        ours = ck.model.eval()(torch.tensor([ids]))[0]  # [1, T, V]
        theirs = hf(torch.tensor([ids])).logits  # [1, T, V]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_a_component_without_a_declaration_is_refused_naming_it(plugin_registry, tmp_path):
    ck = tiny_checkpoint(tmp_path / "run", "byte", **MODEL, attention={"kind": "plain_causal"})
    p = gptx("export", ck, "--format", "hf", "-o", tmp_path / "hf", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "Error: --format hf: model.attention 'plain_causal' has no GPT2LMHeadModel equivalent "
        "(GPT2LMHeadModel needs model.attention = 'causal' with model.positional = 'learned')"], p.stderr


@pytest.mark.slow
def test_check_plugin_tests_the_declarations(plugin_registry):
    p = gptx("check-plugin", "fast_causal", "relu_claims_gelu", "letters", "--json", timeout=900)
    results = {(r["name"], r["check"]): r for r in json.loads(p.stdout)["results"]}
    assert results[("fast_causal", "hf equivalent")]["status"] == "pass"
    assert results[("letters", "tokenizer.json")]["status"] == "pass"
    false = results[("relu_claims_gelu", "hf equivalent")]
    assert false["status"] == "fail" and "logits against the declared built-in's on the same weights" in false["detail"]
    assert p.returncode != 0
