"""The bad-input catalogue: every way a user can hand gptx something wrong, each through the
real CLI in its own process. Each case must exit 2 with exactly one line on stderr
(``Error: ...``) that names what is wrong and where, print no traceback, and leave the working
directory exactly as it was: no runs/, no mlflow.db, no half-written output.

The cases are independent processes, so a module fixture starts them all (a few at a time) and
each parametrized test checks its own result; selecting one case with -k runs only that one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import tiny_checkpoint, tiny_checkpoint_and_export, write_experiment


BLOCK = 32  # the context of the fixture checkpoint and export


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable  # (case dir, artefacts) -> CLI arguments
    fragments: tuple  # substrings the one error line must contain


CASES: list[Case] = []


def case(*fragments):
    def register(fn):
        CASES.append(Case(fn.__name__, fn, fragments))
        return fn

    return register


def experiment(d: Path, body: str = "", data: Path | None = None, replace: dict | None = None) -> Path:
    """The helpers' tiny experiment, tracking ON (default store: ./mlflow.db in the working
    directory), so a case that got past validation would leave mlflow.db and runs/ behind."""
    f = write_experiment(d / "e.toml", body, **({"data": data} if data else {}))
    text = f.read_text().replace("enabled = false", "enabled = true")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    f.write_text(text)
    return f


def data_file(d: Path, content: bytes) -> Path:
    p = d / "corpus.txt"
    p.write_bytes(content)
    return p


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


# ---- experiment files ------------------------------------------------------------------------

@case("e.toml", "invalid TOML", "line 3", "column")
def malformed_toml(d, art):
    f = d / "e.toml"
    f.write_text("[model]\nn_layer = 2\nn_head = = 2\n")
    return ["run", f]


@case("no such file", "missing.toml")
def missing_experiment_file(d, art):
    return ["run", d / "missing.toml"]


@case("e.toml", "not UTF-8")
def experiment_file_not_utf8(d, art):
    f = d / "e.toml"
    f.write_bytes(b"[model]\nn_layer = 2 # \xff\xfe\n")
    return ["validate", f]


@case("e.toml", "modle", "unknown section", "did you mean 'model'")
def unknown_section(d, art):
    return ["run", experiment(d, replace={"[model]": "[modle]"})]


@case("e.toml", "model.n_layers", "did you mean 'n_layer'")
def unknown_key(d, art):
    return ["run", experiment(d, replace={"n_layer = 2": "n_layers = 2"})]


@case("e.toml", "model.n_layer", "expected integer")
def wrong_type(d, art):
    return ["run", experiment(d, replace={"n_layer = 2": 'n_layer = "two"'})]


@case("e.toml", "model.n_embd", "not divisible by n_head")
def n_embd_not_divisible_by_n_head(d, art):
    return ["run", experiment(d, replace={"n_embd = 32": "n_embd = 33"})]


@case("e.toml", "model.block_size", "exceeds the 16 positions", "sinusoidal")
def block_size_beyond_positional_limit(d, art):
    return ["run", experiment(d, '\n[model.positional]\nkind = "sinusoidal"\nmax_positions = 16\n')]


@case("e.toml", "training.learning_rate", "must be in (0, 10]")
def negative_learning_rate(d, art):
    return ["run", experiment(d, replace={"max_steps = 20": "max_steps = 20\nlearning_rate = -0.001"})]


@case("e.toml", "training.max_steps", "at least 1")
def zero_steps(d, art):
    return ["run", experiment(d, replace={"max_steps = 20": "max_steps = 0"})]


@case("e.toml", "model.attention.kind", "unknown attention 'casual'", "did you mean 'causal'")
def unknown_component(d, art):
    return ["run", experiment(d, '\n[model.attention]\nkind = "casual"\n')]


@case("e.toml", "tokenizer.kind", "unknown tokenizer", "did you mean 'gpt2'")
def unknown_tokenizer(d, art):
    return ["run", experiment(d, replace={'kind = "char"': 'kind = "gtp2"'})]


@case("e.toml", "model.n_embd", "rope needs an even head size")
def rope_with_odd_head_size(d, art):
    return ["run", experiment(d, '\n[model.positional]\nkind = "rope"\n', replace={"n_embd = 32": "n_embd = 30"})]


@case("e.toml", "model.attention.n_kv_heads", "n_head = 2 is not divisible by n_kv_heads = 3")
def n_kv_heads_not_dividing_n_head(d, art):
    return ["run", experiment(d, "\n[model.attention]\nn_kv_heads = 3\n")]


# ---- data ------------------------------------------------------------------------------------

@case("e.toml", "data.path", "data file not found", "nowhere.txt")
def missing_data_file(d, art):
    return ["run", experiment(d, data=d / "nowhere.txt")]


@case("e.toml", "data.path", "data file is empty")
def empty_data_file(d, art):
    return ["run", experiment(d, data=data_file(d, b""))]


@case("e.toml", "data.path", "looks binary", "corpus.txt")
def binary_data_file(d, art):
    return ["run", experiment(d, data=data_file(d, bytes(range(256)) * 64))]


@case("e.toml", "data.path", "not UTF-8", "offset 6")
def non_utf8_data_file(d, art):
    return ["run", experiment(d, data=data_file(d, b"hello \xe9 world (latin-1)\n" * 50))]


@case("e.toml", "data.path", "fewer than block_size + 1 = 33")
def data_shorter_than_one_block(d, art):
    return ["run", experiment(d, data=data_file(d, b"to be or not to be\n"))]


# ---- --set ---------------------------------------------------------------------------------

@case("--set", "expected KEY.PATH=VALUE", "model.n_layer")
def set_without_value(d, art):
    return ["run", experiment(d), "--set", "model.n_layer"]


@case("--set", "model.n_layer.depth", "'model.n_layer' is a value, not a table")
def set_bad_path(d, art):
    return ["run", experiment(d), "--set", "model.n_layer.depth=3"]


@case("--set training.batch_size=[4, 8]", "training.batch_size", "expected integer")
def set_bad_value(d, art):
    return ["run", experiment(d), "--set", "training.batch_size=[4, 8]"]


@case("--set trainig.max_steps=5", "did you mean 'training'")
def set_unknown_section(d, art):
    return ["validate", experiment(d), "--set", "trainig.max_steps=5"]


# ---- environment: tracking server, output directory ------------------------------------------

@case("tracking.uri", "unreachable", "127.0.0.1")
def unreachable_tracking_server(d, art):
    uri = f"http://127.0.0.1:{closed_port()}"
    return ["run", experiment(d, replace={"enabled = true": f'enabled = true\nuri = "{uri}"'})]


@case("e.toml", "training.out_dir", "not a writable directory", "blocker")
def out_dir_under_a_regular_file(d, art):
    # root ignores permission bits, but nobody can create a directory inside a regular file
    (d / "blocker").write_text("a file, not a directory")
    return ["run", experiment(d, replace={f'out_dir = "{d / "runs"}"': f'out_dir = "{d / "blocker" / "runs"}"'})]


@case("training.out_dir", "/proc")
def out_dir_on_a_filesystem_that_refuses(d, art):
    # procfs refuses new directories even for root
    return ["run", experiment(d, replace={f'out_dir = "{d / "runs"}"': 'out_dir = "/proc/gptx-runs"'})]


@case("blocker", "not a directory")
def export_out_under_a_regular_file(d, art):
    (d / "blocker").write_text("a file")
    return ["export", art.ckpt, "-o", d / "blocker" / "out"]


@case("/proc/gptx-export: cannot be written there")  # the user's path, not gptx's hidden temporary
def export_out_on_a_filesystem_that_refuses(d, art):
    return ["export", art.ckpt, "-o", "/proc/gptx-export"]


@case("--quantize", "unknown scheme 'int5'", "supported: int8, int4")
def export_quantize_unknown_scheme(d, art):
    return ["export", art.ckpt, "-o", d / "out", "--quantize", "int5"]


@case("blocker", "is not a directory")
def import_hf_out_under_a_regular_file(d, art):
    from safetensors.torch import save_file

    (d / "blocker").write_text("a file")
    hf = d / "hf"
    hf.mkdir()
    C, P = 4, 8
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": C,
                                                "vocab_size": 50257, "n_positions": P}))
    shapes = {"wte.weight": (50257, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
              "h.0.ln_1.weight": (C,), "h.0.ln_1.bias": (C,), "h.0.ln_2.weight": (C,), "h.0.ln_2.bias": (C,),
              "h.0.attn.c_attn.weight": (C, 3 * C), "h.0.attn.c_attn.bias": (3 * C,),
              "h.0.attn.c_proj.weight": (C, C), "h.0.attn.c_proj.bias": (C,),
              "h.0.mlp.c_fc.weight": (C, 4 * C), "h.0.mlp.c_fc.bias": (4 * C,),
              "h.0.mlp.c_proj.weight": (4 * C, C), "h.0.mlp.c_proj.bias": (C,)}
    save_file({f"transformer.{k}": torch.zeros(s) for k, s in shapes.items()}, str(hf / "model.safetensors"))
    return ["import-hf", hf, "-o", d / "blocker" / "out"]


# ---- checkpoints ---------------------------------------------------------------------------

def copy_ckpt(d, art) -> Path:
    return Path(shutil.copytree(art.ckpt, d / "ck"))


def gen(source, prompt="Hi", *more):
    return ["generate", source, "--prompt", prompt, "--max-new-tokens", "4", *more]


@case("no such checkpoint directory", "nope")
def missing_checkpoint(d, art):
    return gen(d / "nope")


@case("not a gptx checkpoint", "empty")
def directory_that_is_not_a_checkpoint(d, art):
    (d / "empty").mkdir()
    return gen(d / "empty")


@case("model.safetensors", "does not fit the model its config describes")
def checkpoint_from_another_config(d, art):
    ck = copy_ckpt(d, art)
    meta = json.loads((ck / "gptx.json").read_text())
    meta["config"]["model"]["n_embd"] = 64  # weights of a 32-wide model, config of a 64-wide one
    (ck / "gptx.json").write_text(json.dumps(meta))
    return gen(ck)


@case("gptx.json", "config.model.attention.kind", "unknown attention 'flash9000'")
def checkpoint_from_a_missing_plugin(d, art):
    ck = copy_ckpt(d, art)
    meta = json.loads((ck / "gptx.json").read_text())
    meta["config"]["model"]["attention"]["kind"] = "flash9000"
    (ck / "gptx.json").write_text(json.dumps(meta))
    return gen(ck)


@case("model.safetensors", "corrupted or unreadable")
def truncated_safetensors(d, art):
    ck = copy_ckpt(d, art)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return gen(ck)


@case("gptx.json", "corrupted")
def garbage_gptx_json(d, art):
    ck = copy_ckpt(d, art)
    (ck / "gptx.json").write_bytes(b"\x00\x01{not json")
    return gen(ck)


@case("gptx.json", "not a gptx checkpoint")
def foreign_json_as_gptx_json(d, art):
    ck = copy_ckpt(d, art)
    (ck / "gptx.json").write_text('["a", "list"]')
    return gen(ck)


# ---- ONNX exports --------------------------------------------------------------------------

def copy_export(d, art) -> Path:
    return Path(shutil.copytree(art.export, d / "ex"))


@case("model.onnx", "onnxruntime cannot load it")
def garbage_onnx_file(d, art):
    ex = copy_export(d, art)
    (ex / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    return gen(ex)


@case("model.onnx", "onnxruntime cannot load it")
def truncated_onnx_file(d, art):
    ex = copy_export(d, art)
    f = ex / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return gen(ex)


@case("model.onnx", "inputs/outputs do not follow")
def foreign_onnx_file(d, art):
    import onnx
    from onnx import TensorProto, helper

    ex = copy_export(d, art)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(ex / "model.onnx"))
    return gen(ex)


@case("gptx_export.json", "corrupted")
def garbage_export_metadata(d, art):
    ex = copy_export(d, art)
    (ex / "gptx_export.json").write_bytes(b"\xff\xfe garbage")
    return gen(ex)


def edit_export_meta(d, art, edit) -> Path:
    ex = copy_export(d, art)
    meta = json.loads((ex / "gptx_export.json").read_text())
    edit(meta)
    (ex / "gptx_export.json").write_text(json.dumps(meta))
    return ex


@case("model.onnx", "logits have 256 entries per token but gptx_export.json says vocab_size 300")
def export_metadata_with_another_vocabulary(d, art):
    return gen(edit_export_meta(d, art, lambda m: m["model"].update(vocab_size=300)))


@case("past_key_values.0.key has shape", "do not belong together")
def export_metadata_declaring_another_cache(d, art):
    def wider(m):
        m["cache"] = [dict(c, dims=[c["dims"][0], c["dims"][1] + 1, *c["dims"][2:]]) for c in m["cache"]]
    return gen(edit_export_meta(d, art, wider))


@case("gptx_export.json", "model.context_length")
def export_metadata_with_a_non_integer_context(d, art):
    return gen(edit_export_meta(d, art, lambda m: m["model"].update(context_length="64")))


@case("gptx_export.json: cache[0].seq_axis")
def export_metadata_with_a_bad_cache_declaration(d, art):
    return gen(edit_export_meta(d, art, lambda m: m["cache"][0].update(seq_axis=9)))


@case("gptx_export.json", "io_contract.past_present_share_buffer: input should be a valid boolean")
def export_metadata_with_a_non_boolean_shared_cache_flag(d, art):
    return gen(edit_export_meta(d, art, lambda m: m["io_contract"].update(past_present_share_buffer="yes")))


@case("data.path", "binary")
def a_kind_change_note_never_comes_before_an_error(d, art):
    """--set drops the old kind's option (a note), then the data is refused: the error alone."""
    body = '[model.ffn]\nkind = "gelu"\napproximate = "none"\n'
    return ["run", experiment(d, body, data=data_file(d, b"\x00\x01" * 4000)), "--set", "model.ffn.kind=swiglu"]


