"""Plugin loading: in-process plugins, overrides, clashes, broken plugins, entry points from a
real distribution on sys.path, GPTX_LOAD_PLUGINS, and plugin-contributed CLI commands."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import gptx
from gptx import registry as registry_mod
from gptx.config import from_dict
from gptx.plugins.attention import CausalSelfAttention
from gptx.plugins.ffn import GeluMLP


class MyAttention(CausalSelfAttention):
    """A third-party attention: the default one under another name."""


class OtherAttention(CausalSelfAttention):
    pass


def plugin(name: str, **hooks):
    """A plugin module named ``name`` whose functions are the given hook implementations."""
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, gptx.hookimpl(fn))
    return mod


def registers(kind_cls_pairs, override=False):
    def hook(register):
        for name, cls in kind_cls_pairs:
            register(name, cls, override=override)
    return hook


def load(*plugins):
    return registry_mod.load(extra_plugins=tuple(plugins))


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch):
    """Built-ins and the test's own plugins only, whatever else is installed (tests below that
    are about entry points set GPTX_LOAD_PLUGINS themselves)."""
    monkeypatch.setenv("GPTX_LOAD_PLUGINS", "")


def test_builtins_register_every_kind():
    reg = load()
    assert reg.errors == []
    assert {"causal", "einsum"} <= set(reg.names("attention"))
    assert {"learned", "sinusoidal", "rope", "alibi", "none"} <= set(reg.names("positional"))
    assert {"gelu", "relu", "swiglu", "geglu"} <= set(reg.names("ffn"))
    assert {"layernorm", "rmsnorm"} <= set(reg.names("norm"))
    assert {"pre", "post", "sandwich"} <= set(reg.names("norm_placement"))
    assert {"gpt2", "tiktoken", "char", "byte"} <= set(reg.names("tokenizer"))
    assert all(reg.plugins[n].builtin for n in registry_mod.BUILTIN_PLUGINS)


def test_in_process_plugin_adds_a_component_that_builds_a_model():
    reg = load(plugin("my_plugin", register_attention=registers([("mine", MyAttention)])))
    assert reg.errors == []
    entry = reg.get("attention", "mine")
    assert entry.cls is MyAttention and entry.plugin.name == "my_plugin" and entry.overrides is None
    assert reg.get("attention", "causal").cls is CausalSelfAttention  # defaults untouched
    assert reg.hooks_of("my_plugin") == ["register_attention"]
    cfg = from_dict({"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 11,
                               "attention": {"kind": "mine"}}, "tokenizer": {"kind": "byte"}}, reg)
    from gptx.model import GPT

    model = GPT(cfg.model)
    assert isinstance(model.blocks[0].attn, MyAttention)
    logits, _ = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 11)


def test_explicit_override_of_a_builtin_wins():
    reg = load(plugin("overrider", register_attention=registers([("causal", MyAttention)], override=True)))
    assert reg.errors == []
    entry = reg.get("attention", "causal")
    assert entry.cls is MyAttention
    assert entry.overrides is not None and entry.overrides.name == "gptx.plugins.attention"


@pytest.mark.parametrize("order", ["plain-first", "override-first"])
def test_explicit_override_wins_regardless_of_order(order):
    plain = plugin("plain_one", register_attention=registers([("x", MyAttention)]))
    over = plugin("overriding_one", register_attention=registers([("x", OtherAttention)], override=True))
    reg = load(*((plain, over) if order == "plain-first" else (over, plain)))
    assert reg.errors == []
    assert reg.get("attention", "x").cls is OtherAttention
    assert reg.get("attention", "x").overrides.name == "plain_one"


def test_duplicate_without_override_is_an_error_naming_both():
    a = plugin("first_plugin", register_attention=registers([("dup", MyAttention)]))
    b = plugin("second_plugin", register_attention=registers([("dup", OtherAttention)]))
    reg = load(a, b)
    [line] = [e for e in reg.errors if "'dup'" in e]
    assert "first_plugin" in line and "second_plugin" in line and "override=True" in line


def test_duplicate_of_a_builtin_without_override_keeps_the_builtin():
    reg = load(plugin("clasher", register_attention=registers([("causal", MyAttention)])))
    [line] = reg.errors
    assert "clasher" in line and "gptx.plugins.attention" in line
    assert reg.get("attention", "causal").cls is CausalSelfAttention


def test_two_overrides_of_one_name_are_an_error():
    a = plugin("over_a", register_attention=registers([("causal", MyAttention)], override=True))
    b = plugin("over_b", register_attention=registers([("causal", OtherAttention)], override=True))
    reg = load(a, b)
    assert any("over_a" in e and "over_b" in e for e in reg.errors)


def test_misspelled_hook_names_the_plugin_and_the_rest_loads():
    typo = plugin("typo_plugin", register_atention=registers([("typo", MyAttention)]))
    good = plugin("good_plugin", register_attention=registers([("good", MyAttention)]))
    reg = load(typo, good)
    [line] = reg.errors
    assert "typo_plugin" in line and "register_atention" in line
    assert "typo_plugin" not in reg.plugins and "typo" not in reg.names("attention")
    assert reg.get("attention", "good").plugin.name == "good_plugin"


def test_hook_with_wrong_argument_is_an_error():
    def register_ffn(reg):  # the spec calls its argument "register"
        reg("wrong", GeluMLP)

    mod = types.ModuleType("wrong_arg")
    mod.register_ffn = gptx.hookimpl(register_ffn)
    reg = load(mod)
    [line] = reg.errors
    assert "wrong_arg" in line
    assert "wrong" not in reg.names("ffn")


def test_a_raising_hook_leaves_the_plugin_out_entirely():
    def register_ffn(register):
        raise RuntimeError("boom in the ffn hook")

    half = plugin("half_plugin", register_attention=registers([("half_attn", MyAttention)]), register_ffn=register_ffn)
    good = plugin("good_plugin", register_attention=registers([("good", MyAttention)]))
    reg = load(half, good)
    [line] = reg.errors
    assert "half_plugin" in line and "register_ffn" in line and "boom in the ffn hook" in line
    assert "half_attn" not in reg.names("attention")  # nothing half-registered
    assert "half_plugin" not in reg.plugins
    assert "good" in reg.names("attention")


@pytest.mark.parametrize("bad", [object, torch.nn.Linear, GeluMLP, "causal"], ids=["object", "nn.Module", "wrong-interface", "string"])
def test_registering_a_non_subclass_is_an_error(bad):
    reg = load(plugin("bad_cls", register_attention=registers([("bad", bad)])))
    [line] = reg.errors
    assert "bad_cls" in line and "Attention" in line
    assert "bad" not in reg.names("attention")


def test_registry_get_suggests_a_name():
    reg = load()
    with pytest.raises(gptx.errors.GptxError, match="did you mean 'causal'"):
        reg.get("attention", "casual")


# ---- third-party distributions, discovered through the `gptx` entry-point group ----------------

PLUGIN_MODULES = {
    "gptxtest_alpha": """
        import gptx
        from gptx.plugins.attention import CausalSelfAttention

        class AlphaAttention(CausalSelfAttention):
            pass

        @gptx.hookimpl
        def register_attention(register):
            register("alpha_attn", AlphaAttention)
    """,
    "gptxtest_beta": """
        import click
        import gptx
        from gptx.plugins.ffn import GeluMLP

        class BetaMLP(GeluMLP):
            pass

        @gptx.hookimpl
        def register_ffn(register):
            register("beta_ffn", BetaMLP)

        @gptx.hookimpl
        def register_commands(cli):
            @cli.command()
            @click.argument("who", default="world")
            def hello(who):
                '''Say hello (added by the beta plugin).'''
                click.echo(f"hello {who} from beta")
    """,
    "gptxtest_broken": """
        import gptx_this_module_does_not_exist
    """,
    "gptxtest_badcmd": """
        import gptx

        @gptx.hookimpl
        def register_commands(cli):
            @cli.command()
            def half():
                pass
            raise RuntimeError("badcmd cannot add its commands")
    """,
}
DISTS = {  # distribution -> (version, entry-point name, module)
    "gptxtest-alpha": ("1.2.3", "alpha", "gptxtest_alpha"),
    "gptxtest-beta": ("0.4", "beta", "gptxtest_beta"),
    "gptxtest-broken": ("0.1", "broken", "gptxtest_broken"),
    "gptxtest-badcmd": ("2.0", "badcmd", "gptxtest_badcmd"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory holding three real installed distributions (dist-info + module each)."""
    root = tmp_path_factory.mktemp("site")
    for module, source in PLUGIN_MODULES.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    for dist, (version, ep_name, module) in DISTS.items():
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[gptx]\n{ep_name} = {module}\n")
    return root


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)


