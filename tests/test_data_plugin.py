"""A third-party dataset that needs its own file, for real: pip installs
tests/plugin_packages/gptx-data-plugin (dataset ``jsonl_docs``: JSON-lines documents, the last
``val_documents`` of them held out whole) and the real CLI, in subprocesses, resolves its path,
refuses a missing file, checks it with ``gptx check-plugin`` and trains on it."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import SHAKESPEARE, gptx, install_plugin_packages, plugin_env, write_experiment

TOKENIZER = Path(__file__).resolve().parents[1] / "experiments" / "data" / "tokenizer.json"  # BPE with <|endoftext|>
VAL_DOCUMENTS = 5


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_plugin_packages(tmp_path_factory.mktemp("data-plugin"), ["gptx-data-plugin"])


def cli(site: Path, *args, cwd: Path):
    return gptx(*args, cwd=cwd, env=plugin_env(site, load="data"))


def documents() -> list[str]:
    """Tiny Shakespeare's first 60 speeches, one document each."""
    return [s for s in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if s.strip()][:60]


def docs_experiment(d: Path, data_path: str = "docs.jsonl") -> Path:
    """A tiny experiment in ``d`` reading ``data_path`` (relative: next to the experiment) with the
    shipped BPE tokenizer, whose end-of-text token separates the documents; the file is written."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents()), encoding="utf-8")
    f = write_experiment(d / "e.toml")
    text = f.read_text().replace('[tokenizer]\nkind = "char"', f'[tokenizer]\nkind = "hf"\npath = {json.dumps(str(TOKENIZER))}')
    text = text.replace(f"path = {json.dumps(str(SHAKESPEARE))}",
                        f'kind = "jsonl_docs"\npath = "{data_path}"\nval_documents = {VAL_DOCUMENTS}')
    assert 'kind = "jsonl_docs"' in text and 'kind = "hf"' in text
    f.write_text(text.replace("sample_tokens = 10", "sample_tokens = 0"))
    return f


def validation_tokens() -> int:
    """What the last VAL_DOCUMENTS documents hold: each one's end-of-text token and its text's ids."""
    from gptx import checkpoint
    from gptx.config import from_dict

    tok = checkpoint.build_tokenizer(from_dict({"tokenizer": {"kind": "hf", "path": str(TOKENIZER)}}).tokenizer, None)
    return sum(1 + len(tok.encode(doc)) for doc in documents()[-VAL_DOCUMENTS:])


def test_the_path_resolves_against_the_experiment_files_folder(site, tmp_path):
    exp = docs_experiment(tmp_path / "exp")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli(site, "validate", exp, "--json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["data"]
    assert data["kind"] == "jsonl_docs" and data["path"] == str(tmp_path / "exp" / "docs.jsonl"), data


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_missing_file_is_one_line_naming_the_key(site, tmp_path, command):
    exp = docs_experiment(tmp_path, data_path="gone.jsonl")
    proc = cli(site, command, exp, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"data.path: data file not found: {tmp_path / 'gone.jsonl'}" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting, line", [
    ("data.val_documents=60", "data.val_documents: {docs} holds 60 documents; val_documents = 60 leaves none to train on"),
    ("tokenizer.kind='byte'", "tokenizer.kind: jsonl_docs needs a tokenizer with an end-of-text token; ByteTokenizer has none"),
])
def test_data_it_cannot_split_is_one_line_naming_the_key(site, tmp_path, setting, line):
    exp = docs_experiment(tmp_path)
    proc = cli(site, "validate", exp, "--set", setting, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().splitlines() == [f"Error: {exp}: " + line.format(docs=tmp_path / "docs.jsonl")], proc.stderr


def test_check_plugin_passes_on_the_experiments_own_file(site, tmp_path):
    exp = docs_experiment(tmp_path)
    proc = cli(site, "check-plugin", "jsonl_docs", "--experiment", exp, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert results and all(r["status"] == "pass" for r in results), results
    served = next(r for r in results if r["check"] == "serves windows")
    counts = re.fullmatch(r"([\d,]+) training, ([\d,]+) validation tokens", served["detail"])
    assert counts, served
    assert int(counts.group(2).replace(",", "")) == validation_tokens()  # exactly the last documents, whole


def test_it_trains_with_gptx_run(site, tmp_path):
    exp = docs_experiment(tmp_path)
    proc = cli(site, "run", exp, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "e").iterdir()
    final = json.loads((run / "run.json").read_text())["final_val_loss"]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(final) and final < first["train_loss"], (first, final)
    assert "jsonl_docs" in (run / "checkpoints" / "step-000020" / "gptx.json").read_text()