@case("training.batch_size", "the activations and logits of a micro-batch of 100000000 x 32 tokens")
def an_absurd_batch_size_is_refused_at_once(d, art):
    return ["run", experiment(d), "--set", "training.batch_size=100000000"]


# ---- gptx bench: every input checked before the machine is measured (a minute or more) ----------

@case("--nanogpt", "is not a nanoGPT checkout")
def bench_nanogpt_not_a_checkout(d, art):
    return ["bench", "--only", "speedrun", "--nanogpt", d]


@case("--nanogpt: only the speedrun section runs nanoGPT")
def bench_nanogpt_without_the_speedrun_section(d, art):
    return ["bench", "--only", "train", "--nanogpt", d]


@case("--speedrun-set model.attention.qk_normm=true", "unknown key")
def bench_speedrun_set_unknown_key(d, art):
    return ["bench", "--only", "speedrun", "--speedrun-set", "model.attention.qk_normm=true"]


@case("--speedrun-set training.max_steps=0", "must be at least 1")
def bench_speedrun_set_out_of_range(d, art):
    return ["bench", "--only", "speedrun", "--speedrun-set", "training.max_steps=0"]


@case("--speedrun-set training.seed=5", "is the bench's own", "--speedrun-seeds")
def bench_speedrun_set_a_key_the_bench_sets(d, art):  # every seed would train the same run
    return ["bench", "--only", "speedrun", "--speedrun-set", "training.seed=5"]


