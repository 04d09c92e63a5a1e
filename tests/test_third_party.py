"""Third-party plugin packages, for real: pip builds and installs the two packages under
tests/plugin_packages (their own pyproject.toml, the ``gptx`` entry-point group) and the real CLI
runs in subprocesses that see them.

- gptx-example-plugin: one component of every kind (ffn ``squared_relu``, positional
  ``relative_bias`` (declares KV_CACHE only), norm ``scalenorm``, norm placement ``final_only``,
  tokenizer ``words``) and the command ``gptx example-info``.
- gptx-broken-plugin: entry point ``explodes`` raises on import, ``misspelled`` implements
  ``register_fnn``. Each must give one clear line and leave everything else working.

The packages go into a ``pip install --target`` directory put on PYTHONPATH (gptx itself comes
from the running environment, as it would for a plugin installed next to it): seconds, no
network where setuptools is installed, and the same inside a tox virtualenv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import install_plugin_packages

pytestmark = pytest.mark.slow  # no xdist group: each worker installs into its own directory (seconds)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "tinyshakespeare.txt"
EXAMPLE_DIST, BROKEN_DIST = "gptx-example-plugin", "gptx-broken-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build and install both packages into a fresh target directory; returns it."""
    target = install_plugin_packages(tmp_path_factory.mktemp("plugins"), [EXAMPLE_DIST, BROKEN_DIST])
    assert {p.name for p in target.glob("*.dist-info")} == {
        "gptx_example_plugin-0.1.0.dist-info",
        "gptx_broken_plugin-0.0.1.dist-info",
    }
    return target


