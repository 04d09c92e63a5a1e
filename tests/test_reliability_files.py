"""Stored files are validated whole before use (issue 26, cause 4): a checkpoint's gptx.json, an
export's gptx_export.json and model.onnx, a prepared directory's gptx_data.json and the tokenizer
state inside each. Every tampering below, at any nesting level, must be exit 2 and one line
``Error: FILE: key.path: problem`` through the real CLI, with nothing created."""
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import gptx, once, tiny_checkpoint_and_export, write_experiment

CHARS = list(" \nabcdefghijklmnopqrstuvwxyz")
TEXT = ("the quick brown fox jumps over the lazy dog\n" * 600)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A char checkpoint and its export, a prepared char dataset and its text: built once."""
    def make():
        root = tmp_path_factory.mktemp("stored")
        ck, ex = tiny_checkpoint_and_export(root, tokenizer="char", state={"chars": CHARS})
        text = root / "text.txt"
        text.write_text(TEXT)
        gptx("prepare", text, "-o", root / "data", "--tokenizer", "char", "--shard-tokens", 5000, "--quiet", check=True)
        return type("Art", (), {"ck": Path(ck), "ex": Path(ex), "data": root / "data", "text": text})
    return once("reliability-files", make)


def one_line_error(r, *fragments) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


def tampered(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of directory ``src`` whose JSON file ``name`` was changed in place by ``edit(meta)``."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / name).read_text())
    edit(meta)
    (dst / name).write_text(json.dumps(meta))
    return dst


def at(path: str, value):
    """An edit setting the dotted ``path`` (``a.b[0].c``) to ``value``; ``DELETE`` removes it."""
    def edit(meta):
        *parents, last = _parts(path)
        node = meta
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


DELETE = object()


def _parts(path: str) -> list:
    out = []
    for piece in path.split("."):
        name, *indexes = piece.replace("]", "").split("[")
        out += [name] + [int(i) for i in indexes]
    return out


def rehashed(edit):
    """``edit`` on an export's or manifest's tokenizer table, then its sha256 recomputed: a
    tampering that a hash alone does not catch."""
    from gptx.export import tokenizer_hash

    def both(meta):
        edit(meta)
        tok = meta["tokenizer"]
        tok["sha256"] = tokenizer_hash(tok["kind"], tok["options"], tok["state"])
    return both


def dup_char(meta_state):
    meta_state["chars"][5] = meta_state["chars"][2]


# ---- gptx.json (a checkpoint) ----------------------------------------------------------------

CHECKPOINT = {
    "step as text": (at("step", "1"), "step"),
    "negative step": (at("step", -1), "step"),
    "step beyond int64": (at("step", 2**70), "step"),
    "step NaN": (at("step", float("nan")), "step"),
    "config a list": (at("config", []), "config"),
    "config missing": (at("config", DELETE), "config: missing"),
    "n_layer as text": (at("config.model.n_layer", "1"), "config.model.n_layer"),
    "n_embd negative": (at("config.model.n_embd", -16), "config.model.n_embd"),
    "block_size huge float": (at("config.model.block_size", 1e300), "config.model.block_size"),
    "model a list": (at("config.model", [1, 2]), "config.model"),
    "tokenizer table a string": (at("config.tokenizer", "char"), "config.tokenizer"),
    "tokenizer_state a list": (at("tokenizer_state", ["a"]), "tokenizer_state"),
    "chars a string": (at("tokenizer_state.chars", "abc"), "tokenizer_state.chars"),
    "chars empty": (at("tokenizer_state.chars", []), "tokenizer_state.chars"),
    "chars missing": (at("tokenizer_state", {}), "tokenizer_state.chars: missing"),
    "a char of two characters": (at("tokenizer_state.chars[3]", "ab"), "tokenizer_state.chars[3]: expected one character"),
    "a char a number": (at("tokenizer_state.chars[0]", 7), "tokenizer_state.chars[0]"),
    "a duplicated char": (lambda m: dup_char(m["tokenizer_state"]), "tokenizer_state.chars[5]: 'a' is already id 2"),
    "a shortened vocabulary": (lambda m: m["tokenizer_state"]["chars"].pop(), "tokenizer_state_sha256: does not match"),
    "tokenizer hash not a hash": (at("tokenizer_state_sha256", "zz"), "tokenizer_state_sha256"),
    "vocab size disagrees": (at("tokenizer_vocab_size", 5), "tokenizer_vocab_size: 5"),
    "format_version as text": (at("format_version", "1"), "format_version"),
    "mlflow_run_id a table": (at("mlflow_run_id", {"a": 1}), "mlflow_run_id"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT))
def test_a_tampered_checkpoint_is_one_line_naming_file_and_key(art, tmp_path, case):
    edit, key = CHECKPOINT[case]
    ck = tampered(art.ck, tmp_path / "ck", "gptx.json", edit)
    one_line_error(gptx("generate", ck, "--prompt", "ab", "--max-new-tokens", "2"), f"{ck / 'gptx.json'}: {key}")


@pytest.mark.parametrize("use", ["init_from", "resume", "export"])
def test_every_command_reading_a_checkpoint_validates_it_first(art, tmp_path, use):
    """training.init_from, --resume and gptx export read the same gptx.json through one schema,
    and refuse a tampered one before creating anything."""
    edit, key = CHECKPOINT["a duplicated char"]
    exp = write_experiment(tmp_path / "exp.toml", data=art.text)
    if use == "init_from":
        ck = tampered(art.ck, tmp_path / "ck", "gptx.json", edit)
        exp.write_text(exp.read_text().replace("max_steps = 20", f'max_steps = 20\ninit_from = "{ck}"'))
        r = gptx("run", exp)
    elif use == "resume":  # an interrupted run of this experiment with a tampered checkpoint
        run = tmp_path / "runs" / "exp" / "run-1" / "checkpoints"
        run.mkdir(parents=True)
        ck = tampered(art.ck, run / "step-000001", "gptx.json", edit)
        r = gptx("run", exp, "--resume")
    else:
        ck = tampered(art.ck, tmp_path / "ck", "gptx.json", edit)
        r = gptx("export", ck, "-o", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    one_line_error(r, f"{ck / 'gptx.json'}: {key}")
    if use != "resume":
        assert not (tmp_path / "runs").exists()


# ---- gptx_export.json and model.onnx (an export) ----------------------------------------------

EXPORT = {
    "n_layer as text": (at("model.n_layer", "1"), "model.n_layer"),
    "context zero": (at("model.context_length", 0), "model.context_length"),
    "context huge": (at("model.context_length", 10**12), "model.context_length"),
    "vocab negative": (at("model.vocab_size", -1), "model.vocab_size"),
    "model a list": (at("model", [1]), "model"),
    "head_dim missing": (at("model.head_dim", DELETE), "model.head_dim: missing"),
    "cache a table": (at("cache", {}), "cache"),
    "cache empty": (at("cache", []), "cache"),
    "cache dtype unknown": (at("cache[0].dtype", "float64"), "cache[0].dtype"),
    "cache dims a string": (at("cache[0].dims", "x"), "cache[0].dims"),
    "cache name missing": (at("cache[1].name", DELETE), "cache[1].name: missing"),
    "cache seq_axis outside": (at("cache[0].seq_axis", 9), "cache[0].seq_axis"),
    "cache dtype not the graph's": (at("cache[0].dtype", "float16"), "past_key_values.0.key is tensor(float)"),
    "cache dims not the graph's": (lambda m: m["cache"][0]["dims"].__setitem__(3, 9), "has shape"),
    "context not the graph's": (at("model.context_length", 64), "model.context_length: 64 here, 32 in the graph"),
    "io_contract a string": (at("io_contract", "gptx.decoder"), "io_contract"),
    "io_contract version": (at("io_contract.version", 2), "io_contract.version"),
    "io_contract version true": (at("io_contract.version", True), "io_contract.version"),
    "cache dim negative": (at("cache[0].dims[1]", -2), "cache[0].dims[1]"),
    "io_contract inputs": (at("io_contract.inputs", ["x"]), "io_contract.inputs"),
    "shared buffer flag as text": (at("io_contract.past_present_share_buffer", "yes"), "io_contract.past_present_share_buffer"),
    "special tokens a list": (at("special_tokens", []), "special_tokens"),
    "eot beyond the vocabulary": (at("special_tokens", {"eot": {"id": 28}}), "special_tokens.eot.id: 28"),
    "eot id as text": (at("special_tokens", {"eot": {"id": "1"}}), "special_tokens.eot.id"),
    "tokenizer a list": (at("tokenizer", []), "tokenizer"),
    "tokenizer options a list": (at("tokenizer.options", []), "tokenizer.options"),
    "tokenizer unknown option": (rehashed(at("tokenizer.options", {"bogus": 1})), "tokenizer.options.bogus"),
    "tokenizer state altered": (lambda m: m["tokenizer"]["state"]["chars"].reverse(), "tokenizer.sha256: does not match"),
    "a duplicated char": (rehashed(lambda m: dup_char(m["tokenizer"]["state"])), "tokenizer.state.chars[5]"),
    "a shortened vocabulary": (rehashed(lambda m: m["tokenizer"]["state"]["chars"].pop()), "tokenizer.vocab_size: 28"),
    "chars a table": (rehashed(at("tokenizer.state.chars", {"a": 1})), "tokenizer.state.chars"),
    "tokenizer vocab above the model's": (at("tokenizer.vocab_size", 999), "tokenizer.vocab_size: 999"),
    "source a string": (at("source", "x"), "source"),
    "source step as text": (at("source.step", "1"), "source.step"),
    "files with a path": (at("files", ["../x"]), "files[0]"),
    "opset as text": (at("opset", "18"), "opset"),
}


@pytest.mark.parametrize("case", sorted(EXPORT))
def test_a_tampered_export_is_one_line_naming_file_and_key(art, tmp_path, case):
    edit, key = EXPORT[case]
    ex = tampered(art.ex, tmp_path / "ex", "gptx_export.json", edit)
    line = one_line_error(gptx("generate", ex, "--prompt", "ab", "--max-new-tokens", "2"), key)
    assert str(ex) in line


@pytest.mark.parametrize("case", ["context not the graph's", "cache dtype not the graph's", "a shortened vocabulary"])
def test_gptx_eval_checks_an_export_as_generate_does(art, tmp_path, case):
    edit, key = EXPORT[case]
    ex = tampered(art.ex, tmp_path / "ex", "gptx_export.json", edit)
    line = one_line_error(gptx("eval", ex, "--data", art.text), key)
    assert str(ex) in line


def strip_graph_metadata(ex: Path) -> None:
    """model.onnx without the metadata gptx writes into it (a graph re-saved by another tool)."""
    import onnx

    proto = onnx.load(str(ex / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(ex / "model.onnx"))


def test_onnxruntime_failing_during_eval_is_one_line_naming_the_graph(art, tmp_path):
    """A context longer than the graph's position table, with nothing left to compare it to:
    onnxruntime fails at the first window, and gptx says so in one line naming model.onnx."""
    ex = tampered(art.ex, tmp_path / "ex", "gptx_export.json", at("model.context_length", 64))
    strip_graph_metadata(ex)
    one_line_error(gptx("eval", ex, "--data", art.text), f"{ex / 'model.onnx'}: onnxruntime failed to run the graph")
    one_line_error(gptx("generate", ex, "--prompt", "ab" * 20, "--max-new-tokens", "2"),
                   f"{ex / 'model.onnx'}: onnxruntime failed to run the graph")


# ---- gptx_data.json (prepared shards) --------------------------------------------------------

MANIFEST = {
    "tokens as text": (at("shards.train[0].tokens", "10"), "shards.train[0].tokens"),
    "tokens zero": (at("shards.train[0].tokens", 0), "shards.train[0].tokens"),
    "file a path": (at("shards.val[0].file", "../x.bin"), "shards.val[0].file"),
    "file a number": (at("shards.val[0].file", 3), "shards.val[0].file"),
    "shard a list": (at("shards.train[0]", ["train_000000.bin", 10]), "shards.train[0]"),
    "val a table": (at("shards.val", {}), "shards.val"),
    "train empty": (at("shards.train", []), "shards.train"),
    "shards missing": (at("shards", DELETE), "shards: missing"),
    "a file listed twice": (lambda m: m["shards"]["val"].insert(0, m["shards"]["train"][0]), "shards.val[0].file: 'train_000000.bin' is listed twice"),
    "bytes not the size": (at("shards.train[0].bytes", 12), "shards.train[0].bytes"),
    "sha256 not a hash": (at("shards.train[0].sha256", "abc"), "shards.train[0].sha256"),
    "counts disagree": (at("tokens.train", 1), "tokens.train: 1 is not the sum"),
    "max id negative": (at("max_token_id", -1), "max_token_id"),
    "max id as float": (at("max_token_id", 3.0), "max_token_id"),
    "max id beyond uint16": (at("max_token_id", 70000), "max_token_id"),
    "dtype unknown": (at("dtype", "int8"), "dtype"),
    "tokenizer missing": (at("tokenizer", DELETE), "tokenizer: missing"),
    "tokenizer class a number": (at("tokenizer.class", 5), "tokenizer.class"),
    "tokenizer hash": (at("tokenizer.sha256", "0" * 64), "tokenizer.sha256: does not match"),
    "a duplicated char": (rehashed(lambda m: dup_char(m["tokenizer"]["state"])), "tokenizer.state.chars[5]"),
    "a shortened vocabulary": (rehashed(lambda m: m["tokenizer"]["state"]["chars"].pop()), "vocab_size: 28, but its tokenizer has 27"),
    "eot beyond the vocabulary": (at("eot_id", 400), "eot_id"),
    "val_fraction NaN": (at("val_fraction", float("nan")), "val_fraction"),
    "header of the other dtype": (at("header", {"magic": 20240801, "version": 7}), "header"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST))
def test_a_tampered_manifest_stops_gptx_run_before_the_run_folder(art, tmp_path, case):
    edit, key = MANIFEST[case]
    data = tampered(art.data, tmp_path / "data", "gptx_data.json", edit)
    exp = write_experiment(tmp_path / "exp.toml", data=art.text)
    exp.write_text(exp.read_text().replace(f'path = "{art.text}"', f'kind = "tokens"\npath = "{data}"'))
    one_line_error(gptx("run", exp), f"{data / 'gptx_data.json'}: {key}")
    assert not (tmp_path / "runs").exists()


# ---- the files themselves: not a file, empty, truncated, huge --------------------------------

def _directory(f: Path):
    f.unlink()
    f.mkdir()


def _fifo(f: Path):
    f.unlink()
    os.mkfifo(f)


def _huge(f: Path):
    with open(f, "r+b") as fh:  # sparse: costs no disk
        fh.truncate(1 << 30)


SHAPES = {
    "a directory": (_directory, "is a directory"),
    "a FIFO": (_fifo, "is not a regular file"),
    "empty": (lambda f: f.write_bytes(b""), "corrupted (not JSON"),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:40]), "corrupted (not JSON"),
    "huge": (_huge, "more than the"),
    "a list": (lambda f: f.write_text("[1, 2]"), "not a"),
}


def _command(art, tmp_path, which):
    """(copied directory, stored file, the CLI arguments that read it)."""
    if which == "gptx.json":
        d = Path(shutil.copytree(art.ck, tmp_path / "ck"))
        return d, d / "gptx.json", ["generate", d, "--prompt", "ab"]
    if which == "gptx_export.json":
        d = Path(shutil.copytree(art.ex, tmp_path / "ex"))
        return d, d / "gptx_export.json", ["generate", d, "--prompt", "ab"]
    d = Path(shutil.copytree(art.data, tmp_path / "data"))
    exp = write_experiment(tmp_path / "exp.toml", data=art.text)
    exp.write_text(exp.read_text().replace(f'path = "{art.text}"', f'kind = "tokens"\npath = "{d}"'))
    return d, d / "gptx_data.json", ["run", exp]


@pytest.mark.parametrize("which", ["gptx.json", "gptx_export.json", "gptx_data.json"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_stored_file_that_is_not_a_json_file_is_one_line(art, tmp_path, which, shape):
    damage, fragment = SHAPES[shape]
    d, f, args = _command(art, tmp_path, which)
    damage(f)
    one_line_error(gptx(*args, timeout=120), str(f) if shape != "a list" else str(d), fragment)


# ---- trainer.pt (what --resume reads) --------------------------------------------------------

TRAINER = {
    "a history entry without losses": ({"history": '[{"step": 1}]'}, "history[0].train_loss: missing"),
    "history not JSON": ({"history": "[{"}, "history: not JSON"),
    "history a tensor": ({"history": [1]}, "history: expected JSON text"),
    "negative step": ({"step": -1}, "step"),
    "step as text": ({"step": "1"}, "step"),
    "seconds negative": ({"seconds": -5.0}, "seconds"),
    "dataset state missing": ({"dataset": None}, "dataset"),
}


@pytest.mark.parametrize("case", sorted(TRAINER))
def test_a_tampered_trainer_state_stops_resume_in_one_line(art, tmp_path, case):
    """An interrupted run of an experiment with the checkpoint's model, whose trainer.pt (tensors
    and numbers, as torch.load(weights_only=True) reads them) was altered."""
    import torch

    change, key = TRAINER[case]
    ck = Path(shutil.copytree(art.ck, tmp_path / "runs" / "exp" / "run-1" / "checkpoints" / "step-000001"))
    state = {"optimizer": {}, "step": 1, "dataset": {}, "torch_rng": torch.get_rng_state(),
             "history": '[{"step": 1, "train_loss": 3.0, "val_loss": 3.1}]', "seconds": 1.0, "target": ""}
    torch.save({k: v for k, v in (state | change).items() if v is not None}, ck / "trainer.pt")
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n[tokenizer]\nkind = "char"\n'
                   f'[data]\npath = "{art.text}"\n[training]\nmax_steps = 4\nbatch_size = 2\nsample_tokens = 0\n'
                   f'out_dir = "{tmp_path / "runs"}"\n[tracking]\nenabled = false\n')
    one_line_error(gptx("run", exp, "--resume"), f"{ck / 'trainer.pt'}: {key}")