@case("--speedrun-set: only the speedrun section runs the speedrun recipe")
def bench_speedrun_set_without_the_speedrun_section(d, art):
    return ["bench", "--only", "train", "--speedrun-set", "training.max_steps=3"]


@case("missing.toml")
def bench_missing_experiment(d, art):
    return ["bench", "--only", "peak,train", "--experiment", d / "missing.toml"]


@case("training.batch_size")
def bench_bad_set(d, art):
    return ["bench", "--only", "peak,train", "--set", "training.batch_size=0"]


@case("nope", "no such checkpoint directory")
def bench_missing_checkpoint(d, art):
    return ["bench", "--only", "peak,generate", "--checkpoint", d / "nope"]


@case("--quality-data", "missing.txt: no such file")
def bench_missing_quality_data(d, art):
    return ["bench", "--only", "generate", "--quality-data", d / "missing.txt"]


@case("--quality-data", "empty.txt: is empty")
def bench_empty_quality_data(d, art):
    (d / "empty.txt").write_bytes(b"")
    return ["bench", "--only", "generate", "--quality-data", d / "empty.txt"]


@case("--quality-data", "binary.txt looks binary (NUL bytes)")
def bench_binary_quality_data(d, art):  # refused before the timings, not when the exports are scored
    (d / "binary.txt").write_bytes(b"text\x00" * 4000)
    return ["bench", "--only", "generate", "--quality-data", d / "binary.txt"]


