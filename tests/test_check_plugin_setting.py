"""`gptx check-plugin NAME --experiment FILE --set KEY=VALUE`: a component is checked inside the
experiment a user describes (its data, tokenizer, options), not only in the tiny default."""
from __future__ import annotations

import json
import re

import pytest
from helpers import gptx, write_experiment


def results(proc) -> dict[tuple[str, str], dict]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {(r["name"], r["check"]): r for r in json.loads(proc.stdout)["results"]}


def test_a_dataset_is_checked_on_the_experiments_own_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh\n" * 2000, encoding="utf-8")  # 18,000 bytes, nothing like the default sample
    exp = write_experiment(tmp_path / "e.toml", data=corpus)
    r = results(gptx("check-plugin", "text", "--experiment", exp, "--set", "tokenizer.kind='byte'", "--json", cwd=tmp_path))
    served = r[("text", "serves windows")]
    assert served["status"] == "pass"
    counts = re.fullmatch(r"([\d,]+) training, ([\d,]+) validation tokens", served["detail"])
    assert counts and sum(int(n.replace(",", "")) for n in counts.groups()) == 18_000, served  # that file, split


def test_a_schedule_is_checked_over_the_experiments_run_length(tmp_path):
    default = results(gptx("check-plugin", "wsd", "--json", cwd=tmp_path))[("wsd", "factors")]
    assert "(max_steps 200)" in default["detail"], default
    longer = results(gptx("check-plugin", "wsd", "--set", "training.max_steps=1000", "--set",
                          "training.schedule.warmup_steps=10", "--json", cwd=tmp_path))[("wsd", "factors")]
    assert longer["status"] == "pass" and "over 1,500 steps (max_steps 1,000)" in longer["detail"], longer


@pytest.mark.slow  # three model check-plugin runs
def test_a_component_keeps_the_options_its_slot_gives_it(tmp_path):
    plain = results(gptx("check-plugin", "causal", "--kind", "attention", "--json", cwd=tmp_path))
    grouped = results(gptx("check-plugin", "causal", "--kind", "attention", "--set", "model.attention.n_kv_heads=1",
                           "--json", cwd=tmp_path))
    assert all(r["status"] != "fail" for r in grouped.values()), grouped
    params = [int(r[("causal", "builds")]["detail"].split(" ")[0].replace(",", "")) for r in (plain, grouped)]
    assert params[1] < params[0], params  # one key/value head: smaller key and value projections
    # another component in that slot does not inherit options that are not its own
    other = results(gptx("check-plugin", "einsum", "--set", "model.attention.n_kv_heads=1", "--json", cwd=tmp_path))
    assert all(r["status"] != "fail" for r in other.values()), other


@pytest.mark.parametrize("args, line", [
    (["--experiment", "missing.toml"], "Error: missing.toml: no such file"),
    (["--set", "training.max_steps=0"], "Error: --set training.max_steps=0: training.max_steps: must be at least 1, got 0"),
    (["--set", "training.max_steps"], "Error: --set: expected KEY.PATH=VALUE, got 'training.max_steps'"),
    (["--set", "model.attention.n_kv_heads=3"], "model.attention.n_kv_heads: n_head = 4 is not divisible by n_kv_heads = 3"),
])
def test_a_bad_setting_is_one_line_before_any_check(tmp_path, args, line):
    p = gptx("check-plugin", "wsd", *args, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], p.stderr
