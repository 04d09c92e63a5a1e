"""Nothing a user downloads runs code: pickles are refused (safetensors, or torch.load with
weights_only), checkpoint and export metadata are read as data, and plugins come only from
installed entry points. Each attack is a real ``python -m gptx`` process whose working directory
holds the payload (so it is importable: ``python -m`` puts the working directory on sys.path);
a marker file proves whether the attacker's code ran."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import tiny_checkpoint_and_export, write_experiment

from gptx.config import load_experiment

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this touches a file: proof that an arbitrary object was executed."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def evil_module(d: Path, name: str = "evil") -> Path:
    """A module that, once imported, touches d/MARKER (and offers a class, to look plausible)."""
    marker = d / "MARKER"
    (d / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Tok: pass\nclass Attn: pass\n"
        "def register_attention(register): pass\n")
    return marker


def gptx_in(d: Path, *args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "GPTX_LOAD_PLUGINS"} | (env or {})
    return subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], cwd=d, env=full, capture_output=True,
                          text=True, timeout=300)


# ---- attacks: each sets up a directory and returns (CLI args, env, what the error must say) ----

def attack_trainer_pt_on_resume(d: Path, art):
    """A run to resume whose trainer.pt is a malicious pickle."""
    shutil.copytree(art.run_root, d / "runs")
    (ck,) = (d / "runs").glob("e/*/checkpoints/step-*")
    torch.save({"step": 2, "optimizer": Payload(d / "MARKER")}, ck / "trainer.pt")
    f = write_experiment(d / "e.toml")
    return ["run", f, "--resume", "--quiet"], {}, ["trainer.pt", "cannot be loaded safely"]


def attack_trainer_pt_on_generate(d: Path, art):
    """generate never reads trainer.pt at all: it works and the payload stays inert."""
    ck = Path(shutil.copytree(art.ckpt, d / "ck"))
    torch.save({"step": 1, "x": Payload(d / "MARKER")}, ck / "trainer.pt")
    return ["generate", ck, "--prompt", "hi", "--max-new-tokens", "2"], {}, None


def attack_pytorch_model_bin(d: Path, art):
    """gptx import-hf of a Hugging Face directory whose pytorch_model.bin runs code."""
    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 4,
                                                "vocab_size": 50257, "n_positions": 8}))
    torch.save({"transformer.wte.weight": torch.zeros(50257, 4), "transformer.h.0.attn.evil": Payload(d / "MARKER")},
               hf / "pytorch_model.bin")
    return ["import-hf", hf, "-o", d / "out"], {}, ["pytorch_model.bin", "not loadable safely"]


def attack_export_metadata_class(d: Path, art):
    """An export whose gptx_export.json names the attacker's module as the tokenizer class."""
    ex = Path(shutil.copytree(art.export, d / "ex"))
    evil_module(ex)
    meta = json.loads((ex / "gptx_export.json").read_text())
    meta["tokenizer"]["class"] = "evil:Tok"  # the tokenizer hash covers kind, options, state: still matches
    (ex / "gptx_export.json").write_text(json.dumps(meta))
    return ["generate", ".", "--prompt", "hi", "--max-new-tokens", "2"], {"cwd": ex}, ["evil:Tok", "not from gptx or an installed gptx plugin"]


def attack_checkpoint_config_names_a_module(d: Path, art):
    """A checkpoint whose gptx.json names a module as a component: names go through the registry."""
    ck = Path(shutil.copytree(art.ckpt, d / "ck"))
    evil_module(d)
    meta = json.loads((ck / "gptx.json").read_text())
    meta["config"]["model"]["attention"]["kind"] = "evil:Attn"
    meta["config"]["tokenizer"]["kind"] = "evil"
    (ck / "gptx.json").write_text(json.dumps(meta))
    return ["generate", ck, "--prompt", "hi"], {}, ["gptx.json", "unknown"]


def attack_experiment_names_a_module(d: Path, art):
    """An experiment file that names a module (and GPTX_LOAD_PLUGINS that names one too)."""
    evil_module(d)
    f = write_experiment(d / "e.toml", '\n[model.attention]\nkind = "evil"\n')
    return ["validate", f], {"GPTX_LOAD_PLUGINS": "evil"}, ["model.attention.kind", "unknown attention 'evil'"]


def attack_plugins_from_the_working_directory(d: Path, art):
    """GPTX_LOAD_PLUGINS selects installed entry points by name: a module in the working
    directory is not one, whatever its name."""
    evil_module(d)
    return ["plugins", "--json"], {"GPTX_LOAD_PLUGINS": "evil"}, None


ATTACKS = [attack_trainer_pt_on_resume, attack_trainer_pt_on_generate, attack_pytorch_model_bin,
           attack_export_metadata_class, attack_checkpoint_config_names_a_module, attack_experiment_names_a_module,
           attack_plugins_from_the_working_directory]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A short real run (to resume) and a tiny byte-level checkpoint with its ONNX export."""
    from gptx.training.trainer import train

    root = tmp_path_factory.mktemp("artefacts")
    (root / "exp").mkdir()
    result = train(load_experiment(write_experiment(root / "exp" / "e.toml"),
                                   ["training.max_steps=2", "training.sample_tokens=0"]), progress=False)
    run_file = result.run_dir / "run.json"
    run_file.write_text(json.dumps(json.loads(run_file.read_text()) | {"status": "KILLED"}))  # resumable
    ck, _ = tiny_checkpoint_and_export(root, 32)
    return type("Artefacts", (), {"run_root": root / "exp" / "runs", "ckpt": ck, "export": root / "export"})


@pytest.fixture(scope="module")
def outcomes(artefacts, tmp_path_factory):
    def one(attack):
        d = tmp_path_factory.mktemp(attack.__name__)
        args, env, expect = attack(d, artefacts)
        cwd = env.pop("cwd", d)
        return attack.__name__, (d, gptx_in(cwd, *args, env=env), expect)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, ATTACKS))


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__.removeprefix("attack_") for a in ATTACKS])
def test_attacker_code_never_runs(attack, outcomes):
    d, p, expect = outcomes[attack.__name__]
    markers = list(d.rglob("MARKER"))
    assert not markers, f"the attacker's code ran: {markers}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    if expect is None:  # the command has nothing to refuse: it works, ignoring the payload
        assert p.returncode == 0, p.stderr
        return
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    for fragment in expect:
        assert fragment in lines[0], lines[0]


def test_plugins_json_lists_no_module_from_the_working_directory(outcomes):
    _, p, _ = outcomes["attack_plugins_from_the_working_directory"]
    listed = json.loads(p.stdout)
    assert all(pl["builtin"] for pl in listed["plugins"]) and "evil" not in p.stdout


def test_checkpoint_loading_uses_no_pickle_beyond_weights_only():
    """The code paths that read user files: safetensors for weights, torch.load only with
    weights_only=True (a guard against a future edit dropping it)."""
    import re

    root = Path(__file__).resolve().parents[1]
    for f in [*root.glob("core/*.py"), *root.glob("export/*.py"), *root.glob("plugins/*.py")]:
        text = f.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{f.name}: {call}"
        assert "pickle.load" not in text and "import pickle" not in text, f.name