@case("--quality-data", "one.txt: 1 token(s); at least 2 are needed")
def bench_one_token_quality_data(d, art):
    (d / "one.txt").write_text("the")
    return ["bench", "--only", "generate", "--quality-data", d / "one.txt"]


@case("--quality-data", "d.jsonl: expected text", "not jsonl documents")
def bench_jsonl_quality_data(d, art):
    (d / "d.jsonl").write_text('{"text": "To be, or not to be."}\n')
    return ["bench", "--only", "generate", "--quality-data", d / "d.jsonl"]


@case("--quality-data: only the generate section scores its exports")
def bench_quality_data_without_the_generate_section(d, art):
    (d / "text.txt").write_text("To be, or not to be.\n")
    return ["bench", "--only", "peak", "--quality-data", d / "text.txt"]


# ---- sweeps and comparisons (nothing trained, no sweep folder, no MLflow parent run) ----------

def sweep(d, *options):
    return ["sweep", experiment(d), "--vary", "model.positional.kind=learned,rope", *options]


@case("--seeds: must be from 1 to 1000, got 0")
def sweep_zero_seeds(d, art):
    return sweep(d, "--seeds", "0")


@case("--seeds: must be from 1 to 1000, got -1")
def sweep_negative_seeds(d, art):
    return sweep(d, "--seeds", "-1")