def ours(reg):
    return {name: info for name, info in reg.plugins.items() if name in ("alpha", "beta", "broken")}


def test_entry_point_plugins_load_and_a_broken_one_is_reported(on_path, monkeypatch):
    monkeypatch.delenv("GPTX_LOAD_PLUGINS", raising=False)
    reg = registry_mod.load()
    assert set(ours(reg)) == {"alpha", "beta"}
    alpha = reg.plugins["alpha"]
    assert (alpha.distribution, alpha.version, alpha.module, alpha.builtin) == ("gptxtest-alpha", "1.2.3", "gptxtest_alpha", False)
    assert reg.get("attention", "alpha_attn").plugin.name == "alpha"
    assert reg.get("ffn", "beta_ffn").plugin.distribution == "gptxtest-beta"
    broken = [e for e in reg.errors if "broken" in e]
    assert len(broken) == 1
    assert "gptxtest_broken" in broken[0] and "gptxtest-broken 0.1" in broken[0]
    assert "ModuleNotFoundError" in broken[0]


@pytest.mark.parametrize(
    "selection, expected",
    [("alpha", {"alpha"}), ("alpha, beta", {"alpha", "beta"}), ("", set()), ("nothing_by_this_name", set())],
)
def test_gptx_load_plugins_selects_entry_points(on_path, monkeypatch, selection, expected):
    monkeypatch.setenv("GPTX_LOAD_PLUGINS", selection)
    reg = registry_mod.load()
    assert set(ours(reg)) == expected
    assert not any("broken" in e for e in reg.errors)  # not selected: not even imported
    assert "gptxtest_broken" not in sys.modules
    assert ("alpha_attn" in reg.names("attention")) == ("alpha" in expected)
    assert all(reg.plugins[n].builtin for n in registry_mod.BUILTIN_PLUGINS)  # built-ins always load


