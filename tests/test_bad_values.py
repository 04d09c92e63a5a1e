"""Property-style: every numeric option of the config schema — the [model] and [training] keys
and the options of every registered component of every kind — fed NaN, ±inf, 0, -1 and 2**70
through `gptx validate` (the real command line, which runs every check `gptx run` makes before it
creates anything). NaN, infinity and 2**70 are always refused; 0 and -1 are refused or accepted;
either way the answer is exit 0, or exit 2 with one `Error:` line naming the key — never a
traceback, never another exit code."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Union, get_args, get_origin

import pytest
from click.testing import CliRunner
from helpers import write_experiment

from gptx import registry as registry_mod
from gptx.cli import cli
from gptx.config import ModelConfig, TrainingConfig
from gptx.kinds import KINDS

ALWAYS_BAD = ("nan", "inf", "-inf", "2**70")
MAYBE = ("0", "-1")
TOML = {"nan": "nan", "inf": "inf", "-inf": "-inf", "2**70": str(2**70), "0": "0", "-1": "-1"}


def numeric(tp) -> bool:
    if get_origin(tp) in (Union, types.UnionType):
        return any(numeric(a) for a in get_args(tp) if a is not type(None))
    return tp in (int, float)


def numeric_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("component") and numeric(hints[f.name])]


def option_keys() -> list[tuple[str, list[str]]]:
    """(dotted key, extra --set items selecting the component it belongs to)."""
    keys = [(f"model.{n}", []) for n in numeric_fields(ModelConfig)]
    keys += [(f"training.{n}", []) for n in numeric_fields(TrainingConfig)]
    reg = registry_mod.registry()
    for kind in KINDS:
        if kind.table is None:
            continue
        for name in reg.names(kind.name):
            entry = reg.get(kind.name, name)
            for field in numeric_fields(entry.cls.Options):
                keys.append((f"{kind.table}.{field}", [f"{kind.table}.kind={name}"]))
    return keys


CASES = [pytest.param(key, select, value, id=f"{select[0].split('=')[1] + ':' if select else ''}{key}={value}")
         for key, select in option_keys() for value in ALWAYS_BAD + MAYBE]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("values") / "e.toml")


@pytest.mark.parametrize("key,select,value", CASES)
def test_every_numeric_option_refuses_what_cannot_run_in_one_line(experiment, key, select, value):
    args = ["validate", str(experiment)]
    for item in select + [f"{key}={TOML[value]}"]:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    lines = result.stderr.strip().splitlines() if result.stderr else []
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if value in ALWAYS_BAD:
        assert result.exit_code == 2, f"{key}={value} was accepted: {result.stdout}"
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    if result.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
        assert key.split(".")[-1] in lines[0] or "--set" in lines[0], lines[0]


def test_the_property_covers_the_schema():
    keys = {k for k, _ in option_keys()}
    for expected in ("model.n_layer", "model.dropout", "training.learning_rate", "training.seed", "training.grad_clip",
                     "training.target_val_loss", "training.optimizer.beta2", "training.optimizer.ns_steps",
                     "training.schedule.decay_fraction", "model.ffn.n_experts", "model.attention.kv_rank",
                     "model.positional.base", "model.norm.eps", "data.val_fraction"):
        assert expected in keys, expected