@case("--seeds: must be from 1 to 1000, got 1180591620717411303424")
def sweep_2_pow_70_seeds(d, art):
    return sweep(d, "--seeds", str(2**70))


@case("--seeds: expected an integer, got '2**70'")
def sweep_seeds_not_a_number(d, art):
    return sweep(d, "--seeds", "2**70")


@case("--alpha: must be a finite number in (0, 1), got 2")
def sweep_alpha_above_one(d, art):
    return sweep(d, "--seeds", "3", "--alpha", "2")


@case("--alpha: must be a finite number in (0, 1), got nan")
def sweep_alpha_nan(d, art):
    return sweep(d, "--seeds", "3", "--alpha", "nan")


@case("--vary", "training.learning_rate", "'1e-3' is given twice")
def sweep_vary_value_given_twice(d, art):
    return ["sweep", experiment(d), "--vary", "training.learning_rate=1e-3,3e-3,1e-3"]


@case("--vary", "model.n_layer is varied twice")
def sweep_vary_key_given_twice(d, art):
    return ["sweep", experiment(d), "--vary", "model.n_layer=1,2", "--vary", "model.n_layer=3"]


@case("--seeds", "do not --vary training.seed as well")
def sweep_seeds_and_varied_seed(d, art):
    return ["sweep", experiment(d), "--vary", "training.seed=1,2", "--seeds", "3"]


@case("0123456789abcdef0123456789abcdef", "no MLflow store", "mlflow.db")
def compare_unknown_run_id(d, art):
    return ["compare", "0123456789abcdef0123456789abcdef"]


@case("runs/e/nope", "no such run directory, and not an MLflow run id")
def compare_missing_run_directory(d, art):
    return ["compare", "runs/e/nope"]


@case("not a run directory or a folder of runs")
def compare_a_folder_without_runs(d, art):
    (d / "folder").mkdir()
    return ["compare", d / "folder"]


