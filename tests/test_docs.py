"""Keep the docs true. The plugin author guide (docs/plugins.md), datasette-style: every hook
spec is documented there with its arguments and implemented by some test plugin, every component
interface and capability is documented, and the guide's example plugin really works. The pages
build strictly with MkDocs (a broken link or anchor fails), the README's links resolve, and the
docs' home page is the README."""
from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gptx import base, components, hookspecs

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def guide() -> str:
    return (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")


def hook_specs() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "gptx_spec")
    }


def interfaces() -> list[type]:
    return [
        getattr(components, name)
        for name in components.__all__
        if isinstance(getattr(components, name), type)
        and issubclass(getattr(components, name), base.Component)
        and getattr(components, name) is not base.Component
    ]


def test_there_is_a_hook_and_an_interface_per_kind():
    from gptx.kinds import KINDS

    assert set(hook_specs()) == {k.hook for k in KINDS} | {"register_commands"}
    assert {c.__name__ for c in interfaces()} == {k.interface for k in KINDS}


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_is_documented_with_its_arguments(hook):
    sig = hook_specs()[hook]
    spelled = f"`{hook}({', '.join(sig.parameters)})`"
    assert spelled in guide(), f"docs/plugins.md does not document {spelled}"


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_is_implemented_by_a_test_plugin(hook):
    """Some plugin written by the tests (in a test module or a test plugin package) implements it."""
    pattern = re.compile(rf"^\s*def {hook}\(", re.MULTILINE)
    files = [p for p in TESTS.rglob("*.py") if "build" not in p.parts]
    users = [p.relative_to(TESTS) for p in files if pattern.search(p.read_text(encoding="utf-8"))]
    assert users, f"no test implements the hook {hook}"


@pytest.mark.parametrize("interface", interfaces(), ids=lambda c: c.__name__)
def test_every_interface_is_documented(interface):
    text = guide()
    assert f"**`{interface.__name__}(" in text, f"docs/plugins.md does not document {interface.__name__}"
    for method in interface.__abstractmethods__:
        assert method in text, f"{interface.__name__}.{method} is abstract but not documented"


def test_capabilities_and_register_are_documented():
    text = guide()
    for const, value in (("KV_CACHE", base.KV_CACHE), ("ONNX_EXPORT", base.ONNX_EXPORT),
                         ("ONNX_FUSED_ATTENTION", base.ONNX_FUSED_ATTENTION), ("DEFAULT_SUPPORTS", "DEFAULT_SUPPORTS")):
        assert const in text and value in text
    assert set(base.CAPABILITIES) == {base.KV_CACHE, base.ONNX_EXPORT, base.ONNX_FUSED_ATTENTION}, "a new capability: document it"
    assert base.DEFAULT_SUPPORTS == {base.KV_CACHE, base.ONNX_EXPORT}, "an opt-in capability must not be a default"
    for phrase in ("register(name, cls, override=False)", "GPTX_LOAD_PLUGINS", "[project.entry-points.gptx]",
                   "__post_init__", "check(cls, model, options)", "supports", "c_proj", "Options"):
        assert phrase in text, phrase


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", guide(), re.DOTALL)


def test_the_guides_pyproject_declares_the_entry_point():
    projects = [tomllib.loads(b) for b in _blocks("toml") if "[project]" in b]
    assert projects
    for project in projects:
        (module,) = project["project"]["entry-points"]["gptx"].values()
        assert module.replace("_", "").isalnum()


def test_the_guides_example_plugin_works(tmp_path, monkeypatch):
    """The plugin module of the guide, as written, registers a component that validates its
    options and builds, runs and trains in a model."""
    import torch

    from gptx import registry
    from gptx.config import from_dict
    from gptx.errors import ConfigError
    from gptx.model import GPT

    (code,) = [b for b in _blocks("python") if "@gptx.hookimpl" in b and "import gptx" in b]
    path = tmp_path / "gptx_guide_example.py"
    path.write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("gptx_guide_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gptx_guide_example", module)
    spec.loader.exec_module(module)

    reg = registry.load(extra_plugins=(module,))
    assert reg.errors == []
    entry = reg.get("ffn", "squared_relu")
    assert entry.plugin.name == "gptx_guide_example"
    model_table = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 32}
    cfg = from_dict({"model": {**model_table, "ffn": {"kind": "squared_relu", "hidden": 24}}}, registry=reg)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ids = torch.randint(0, 32, (2, 8))
    assert model(ids)[0].shape == (2, 8, 32)
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    with pytest.raises(ConfigError, match="model.ffn.hidden: must be at least 1"):
        from_dict({"model": {**model_table, "ffn": {"kind": "squared_relu", "hidden": 0}}}, registry=reg)


def test_the_docs_build_strictly(tmp_path):
    """mkdocs.yml sets strict: every warning (a link to a missing page or anchor, a page left out
    of the navigation) fails the build."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "plugins" / "index.html").is_file()


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert {"docs/user-guide.md", "docs/plugins.md", "docs/deploy.md", "docs/performance.md",
            "docs/reliability.md", "docs/architecture.md"} <= set(links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_the_docs_home_page_is_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (ROOT / "docs" / "index.md").read_text(encoding="utf-8") == readme.replace("](docs/", "]("), \
        "docs/index.md must be README.md with its docs/ links made relative: copy it again"
