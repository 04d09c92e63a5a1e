"""The foundation's commands: plugins, components, generate. CliRunner for most, real
subprocesses (``python -m gptx``) for a few."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from helpers import tiny_checkpoint

from gptx import registry as registry_mod
from gptx.cli import cli
from gptx.kinds import KINDS

BLOCK = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny byte-level model (random weights): the run directory."""
    run = tmp_path_factory.mktemp("run")
    tiny_checkpoint(run, n_layer=2, n_embd=32, block_size=BLOCK)
    return run


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def gen_json(ckpt, *args, prompt="Hi"):
    r = invoke("generate", str(ckpt), "--prompt", prompt, "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def run_gptx(*args):
    env = dict(os.environ)
    env.pop("GPTX_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "gptx", *args], capture_output=True, text=True, timeout=120, env=env)


# ---- plugins / components --------------------------------------------------------------------

def test_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom gptx.cli import cli\n"
            "r = CliRunner().invoke(cli, ['--help'])\nprint(r.exit_code, 'torch' in sys.modules)\nprint(r.output)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    status, _, help_text = proc.stdout.partition("\n")
    assert status == "0 False"  # built-in plugins add no commands: --help needs neither them nor torch
    commands = help_text.split("Commands:")[1].split()
    assert {"run", "generate", "export", "bench", "plugins", "components", "validate", "sweep", "compare", "import-hf"} <= set(commands)


def test_plugins_lists_the_builtins_with_their_hooks():
    r = invoke("plugins")
    assert r.exit_code == 0
    for name in registry_mod.BUILTIN_PLUGINS:
        assert name in r.stdout
    assert "register_attention" in r.stdout


def test_plugins_json():
    r = invoke("plugins", "--json")
    data = json.loads(r.stdout)
    rows = {p["name"]: p for p in data["plugins"]}
    att = rows["gptx.plugins.attention"]
    assert att["builtin"] is True and att["distribution"] == "gptx" and att["hooks"] == ["register_attention"]
    assert rows["gptx.plugins.norm"]["hooks"] == ["register_norm", "register_norm_placement"]
    assert isinstance(data["errors"], list)


def test_components_lists_every_kind():
    r = invoke("components")
    assert r.exit_code == 0
    kinds = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert kinds >= {k.name for k in KINDS}
    assert any(line.split()[:2] == ["attention", "causal"] and "kv_cache" in line for line in r.stdout.splitlines())


def test_components_of_one_kind_json():
    r = invoke("components", "attention", "--json")
    rows = json.loads(r.stdout)
    assert {row["kind"] for row in rows} == {"attention"}
    causal = next(row for row in rows if row["name"] == "causal")
    assert causal["plugin"] == "gptx.plugins.attention"
    assert set(causal["supports"]) == {"kv_cache", "onnx_export", "onnx_fused_attention"}
    assert causal["class"] == "gptx.plugins.attention.CausalSelfAttention"


def test_components_unknown_kind_is_one_line_exit_2():
    r = invoke("components", "atention")
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'atention' is neither a component kind nor a registered component" in lines[0] and "did you mean 'attention'" in lines[0]


# ---- generate --------------------------------------------------------------------------------

def test_generate_json_shape(ckpt):
    out = gen_json(ckpt, "--max-new-tokens", "7", "--temperature", "0")
    assert set(out) == {"prompt_ids", "ids", "text"}
    assert out["prompt_ids"] == list(b"Hi")
    assert len(out["ids"]) == 7 and all(0 <= i < 256 for i in out["ids"])  # byte vocab: no end-of-text
    assert out["text"] == bytes(out["ids"]).decode("utf-8", errors="replace")


def test_generate_greedy_is_deterministic_and_equals_top_k_1(ckpt):
    a = gen_json(ckpt, "--max-new-tokens", "12", "--temperature", "0")
    b = gen_json(ckpt, "--max-new-tokens", "12", "--temperature", "0")
    k1 = gen_json(ckpt, "--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "1", "--seed", "5")
    assert a == b == k1


def test_generate_seed_determinism_with_temperature(ckpt):
    args = ("--max-new-tokens", "24", "--temperature", "1.0")
    s1 = gen_json(ckpt, *args, "--seed", "1")
    assert s1 == gen_json(ckpt, *args, "--seed", "1")
    assert s1["ids"] != gen_json(ckpt, *args, "--seed", "2")["ids"]
    nucleus = ("--top-p", "0.9", "--top-k", "50", "--seed", "3")
    assert gen_json(ckpt, *args, *nucleus) == gen_json(ckpt, *args, *nucleus)


def test_generate_batch_rows_equal_single_prompts(ckpt):
    prompts = ["Hello there", "Yo", "abc"]
    r = invoke("generate", str(ckpt), *[x for p in prompts for x in ("--prompt", p)], "--json",
               "--max-new-tokens", "6", "--temperature", "0")
    batch = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt_ids"] for row in batch] == [list(p.encode()) for p in prompts]
    for p, row in zip(prompts, batch):
        assert row == gen_json(ckpt, "--max-new-tokens", "6", "--temperature", "0", prompt=p)


def test_generate_plain_output_is_prompt_plus_text(ckpt):
    out = gen_json(ckpt, "--max-new-tokens", "5", "--temperature", "0")
    r = invoke("generate", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "0")
    assert r.stdout == "Hi" + out["text"] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--prompt", ""), "must not be empty"),
    ],
    ids=["empty"],
)
def test_generate_bad_prompt_is_one_line_exit_2(ckpt, args, message):
    r = invoke("generate", str(ckpt), *args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_generate_missing_checkpoint(tmp_path):
    r = invoke("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert r.exit_code == 2 and "no such checkpoint directory" in r.stderr


# ---- the same through real processes ----------------------------------------------------------

@pytest.mark.slow
def test_subprocess_generate_matches_in_process(ckpt):
    r = run_gptx("generate", str(ckpt), "--prompt", "Hi", "--json", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == gen_json(ckpt, "--max-new-tokens", "8", "--temperature", "0")


@pytest.mark.slow
def test_subprocess_prompt_past_the_context_is_cropped_with_a_note(ckpt):
    args = ("--max-new-tokens", "6", "--temperature", "0", "--json")
    r = run_gptx("generate", str(ckpt), "--prompt", "ab" * BLOCK, *args)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [f"Note: the prompt and 6 new tokens pass the model's context of {BLOCK} tokens: "
                                             f"from there on each new token sees the last {BLOCK} (nanoGPT's crop)"]
    cropped = run_gptx("generate", str(ckpt), "--prompt", ("ab" * BLOCK)[-(BLOCK - 1):], *args)
    assert json.loads(r.stdout)["ids"] == json.loads(cropped.stdout)["ids"]


@pytest.mark.slow
def test_subprocess_components_json_and_unknown_kind():
    r = run_gptx("components", "positional", "--json")
    assert r.returncode == 0, r.stderr
    assert {row["name"] for row in json.loads(r.stdout)} >= {"learned", "rope", "alibi", "sinusoidal", "none"}
    r = run_gptx("components", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("message, line", [("", ""), ("\n", ""), ("  \n\n first \nsecond", "first")])
def test_an_exception_with_an_empty_or_multiline_message_gives_one_line(message, line):
    from gptx.cli import error_line
    from gptx.errors import first_line

    assert first_line(RuntimeError(message)) == line
    text, code = error_line(RuntimeError(message))
    assert code == 1 and "\n" not in text and text.startswith(f"internal error: RuntimeError: {line}")