@case("--alpha: must be a finite number in (0, 1), got inf")
def compare_alpha_inf(d, art):
    return ["compare", art.ckpt, "--alpha", "inf"]


@case("--out", "exists and is not an empty folder")
def compare_into_a_used_folder(d, art):
    (d / "used").mkdir()
    (d / "used" / "keep.txt").write_text("mine")
    return ["compare", art.ckpt, "--out", d / "used"]


@case("run.json: corrupted")
def compare_a_corrupted_run(d, art):
    (d / "r").mkdir()
    (d / "r" / "run.json").write_text('{"status": "FINISHED", "conf')
    return ["compare", d / "r"]


# ---- gptx prepare ----------------------------------------------------------------------------

def prep(source, *more):
    return ["prepare", source, "-o", Path(source).parent / "out", "--tokenizer", "gpt2", *more]


@case("/proc/gptx-shards: cannot be written there")
def prepare_out_on_a_filesystem_that_refuses(d, art):
    source = data_file(d, b"some text to tokenize\n" * 50)
    return ["prepare", source, "-o", "/proc/gptx-shards", "--tokenizer", "char"]


@case("data file not found", "nowhere.txt")
def prepare_missing_source(d, art):
    return prep(d / "nowhere.txt")


@case("data file is empty", "corpus.txt")
def prepare_empty_source(d, art):
    return prep(data_file(d, b""))


@case("corpus.txt looks binary")
def prepare_binary_source(d, art):
    return prep(data_file(d, b"text first\n" * 200_000 + bytes(range(256))))  # found after a shard's worth


