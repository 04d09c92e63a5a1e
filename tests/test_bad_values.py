"""Property-style: every numeric option of the config schema — the [model] and [training] keys
and the options of every registered component of every kind — fed NaN, ±inf, 0, -1 and 2**70
through `gptx validate` (the real command line, which runs every check `gptx run` makes before it
creates anything). NaN, infinity and 2**70 are always refused; whether 0 and -1 are accepted is
written per option in ACCEPTS below, reviewed by hand (not read from the ranges the product
declares, which would compare the product with itself). Accepted means exit 0; refused means
exit 2 with one `Error:` line naming the key — never a traceback, never another exit code."""
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

# Which of 0 and -1 each numeric option accepts, judged from what the option means. An option is
# named by its dotted key, a component's option as "<component>:<key>". The outcomes are those of
# helpers.write_experiment's experiment (learned positions, char tokenizer, ...).
ZERO_VALID = {
    # 0 turns the feature off
    "model.dropout", "training.grad_clip", "training.final_eval_tokens", "training.sample_tokens",
    "moe:model.ffn.aux_loss_weight", "moe:model.ffn.z_loss_weight",
    "adamw:training.optimizer.weight_decay", "muon:training.optimizer.weight_decay", "muon:training.optimizer.momentum",
    "muon:training.optimizer.embedding_weight_decay",
    "constant:training.schedule.warmup_steps", "cosine:training.schedule.warmup_steps", "wsd:training.schedule.warmup_steps",
    "latent:model.attention.rope_dim",  # no decoupled rotary part: what positions that do not rotate need
    # 0 is an ordinary value of the option
    "training.seed",
    "training.sample_temperature",  # greedy sampling
    "adamw:training.optimizer.beta1", "adamw:training.optimizer.beta2",  # no averaging of a moment (torch's Adam
    "muon:training.optimizer.beta1", "muon:training.optimizer.beta2",    # accepts [0, 1); 0 and 0 is sign descent)
    "cosine:training.schedule.min_lr", "wsd:training.schedule.min_lr",  # the decay ends at a learning rate of 0
}
# -1 means nothing to any option: "auto" or "no limit" is leaving the key out (None), never -1,
# and nothing counts, weighs or lasts below 0.
MINUS_ONE_VALID: set[str] = set()
NEITHER_VALID = {
    # counts and sizes: 0 layers, heads, channels, positions, experts or tokens build nothing
    # (where there is an automatic choice, leaving the key out picks it)
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
    "causal:model.attention.n_kv_heads", "einsum:model.attention.n_kv_heads", "latent:model.attention.kv_rank",
    "causal:model.attention.window", "einsum:model.attention.window",  # a window of 0 sees nothing; None: the whole context
    "rope:model.positional.max_positions", "sinusoidal:model.positional.max_positions",
    "geglu:model.ffn.hidden", "gelu:model.ffn.hidden", "moe:model.ffn.hidden", "relu:model.ffn.hidden",
    "relu2:model.ffn.hidden", "swiglu:model.ffn.hidden",
    "moe:model.ffn.n_experts", "moe:model.ffn.top_k",
    "training.sample_top_k",  # keeping 0 candidates leaves nothing to sample; None keeps them all
    "training.threads",  # None: torch's default
    # steps and intervals: 0 steps, an empty batch or "every 0 steps" cannot run
    "training.max_steps", "training.batch_size", "training.grad_accum_steps", "training.eval_interval",
    "training.eval_steps", "training.log_interval", "training.checkpoint_interval", "cosine:training.schedule.decay_steps",
    "muon:training.optimizer.ns_steps",  # 0 iterations: no orthogonalization, not Muon
    # positive by nature: a learning rate of 0 learns nothing, an epsilon or scale of 0 divides by or multiplies to 0
    "training.learning_rate", "muon:training.optimizer.lr", "muon:training.optimizer.embedding_lr",
    "muon:training.optimizer.head_lr", "muon:training.optimizer.scalar_lr",
    "adamw:training.optimizer.eps", "muon:training.optimizer.eps", "layernorm:model.norm.eps", "rmsnorm:model.norm.eps",
    "rope:model.positional.base", "sinusoidal:model.positional.base",  # a base of 1 or less does not vary by position
    "sinusoidal:model.positional.scale",
    "training.target_val_loss",  # a loss of 0 is never reached; None: no target
    # fractions that must leave something on both sides
    "text:data.val_fraction",  # 0: no validation split to evaluate on
    "wsd:training.schedule.decay_fraction",  # 0: no decay (the constant schedule is that)
}
CLASSIFIED = ZERO_VALID | MINUS_ONE_VALID | NEITHER_VALID


