"""``gptx generate OUT_DIR``: onnxruntime alone (no torch import), KV cache, sampling shared with
PyTorch (same seed, same tokens), stop at end-of-text, batches with left padding, context limit."""
import json
import os
import subprocess
import sys

import pytest

from helpers import tiny_checkpoint

from gptx import checkpoint
from gptx.errors import GptxError
from gptx.export.onnx_export import export_checkpoint
from gptx.export.runtime import OnnxGenerator
from gptx.generate import generate_ids
from gptx.sampling import Sampler

BLOCK = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny GPT-2-vocabulary model, saved and exported once for this module."""
    root = tmp_path_factory.mktemp("onnxgen")
    ck = tiny_checkpoint(root / "run", "gpt2", seed=3, n_layer=2, n_embd=32, block_size=BLOCK)
    tok = checkpoint.build_tokenizer(checkpoint.load(ck).config.tokenizer)
    export_checkpoint(ck, root / "out", log=lambda _m: None)
    return {"ck": ck, "out": root / "out", "model": checkpoint.load(ck).model, "tok": tok, "gen": OnnxGenerator(root / "out")}


PROMPTS = ["The meaning of life is", "Hi", "One, two, three, four, five"]


@pytest.mark.parametrize("sampling", [
    {"temperature": 0},
    {"temperature": 0.8, "seed": 1},
    {"temperature": 1.0, "top_k": 5, "seed": 2},
    {"temperature": 0.9, "top_p": 0.9, "seed": 3},
    {"temperature": 1.2, "top_k": 50, "top_p": 0.95, "seed": 4},
], ids=["greedy", "temperature", "top-k", "top-p", "top-k+top-p"])
def test_same_tokens_as_pytorch_for_every_sampling_mode(exported, sampling):
    prompts = [exported["tok"].encode(p) for p in PROMPTS]
    want = generate_ids(exported["model"], prompts, 12, Sampler(**sampling), exported["tok"].eot_id)
    got = exported["gen"].generate(prompts, 12, Sampler(**sampling))
    assert got.prompt_ids == want.prompt_ids
    assert got.ids == want.ids


def test_a_batch_gives_each_prompt_what_it_gets_alone(exported):
    prompts = [exported["tok"].encode(p) for p in PROMPTS]
    batch = exported["gen"].generate(prompts, 10, Sampler(temperature=0)).ids
    alone = [exported["gen"].generate([p], 10, Sampler(temperature=0)).ids[0] for p in prompts]
    assert batch == alone


def test_stops_each_prompt_at_end_of_text(exported):
    gen, tok = exported["gen"], exported["tok"]
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    free = gen.generate(prompts, 8, Sampler(temperature=0)).ids
    stop = free[0][2]  # pretend the third token of the first prompt is end-of-text
    got = gen.generate(prompts, 8, Sampler(temperature=0), eot_id=stop).ids
    want = generate_ids(exported["model"], prompts, 8, Sampler(temperature=0), eot_id=stop).ids
    assert got == want
    assert got[0] == free[0][: free[0].index(stop) + 1]
    assert gen.eot_id == 50256  # the real default comes from gptx_export.json


def test_past_the_context_each_token_sees_the_last_block_as_in_pytorch(exported):
    """nanoGPT's crop on both runtimes: a prompt longer than the context keeps its last
    BLOCK - 1 tokens; past the context the window is recomputed with positions from its start."""
    tok = exported["tok"]
    text = " ".join(["once upon a time"] * 20)
    prompts = [tok.encode(text), tok.encode(text)[:BLOCK - 5], tok.encode("Hi")]  # longer, near, short
    assert len(prompts[0]) > BLOCK
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "seed": 7}):
        want = generate_ids(exported["model"], prompts, 12, Sampler(**sampling), tok.eot_id)
        got = exported["gen"].generate(prompts, 12, Sampler(**sampling))
        assert got.ids == want.ids and all(len(row) == 12 for row in got.ids)
    greedy = Sampler(temperature=0)
    cropped = exported["gen"].generate([prompts[0][-(BLOCK - 1):]], 12, greedy).ids
    assert cropped == exported["gen"].generate([prompts[0]], 12, greedy).ids


def test_shared_buffer_decoding_matches_the_copying_loop(exported):
    """The default attention exports as GroupQueryAttention and declares past_present_share_buffer,
    so the generator decodes into one preallocated cache per tensor, written in place. Every step's
    logits must equal the loop that feeds each present back as the next past: a left-padded batch,
    through the context and past it (where the window is refilled from the buffer's start)."""
    import numpy as np

    from gptx.export import cache_layout
    from gptx.export.runtime import KVDecoder

    gen, tok = exported["gen"], exported["tok"]
    assert gen.meta["io_contract"]["past_present_share_buffer"] is True
    assert gen.meta["fusions"]["GroupQueryAttention"] == 2
    prompts = [tok.encode(PROMPTS[2]), tok.encode(PROMPTS[1])]
    new = BLOCK + 8 - len(prompts[0])  # 8 tokens past the context
    shared, copying = (KVDecoder(gen.session, gen.n_layer, cache_layout(gen.meta), flag, context=BLOCK) for flag in (True, False))
    a, b = shared.start(prompts, new), copying.start(prompts, new)  # [B, T, V]
    assert shared.past[0].shape() == [2, 2, BLOCK, 16]  # [B, K, capacity, D]: the context at most, not prompt + new
    for _ in range(new - 1):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        nxt = b[:, -1].argmax(-1)  # [B]
        a, b = ((d.step(nxt) if d.length < BLOCK else d.window(nxt, BLOCK)) for d in (shared, copying))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert shared.length == copying.length == BLOCK + 7


def test_empty_prompt_is_an_error(exported):
    with pytest.raises(GptxError, match="must not be empty"):
        exported["gen"].generate([[1], []], 5, Sampler(temperature=0))


def test_session_does_not_spin(exported):
    opts = exported["gen"].session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tampered_tokenizer_state_is_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported["out"], copy)
    meta = json.loads((copy / "gptx_export.json").read_text())
    meta["tokenizer"]["kind"] = "byte"
    (copy / "gptx_export.json").write_text(json.dumps(meta))
    with pytest.raises(GptxError, match="sha256"):
        OnnxGenerator(copy)
    with pytest.raises(GptxError, match="not a gptx export"):
        OnnxGenerator(tmp_path)