def gptx(site: Path, *args, load: str | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run ``python -m gptx ARGS`` seeing the installed plugins; ``load`` sets GPTX_LOAD_PLUGINS."""
    env = dict(os.environ)
    env.pop("GPTX_LOAD_PLUGINS", None)
    if load is not None:
        env["GPTX_LOAD_PLUGINS"] = load
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "gptx", *args], capture_output=True, text=True, env=env, cwd=cwd or site.parent,
        timeout=timeout,
    )


def python(site: Path, code: str, timeout: int = 300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    env.pop("GPTX_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=site.parent, timeout=timeout)


def broken_lines(stderr: str) -> dict[str, list[str]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {ep: [line for line in lines if f"plugin {ep} " in line] for ep in ("explodes", "misspelled")}


def test_components_lists_the_plugin_components(site):
    proc = gptx(site, "components")
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:3]) for line in proc.stdout.splitlines()}
    assert ("ffn", "squared_relu", "example") in rows
    assert ("positional", "relative_bias", "example") in rows
    assert {("norm", "scalenorm", "example"), ("norm_placement", "final_only", "example"), ("tokenizer", "words", "example")} <= rows
    assert ("ffn", "gelu", "gptx.plugins.ffn") in rows  # the built-ins are all still there

    proc = gptx(site, "components", "--json")
    assert proc.returncode == 0, proc.stderr
    by_name = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    sq = by_name["ffn", "squared_relu"]
    assert (sq["plugin"], sq["distribution"], sq["version"]) == ("example", EXAMPLE_DIST, "0.1.0")
    assert sq["class"] == "gptx_example_plugin.plugin.SquaredReluMLP"
    assert set(sq["supports"]) == {"kv_cache", "onnx_export"}
    assert by_name["positional", "relative_bias"]["supports"] == ["kv_cache"]  # declared: no ONNX export
    assert ("ffn", "never") not in by_name  # the misspelled hook registered nothing
    assert by_name["ffn", "gelu"]["distribution"] == "gptx"


def test_plugins_json_shows_the_plugin_and_the_errors(site):
    proc = gptx(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    ex = plugins["example"]
    assert ex["module"] == "gptx_example_plugin.plugin"
    assert (ex["distribution"], ex["version"], ex["builtin"]) == (EXAMPLE_DIST, "0.1.0", False)
    assert ex["hooks"] == [
        "register_commands", "register_ffn", "register_norm", "register_norm_placement", "register_positional",
        "register_tokenizer",
    ]
    assert "explodes" not in plugins and "misspelled" not in plugins
    assert len(data["errors"]) == 2
    errors = broken_lines("\n".join(data["errors"]))
    assert len(errors["explodes"]) == len(errors["misspelled"]) == 1


def test_broken_plugin_is_one_clear_line_and_everything_else_works(site):
    proc = gptx(site, "components", "ffn")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = broken_lines(proc.stderr)
    (explodes,) = lines["explodes"]  # exactly one line each
    (misspelled,) = lines["misspelled"]
    for line, module in ((explodes, "gptx_broken_plugin.explodes"), (misspelled, "gptx_broken_plugin.misspelled")):
        assert f"({module}) from {BROKEN_DIST} 0.0.1" in line, line
    assert "ImportError" in explodes and "frobnicate" in explodes
    assert "register_fnn" in misspelled
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 2  # nothing else on stderr
    assert "squared_relu" in proc.stdout and "swiglu" in proc.stdout
    # a plugin-contributed command works next to the broken plugins
    proc = gptx(site, "example-info")
    assert proc.returncode == 0, proc.stderr
    assert "squared_relu" in proc.stdout


def test_gptx_load_plugins_selects_third_party_plugins(site):
    none = gptx(site, "components", "--json", load="")
    assert none.returncode == 0, none.stderr
    assert none.stderr.strip() == ""  # the broken ones are not even imported
    names = {r["name"] for r in json.loads(none.stdout)}
    assert not names & {"squared_relu", "relative_bias", "scalenorm", "final_only", "words"}
    assert {"gelu", "swiglu", "causal", "rope", "byte"} <= names
    assert gptx(site, "example-info", load="").returncode != 0  # its command is gone too

    only = gptx(site, "plugins", "--json", load="example")
    assert only.returncode == 0 and only.stderr.strip() == ""
    data = json.loads(only.stdout)
    assert "example" in {p["name"] for p in data["plugins"]} and data["errors"] == []


TRAIN_AND_DECODE = textwrap.dedent(
    """
    import json, torch
    from gptx import registry
    from gptx.config import from_dict
    from gptx.model import GPT

    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves the other core to xdist
    assert registry.registry().get("ffn", "squared_relu").plugin.distribution == "gptx-example-plugin"
    text = open(DATA, encoding="utf-8").read()[:20000]
    ids = torch.tensor(list(text.encode("utf-8")))
    batch = torch.stack([ids[s : s + 33] for s in range(0, 8 * 2000, 2000)])  # [8, 33] real text, bytes
    out = {}
    for table in ({"ffn": {"kind": "squared_relu", "hidden": 96}},
                  {"positional": {"kind": "relative_bias", "max_distance": 16}}):
        cfg = from_dict({"model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64,
                                   "vocab_size": 256, **table}, "tokenizer": {"kind": "byte"}})
        torch.manual_seed(0)
        model = GPT(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(25):
            loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
            opt.zero_grad(); loss.backward(); opt.step()
            losses.append(loss.item())
        model.eval()
        x = batch[:2, :20]
        with torch.no_grad():
            full, _ = model(x)
            past, steps = model.empty_cache(2), []
            for a, b in [(0, 6), (6, 7)] + [(t, t + 1) for t in range(7, 20)]:
                logits, past = model(x[:, a:b], past_key_values=past)
                steps.append(logits)
        diff = (torch.cat(steps, 1) - full).abs().max().item()
        out[next(iter(table))] = {"first": losses[0], "last": losses[-1], "cache_diff": diff}
    print(json.dumps(out))
    """
)


def test_model_with_plugin_components_trains_and_decodes_with_cache(site):
    proc = python(site, f"DATA = {str(DATA)!r}\n" + TRAIN_AND_DECODE)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for slot, r in results.items():
        assert r["last"] < 0.7 * r["first"], (slot, r)
        assert r["cache_diff"] < 1e-4, (slot, r)


def test_plugin_options_are_validated_through_the_cli(site, tmp_path):
    exp = tmp_path / "bad.toml"
    exp.write_text(
        f'[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n'
        f'[model.positional]\nkind = "relative_bias"\nmax_distance = 0\n'
        f'[tokenizer]\nkind = "byte"\n[data]\npath = {json.dumps(str(DATA))}\n'
    )
    proc = gptx(site, "validate", str(exp), cwd=tmp_path, load="example")  # not the broken ones: their warnings
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model.positional.max_distance" in proc.stderr and "at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gptx_run_trains_with_the_plugin_component(site, tmp_path):
    exp = tmp_path / "squared_relu.toml"
    exp.write_text(textwrap.dedent(
        f"""
        # a tiny model whose every component but attention comes from the third-party package
        [model]
        n_layer = 2
        n_head = 2
        n_embd = 32
        block_size = 32

        [model.positional]
        kind = "relative_bias"
        max_distance = 16

        [model.ffn]
        kind = "squared_relu"

        [model.norm]
        kind = "scalenorm"
        placement = "final_only"

        [tokenizer]
        kind = "words"   # learned from the data, rebuilt from the checkpoint's tokenizer state

        [data]
        path = {json.dumps(str(DATA))}

        [training]
        batch_size = 4
        learning_rate = 3e-3
        warmup_steps = 2
        eval_interval = 10
        eval_steps = 2
        log_interval = 5
        sample_tokens = 20
        """
    ))
    proc = gptx(site, "run", str(exp), "--set", "training.max_steps=10", "--set", "tracking.enabled=false",
                "--set", "training.threads=1", "--quiet", cwd=tmp_path, load="example")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val loss" in proc.stdout
    checkpoint = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("checkpoint:"))
    assert Path(checkpoint).is_relative_to((tmp_path / "runs").resolve()), checkpoint  # out_dir resolved: an absolute path
    assert (Path(checkpoint) / "model.safetensors").is_file()
    # the checkpoint names the plugin's component, and generating from it uses the KV cache path
    gen = gptx(site, "generate", checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
               "--json", cwd=tmp_path, load="example")
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["ids"]) == 8
    # without the plugin the checkpoint cannot be rebuilt, and the error says which component is missing
    missing = gptx(site, "generate", checkpoint, "--prompt", "ROMEO:", cwd=tmp_path, load="")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    # the components resolve in the order of gptx.kinds.KINDS: positional is the first from the plugin
    assert missing.stderr.count("\n") == 1, missing.stderr
    assert "config.model.positional.kind: unknown positional 'relative_bias'" in missing.stderr, missing.stderr


def test_check_plugin_runs_the_contract_on_the_plugin_components(site):
    """The plugin author's check, without a gptx checkout: ``gptx check-plugin`` on the installed
    plugin's components (forward, cached decoding, left padding, ONNX export where declared,
    training, determinism, checkpoints; the tokenizer's round trip)."""
    names = ["squared_relu", "relative_bias", "scalenorm", "final_only", "words"]
    proc = gptx(site, "check-plugin", *names, "--json", load="example", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.lstrip().startswith("{"), proc.stdout[:2000] + proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert {r["name"] for r in results} == set(names)
    assert not [r for r in results if r["status"] == "fail"]
    not_applicable = {(r["name"], r["check"]) for r in results if r["status"] == "n/a"}
    assert not_applicable == {("relative_bias", "ONNX export")}  # it declares kv_cache only
    # gptx's own menu tests run the same kit over every installed component
    env = dict(os.environ, GPTX_LOAD_PLUGINS="example")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    menu = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_menu.py"), "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-k", "squared_relu or scalenorm"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert menu.returncode == 0 and "18 passed" in menu.stdout, menu.stdout[-3000:]