def numeric(tp) -> bool:
    if get_origin(tp) in (Union, types.UnionType):
        return any(numeric(a) for a in get_args(tp) if a is not type(None))
    return tp in (int, float)


def numeric_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("component") and numeric(hints[f.name])]


def option_keys() -> list[tuple[str, str, list[str]]]:
    """(name in the tables above, dotted key, extra --set items selecting the component it belongs to)."""
    keys = [(f"model.{n}", f"model.{n}", []) for n in numeric_fields(ModelConfig)]
    keys += [(f"training.{n}", f"training.{n}", []) for n in numeric_fields(TrainingConfig)]
    reg = registry_mod.registry()
    for kind in KINDS:
        if kind.table is None:
            continue
        for name in reg.names(kind.name):
            entry = reg.get(kind.name, name)
            for field in numeric_fields(entry.cls.Options):
                key = f"{kind.table}.{field}"
                keys.append((f"{name}:{key}", key, [f"{kind.table}.kind={name}"]))
    return keys


def accepts(name: str, value: str) -> bool:
    """The verdict of the tables above for 0 or -1."""
    if name not in CLASSIFIED:
        pytest.fail(f"{name} is a new numeric option: classify it in ZERO_VALID, MINUS_ONE_VALID or NEITHER_VALID "
                    f"of tests/test_bad_values.py (which of 0 and -1 does it accept, and why)")
    return name in (ZERO_VALID if value == "0" else MINUS_ONE_VALID)


CASES = [pytest.param(name, key, select, value, id=f"{name}={value}")
         for name, key, select in option_keys() for value in ALWAYS_BAD + MAYBE]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("values") / "e.toml")


@pytest.mark.parametrize("name,key,select,value", CASES)
def test_every_numeric_option_refuses_what_cannot_run_and_accepts_what_can(experiment, name, key, select, value):
    valid = value in MAYBE and accepts(name, value)
    args = ["validate", str(experiment)]
    for item in select + [f"{key}={TOML[value]}"]:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    if valid:
        assert result.exit_code == 0 and result.exception is None, f"{name}={value} was refused: {result.stderr}"
        return
    assert result.exit_code == 2, f"{name}={value} was accepted (exit {result.exit_code}): {result.stdout}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # click's exit, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --set {key}={TOML[value]}: {key}: "), result.stderr


def test_every_numeric_option_is_classified_once():
    names = {name for name, _, _ in option_keys()}
    assert not ZERO_VALID & NEITHER_VALID and not MINUS_ONE_VALID & NEITHER_VALID, "classified as valid and as not"
    assert not names - CLASSIFIED, f"classify {sorted(names - CLASSIFIED)} in tests/test_bad_values.py"
    assert not CLASSIFIED - names, f"no such option (renamed or removed?): {sorted(CLASSIFIED - names)}"


def test_the_property_covers_the_schema():
    keys = {key for _, key, _ in option_keys()}
    for expected in ("model.n_layer", "model.dropout", "training.learning_rate", "training.seed", "training.grad_clip",
                     "training.target_val_loss", "training.optimizer.beta2", "training.optimizer.ns_steps",
                     "training.schedule.decay_fraction", "model.ffn.n_experts", "model.attention.kv_rank",
                     "model.positional.base", "model.norm.eps", "data.val_fraction"):
        assert expected in keys, expected