def _gptx(site, *args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    env.pop("GPTX_LOAD_PLUGINS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "gptx", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_lists_entry_point_plugins_and_reports_the_broken_one_on_one_line(site):
    r = _gptx(site, "plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["alpha"]["distribution"] == "gptxtest-alpha" and by_name["alpha"]["version"] == "1.2.3"
    assert by_name["beta"]["hooks"] == ["register_commands", "register_ffn"]
    assert "broken" not in by_name
    assert [e for e in data["errors"] if "gptxtest-broken" in e]
    assert "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "gptxtest-broken" in line]  # one warning line

    r = _gptx(site, "components", "ffn")
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:2] == ["ffn", "beta_ffn"] and "beta" in line for line in r.stdout.splitlines())


@pytest.mark.slow
def test_register_commands_plugin_adds_a_cli_command(site):
    r = _gptx(site, "hello", "tester")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello tester from beta"
    r = _gptx(site, "--help")
    assert "hello" in r.stdout
    r = _gptx(site, "hello", env_extra={"GPTX_LOAD_PLUGINS": "alpha"})  # beta not selected: no command
    assert r.returncode == 2 and "No such command 'hello'" in r.stderr


@pytest.mark.slow
def test_a_raising_register_commands_is_one_warning_and_the_cli_still_works(site):
    r = _gptx(site, "--help")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if "badcmd" in x]
    assert "gptxtest-badcmd 2.0" in line and "register_commands" in line and "cannot add its commands" in line
    commands = r.stdout.split("Commands:")[1].split()
    assert "hello" in commands and "generate" in commands and "half" not in commands  # nothing half-added
