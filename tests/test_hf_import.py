"""gptx import-hf against real, randomly initialised transformers GPT-2 models (no downloads):
same logits (fp32, 1e-4) and the same greedy continuation as Hugging Face's own generate."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import transformers  # a test dependency: missing is a failure, not a skip

from gptx import checkpoint  # noqa: E402
from gptx.cli import cli  # noqa: E402
from gptx.errors import GptxError  # noqa: E402
from gptx.hf import import_hf  # noqa: E402

PROMPT = "The quick brown fox jumps over"
SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, initializer_range=0.1)


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**(SMALL | overrides))
    return transformers.GPT2LMHeadModel(config).eval()


def save_bin(model, path: pathlib.Path, legacy_names: bool = False):
    """A pytorch_model.bin as older transformers wrote it (transformers 5 only writes safetensors).
    ``legacy_names``: OpenAI-era layout, no ``transformer.`` prefix and the causal-mask buffers."""
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if legacy_names:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        P = model.config.n_positions
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path / "pytorch_model.bin")


@pytest.fixture(scope="module")
def model():
    return hf_model()


@pytest.fixture(scope="module")
def variants(model, tmp_path_factory):
    """The same model saved four ways, each imported: name -> (hf dir, gptx run dir)."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: root / name for name in ("safetensors", "sharded", "bin", "bin-legacy")}
    model.save_pretrained(dirs["safetensors"])
    model.save_pretrained(dirs["sharded"], max_shard_size="1MB")
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    save_bin(model, dirs["bin"])
    save_bin(model, dirs["bin-legacy"], legacy_names=True)
    out = {}
    for name, d in dirs.items():
        run = root / f"gptx-{name}"
        ck = import_hf(d, run)
        assert ck == run / "checkpoints" / "step-000000"
        out[name] = (d, run)
    return out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_ids(n=2, t=24, seed=0):
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["safetensors", "sharded", "bin", "bin-legacy"])
def test_logits_match(model, variants, variant):
    ck = checkpoint.load(variants[variant][1])
    assert ck.config.model.tie_embeddings and ck.model.lm_head.weight is ck.model.wte.weight
    assert ck.config.tokenizer.name == "gpt2" and ck.config.model.block_size == 64
    ids = random_ids()
    with torch.no_grad():
        ours, _ = ck.model(ids)
        cached, _ = ck.model(ids[:, -1:], past_key_values=ck.model(ids[:, :-1])[1])
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(cached[:, -1], ours[:, -1], atol=1e-4, rtol=0)


def hf_greedy(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=50256, eos_token_id=50256)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_greedy_continuation_matches_hf_generate_through_the_cli(model, variants):
    run = variants["safetensors"][1]
    r = subprocess.run(
        [sys.executable, "-m", "gptx", "generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "24",
         "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "GPTX_LOAD_PLUGINS"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == checkpoint.load(run).tokenizer.encode(PROMPT)
    expected = hf_greedy(model, out["prompt_ids"], 24)
    assert out["ids"] == expected
    assert len(set(expected)) > 4, f"degenerate continuation, the comparison proves little: {expected}"


def test_greedy_continuation_bin_in_process(model, variants):
    run = variants["bin-legacy"][1]
    r = CliRunner().invoke(cli, ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "16",
                                 "--temperature", "0", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ids"] == hf_greedy(model, out["prompt_ids"], 16)


def test_untied_lm_head_and_custom_width(tmp_path):
    model = hf_model(seed=1, tie_word_embeddings=False, n_inner=96, layer_norm_epsilon=1e-6,
                     activation_function="gelu_pytorch_tanh")
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ck = checkpoint.load(tmp_path / "run")
    assert not ck.config.model.tie_embeddings and ck.config.model.ffn.options.hidden == 96
    assert ck.config.model.norm.options.eps == 1e-6
    ids = random_ids(seed=3)
    with torch.no_grad():
        ours, _ = ck.model(ids)
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


def test_cli_import_hf_writes_a_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    r = CliRunner().invoke(cli, ["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "step-000000" in r.stdout
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000000" / "gptx.json").read_text())
    assert meta["imported_from"]["format"] == "huggingface-gpt2"
    assert meta["config"]["model"]["attention"]["kind"] == "causal"


# ---- refusals: one clear GptxError (exit 2), nothing written --------------------------------

@pytest.fixture
def hf_dir(model, tmp_path):
    d = tmp_path / "hf"
    model.save_pretrained(d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def expect_refusal(src, out, match):
    with pytest.raises(GptxError, match=match):
        import_hf(src, out)
    assert not out.exists()  # every refusal comes before the output is created (out is new in every caller)


def test_missing_dir(tmp_path):
    expect_refusal(tmp_path / "nope", tmp_path / "out", "no such directory")


def test_missing_config(hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    expect_refusal(hf_dir, tmp_path / "out", "no config.json")


def test_corrupt_config(hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("{not json")
    expect_refusal(hf_dir, tmp_path / "out", r"config.json: corrupted")


def test_not_gpt2_or_llama(hf_dir, tmp_path):
    edit_config(hf_dir, model_type="bert")
    expect_refusal(hf_dir, tmp_path / "out", r"model_type is 'bert'; only GPT-2 \('gpt2'\) and Llama \('llama'\)")


def test_a_gpt2_config_labelled_llama_names_the_missing_llama_key(hf_dir, tmp_path):
    edit_config(hf_dir, model_type="llama")
    expect_refusal(hf_dir, tmp_path / "out", "config.json: hidden_size must be a positive integer, got None")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"vocab_size": 1000}, "vocab_size"),
    ],
)
def test_unsupported_options_are_refused(hf_dir, tmp_path, changes, key):
    edit_config(hf_dir, **changes)
    expect_refusal(hf_dir, tmp_path / "out", f"{key} = .* is not supported")


def test_missing_weights(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    expect_refusal(hf_dir, tmp_path / "out", "no weights")


def test_corrupt_safetensors(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    expect_refusal(hf_dir, tmp_path / "out", "model.safetensors: corrupted")


def test_corrupt_bin(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a weights file " * 100)
    expect_refusal(hf_dir, tmp_path / "out", "pytorch_model.bin: corrupted or not loadable safely")


class Payload:
    """Unpickling this would create a file: proof that an arbitrary object was executed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_bin_with_arbitrary_objects_is_never_unpickled(model, tmp_path):
    d = tmp_path / "hf"
    save_bin(model, d)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "pwned"
    state["transformer.h.0.attn.evil"] = Payload(marker)
    torch.save(state, d / "pytorch_model.bin")
    expect_refusal(d, tmp_path / "out", "not loadable safely")
    assert not marker.exists()


def test_shape_mismatch_with_config(hf_dir, tmp_path):
    edit_config(hf_dir, n_positions=128)
    expect_refusal(hf_dir, tmp_path / "out", r"wpe.weight has shape \[64, 64\], config.json implies \[128, 64\]")


def test_missing_and_unexpected_weights(model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    d = tmp_path / "hf"
    model.config.save_pretrained(d)
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}, str(d / "model.safetensors"))
    expect_refusal(d, tmp_path / "out", "missing weight transformer.h.1.mlp.c_fc.bias")
    save_file(state | {"score.weight": torch.zeros(2, 64)}, str(d / "model.safetensors"))
    expect_refusal(d, tmp_path / "out", "does not have: score.weight")


def test_out_dir_must_be_new_or_empty(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GptxError, match="not an empty directory"):
        import_hf(hf_dir, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(cli, ["import-hf", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "no such directory" in lines[0]