@pytest.mark.slow
def test_cli_generate_on_an_export_never_imports_torch(exported):
    code = (
        "import sys\n"
        "from gptx.cli import main\n"
        "sys.argv = ['gptx', 'generate', sys.argv[1], '--prompt', 'Hello there', '--prompt', 'Hi',\n"
        "            '--temperature', '0', '--max-new-tokens', '6', '--json']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('NO-TORCH')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GPTX_LOAD_PLUGINS"}
    r = subprocess.run([sys.executable, "-c", code, str(exported["out"])], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "NO-TORCH"
    rows = [json.loads(x) for x in lines[:-1]]
    tok = exported["tok"]
    prompts = [tok.encode("Hello there"), tok.encode("Hi")]
    want = generate_ids(exported["model"], prompts, 6, Sampler(temperature=0), tok.eot_id).ids
    assert [r["ids"] for r in rows] == want
    assert rows[0]["text"] == tok.decode(want[0])


@pytest.mark.slow
def test_cli_generate_same_json_from_export_and_checkpoint(exported):
    def run(source):
        r = subprocess.run([sys.executable, "-m", "gptx", "generate", str(source), "--prompt", "Once upon",
                            "--temperature", "0.7", "--top-k", "20", "--seed", "5", "--max-new-tokens", "8", "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert run(exported["out"]) == run(exported["ck"])