@case("docs.jsonl: line 3: not valid JSON")
def prepare_bad_jsonl_line(d, art):
    (d / "docs.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    return prep(d / "docs.jsonl")


@case("docs.jsonl: line 2: expected an object with a 'text' string")
def prepare_jsonl_line_without_text(d, art):
    (d / "docs.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    return prep(d / "docs.jsonl")


@case("--tokenizer char has no end-of-text token to separate jsonl documents")
def prepare_jsonl_with_char_tokenizer(d, art):
    (d / "docs.jsonl").write_text('{"text": "a"}\n')
    return ["prepare", d / "docs.jsonl", "-o", d / "out", "--tokenizer", "char"]


@case("data.path", "docs.jsonl: tokenizer ByteTokenizer has no end-of-text token to separate jsonl documents")
def run_jsonl_with_byte_tokenizer(d, art):  # the text dataset's cache tokenizes through the same stream
    (d / "docs.jsonl").write_text('{"text": "a"}\n')
    return ["run", experiment(d, data=d / "docs.jsonl", replace={'kind = "char"': 'kind = "byte"'})]


@case("--tokenizer: unknown tokenizer 'gtp2' (did you mean 'gpt2'?)")
def prepare_unknown_tokenizer(d, art):
    return ["prepare", data_file(d, b"hello\n"), "-o", d / "out", "--tokenizer", "gtp2"]


@case("--tokenizer-option.encodingg: unknown key (did you mean 'encoding'?)")
def prepare_unknown_tokenizer_option(d, art):
    return ["prepare", data_file(d, b"hello\n"), "-o", d / "out", "--tokenizer", "tiktoken", "--tokenizer-option", "encodingg=gpt2"]


@case("--workers: must be between 1 and 256, got 0")
def prepare_zero_workers(d, art):
    return prep(data_file(d, b"hello\n"), "--workers", "0")


@case("--workers: must be between 1 and 256, got -1")
def prepare_negative_workers(d, art):
    return prep(data_file(d, b"hello\n"), "--workers", "-1")


@case("--workers: must be between 1 and 256, got 1180591620717411303424")
def prepare_huge_workers(d, art):
    return prep(data_file(d, b"hello\n"), "--workers", str(2**70))


@case("--workers: expected an integer, got 'two'")
def prepare_workers_not_a_number(d, art):
    return prep(data_file(d, b"hello\n"), "--workers", "two")


@case("--shard-tokens: must be between 1,025 and 2,147,483,647", "got 100")
def prepare_tiny_shards(d, art):
    return prep(data_file(d, b"hello\n"), "--shard-tokens", "100")


@case("--val-fraction: must be a finite number, got nan")
def prepare_nan_val_fraction(d, art):
    return prep(data_file(d, b"hello\n"), "--val-fraction", "nan")


@case("--val-fraction: must be between 0 and 1 (exclusive), got 1.0")
def prepare_whole_val_fraction(d, art):
    return prep(data_file(d, b"hello\n"), "--val-fraction", "1")


@case("out: exists and is not a directory")
def prepare_out_is_a_file(d, art):
    (d / "out").write_text("mine")
    return prep(data_file(d, b"hello\n"))


@case("out: not empty and not written by gptx prepare")
def prepare_out_is_someone_elses_directory(d, art):
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("keep me")
    return prep(data_file(d, b"hello\n"))


@case("tokens leave an empty split with --val-fraction 0.5")
def prepare_text_too_short_to_split(d, art):
    return prep(data_file(d, b"Hi"), "--val-fraction", "0.5")


# ---- gptx eval ------------------------------------------------------------------------------

@case("--data: ", "nowhere.txt: no such file")
def eval_missing_data(d, art):
    return ["eval", art.ckpt, "--data", d / "nowhere.txt"]


@case("--data: data file is empty", "corpus.txt")
def eval_empty_data(d, art):
    return ["eval", art.ckpt, "--data", data_file(d, b"")]


@case("--data: ", "corpus.txt looks binary")
def eval_binary_data(d, art):
    return ["eval", art.export, "--data", data_file(d, b"\x00\x01\x02" * 10)]


@case("give --data FILE", "--task FILE.jsonl")
def eval_without_data_or_task(d, art):
    return ["eval", art.ckpt]


@case("--task: ", "task.jsonl: line 2: not valid JSON")
def eval_bad_task_line(d, art):
    (d / "task.jsonl").write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": \n')
    return ["eval", art.ckpt, "--task", d / "task.jsonl"]


@case("task.jsonl: line 1: 'label' must be an integer from 0 to 3, got 4")
def eval_label_out_of_range(d, art):
    (d / "task.jsonl").write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}\n')
    return ["eval", art.export, "--task", d / "task.jsonl"]


@case("task.jsonl: holds no examples")
def eval_empty_task(d, art):
    (d / "task.jsonl").write_text("\n\n")
    return ["eval", art.ckpt, "--task", d / "task.jsonl"]


@case("--data: ", "corpus.txt: character 'Ω' is not in this char tokenizer's vocabulary")
def eval_text_beyond_a_char_vocabulary(d, art):
    ck = tiny_checkpoint(d / "char-run", "char", {"chars": list("abc \n")}, block_size=16)
    return ["eval", ck, "--data", data_file(d, "abc abc Ω\n".encode())]


@case("--stride: must be at least 1, got 0")
def eval_zero_stride(d, art):
    return ["eval", art.ckpt, "--data", data_file(d, b"hello world\n"), "--stride", "0"]


@case("--stride: must be between 1 and the model's context of 32, got 33")
def eval_stride_beyond_the_context(d, art):
    return ["eval", art.export, "--data", data_file(d, b"hello world\n"), "--stride", "33"]


@case("--stride: expected an integer, got 'inf'")
def eval_infinite_stride(d, art):
    return ["eval", art.ckpt, "--data", data_file(d, b"hello world\n"), "--stride", "inf"]


@case("--batch-size: must be at least 1, got -1")
def eval_negative_batch(d, art):
    return ["eval", art.ckpt, "--data", data_file(d, b"hello world\n"), "--batch-size", "-1"]


@case("no such checkpoint directory", "nope")
def eval_missing_source(d, art):
    return ["eval", d / "nope", "--data", data_file(d, b"hello world\n")]


# ---- running them ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A tiny byte-level checkpoint (random weights) and its ONNX export, made in-process."""
    root = tmp_path_factory.mktemp("artefacts")
    ck, _ = tiny_checkpoint_and_export(root, BLOCK)
    return type("Artefacts", (), {"ckpt": ck, "export": root / "export"})


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# A fresh ``python -m gptx`` spends seconds importing torch before it reads a single flag; with
# 40 cases on a shared 2-core machine that is minutes. So most cases run in processes forked
# from a "zygote" that has imported the modules once (as Android starts apps): each case is
# still its own process running the CLI's real entry point (gptx.cli.main) with its own argv,
# working directory, stdout/stderr and exit status. FRESH cases (and every case when
# GPTX_TEST_FRESH=1) start a new interpreter instead, to cover the startup path too.
FRESH = {"malformed_toml", "unreachable_tracking_server", "truncated_safetensors", "garbage_onnx_file"}

ZYGOTE = r"""
import json, os, sys, traceback
import torch, numpy, onnxruntime, safetensors.torch  # the slow imports, paid once
import gptx.cli, gptx.config, gptx.checkpoint, gptx.model, gptx.training.trainer, gptx.registry, gptx.export.runtime
import gptx.plugins.attention, gptx.plugins.positional, gptx.plugins.ffn, gptx.plugins.norm, gptx.plugins.tokenizers
jobs, width = json.load(sys.stdin), 3
codes, running, queue = {}, {}, list(enumerate(jobs))
while queue or running:
    while queue and len(running) < width:
        i, job = queue.pop(0)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the case's own process: the CLI's entry point, as `python -m gptx` runs it
            code = 1
            try:
                os.chdir(job["cwd"])
                os.environ.clear(); os.environ.update(job["env"])
                for fd, name in ((1, "out"), (2, "err")):
                    f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(f, fd); os.close(f)
                sys.argv = ["gptx", *job["args"]]
                try:
                    gptx.cli.main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        running[pid] = i
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([codes[i] for i in range(len(jobs))], sys.stdout)
"""


@pytest.fixture(scope="module")
def results(request, artefacts, tmp_path_factory):
    """Run every selected case's CLI call: id -> (case dir, listing before, listing after, result)."""
    selected = {item.callspec.params["c"].id for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "GPTX_LOAD", "PYTEST_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    fresh_all = os.environ.get("GPTX_TEST_FRESH") == "1"
    prepared = {}
    for c in CASES:
        if c.id in selected:
            d = tmp_path_factory.mktemp(c.id)
            prepared[c.id] = (d, [str(a) for a in c.setup(d, artefacts)], None)
    ids = list(prepared)
    for c_id in ids:
        d, args, _ = prepared[c_id]
        prepared[c_id] = (d, args, listing(d))

    def fresh(c_id):
        d, args, _ = prepared[c_id]
        p = subprocess.run([sys.executable, "-m", "gptx", *args], cwd=d, env=env, capture_output=True, text=True,
                           timeout=300)
        return c_id, (p.returncode, p.stdout, p.stderr)

    done = {}
    forked = [i for i in ids if not fresh_all and i not in FRESH]
    if forked:
        logs = tmp_path_factory.mktemp("case-output")
        jobs = [{"args": prepared[i][1], "cwd": str(prepared[i][0]), "env": env,
                 "out": str(logs / f"{i}.out"), "err": str(logs / f"{i}.err")} for i in forked]
        z = subprocess.run([sys.executable, "-c", ZYGOTE], input=json.dumps(jobs), env=env, capture_output=True,
                           text=True, timeout=600)
        assert z.returncode == 0, z.stderr
        for i, rc in zip(forked, json.loads(z.stdout)):
            done[i] = (rc, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
    with ThreadPoolExecutor(max_workers=2) as pool:
        done |= dict(pool.map(fresh, [i for i in ids if i not in done]))
    return {i: (prepared[i][0], prepared[i][2], listing(prepared[i][0]), done[i]) for i in ids}


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(c, results):
    d, before, after, (rc, out, err) = results[c.id]
    assert rc == 2, f"exit {rc}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for fragment in c.fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    assert after == before, f"left behind: {sorted(after - before)}"
    assert not (d / "mlflow.db").exists() and not (d / "runs").exists() and not (d / "mlruns").exists()
