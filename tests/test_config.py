"""Experiment files: validation, overrides, and one clear error (exit 2, nothing created)."""
import json
from pathlib import Path

import pytest
from helpers import REPO, gptx, write_experiment

from gptx.config import load_experiment
from gptx.errors import ConfigError


def test_shipped_experiments_validate():
    for f in sorted((REPO / "experiments").glob("*.toml")):
        cfg = load_experiment(f)
        assert Path(cfg.data.options.path).is_file(), f
        assert cfg.model.n_embd % cfg.model.n_head == 0


def test_baseline_is_gpt2_architecture():
    cfg = load_experiment(REPO / "experiments" / "baseline.toml")
    m = cfg.model
    assert (m.attention.name, m.positional.name, m.ffn.name, m.norm.name, m.block.name, m.block.options.placement) == (
        "causal", "learned", "gelu", "layernorm", "sequential", "pre")
    assert m.tie_embeddings and m.bias and cfg.tokenizer.name == "gpt2"
    assert m.norm.options.eps == 1e-5


def test_defaults_then_file_then_command_line(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    cfg = load_experiment(f)
    assert cfg.training.learning_rate == 6e-4  # default
    assert cfg.model.n_layer == 2  # file
    cfg = load_experiment(f, ["model.n_layer=3", "training.learning_rate=1e-3", "model.positional.kind=rope",
                              "model.attention.n_kv_heads=1"])
    assert cfg.model.n_layer == 3 and cfg.training.learning_rate == 1e-3
    assert cfg.model.positional.name == "rope" and cfg.model.attention.options.n_kv_heads == 1


def test_data_path_resolves_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "corpus.txt").write_text("hello world\n" * 200)
    f = tmp_path / "sub" / "e.toml"
    write_experiment(f)
    f.write_text(f.read_text().replace(str(REPO / "experiments" / "data" / "tinyshakespeare.txt"), "corpus.txt"))
    monkeypatch.chdir("/")
    assert Path(load_experiment(f).data.options.path) == (tmp_path / "sub" / "corpus.txt").resolve()


def test_resolved_config_round_trips(tmp_path):
    from gptx.config import from_dict

    cfg = load_experiment(write_experiment(tmp_path / "e.toml"), ["model.ffn.kind=swiglu", "model.block.placement=post"])
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("model.n_layerz=3", "model.n_layerz", "did you mean 'n_layer'"),
        ("modle.n_layer=3", "modle", "did you mean 'model'"),
        ("model.n_layer='four'", "model.n_layer", "expected integer"),
        ("model.n_embd=33", "model.n_embd", "not divisible by n_head"),
        ("training.learning_rate=-1.0", "training.learning_rate", "must be in (0, 10], got -1"),
        ("training.max_steps=0", "training.max_steps", "at least 1"),
        ("model.attention.kind=casual", "model.attention.kind", "did you mean 'causal'"),
        ("model.attention.n_kv_heads=3", "model.attention.n_kv_heads", "not divisible"),
        ("model.block.placement=middle", "model.block.placement", "unknown norm_placement"),
        ("model.norm.placement=middle", "model.block.placement", "unknown norm_placement"),  # the key before 0.2
        ("model.positional.kind=rope", "model.n_embd", None),  # valid: rope with head size 16
        ("training.dtype=float16", "training.dtype", "must be one of"),
        ("data.path=missing.txt", "data.path", "not found"),
        ("model.ffn.hidden=0", "model.ffn.hidden", "at least 1"),
    ],
)
def test_bad_values_name_file_key_and_problem(tmp_path, override, key, fragment):
    f = write_experiment(tmp_path / "e.toml")
    if fragment is None:
        load_experiment(f, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_experiment(f, [override])
    msg = str(err.value)
    assert err.value.key == key and fragment in msg and f"--set {override}" in msg


def test_block_size_beyond_positional_limit(tmp_path):
    # learned positions are sized by block_size; a sinusoidal one is unbounded; check the limit hook
    from gptx.plugins.positional import LearnedPositions

    cfg = load_experiment(write_experiment(tmp_path / "e.toml"))
    assert LearnedPositions.max_positions(cfg.model, None) == cfg.model.block_size


def test_malformed_toml_names_line_and_column(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nn_layer = = 2\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(f)
    assert str(f) in str(err.value) and "line 2" in str(err.value)


@pytest.mark.slow
def test_cli_validate_and_errors(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    ok = gptx("validate", f)
    assert ok.returncode == 0 and "OK" in ok.stdout
    js = gptx("validate", f, "--json", "--set", "model.positional.kind=alibi")
    assert json.loads(js.stdout)["model"]["positional"]["kind"] == "alibi"
    bad = gptx("run", f, "--set", "model.attention.kind=casual", cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.attention.kind" in lines[0] and "causal" in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing created


def test_paths_from_set_are_relative_to_the_current_folder_paths_in_the_file_to_the_file(tmp_path, monkeypatch):
    from gptx.config import load_experiment

    (tmp_path / "exp").mkdir()
    (tmp_path / "here").mkdir()
    f = tmp_path / "exp" / "e.toml"
    f.write_text('[data]\npath = "corpus.txt"\n')
    for folder in ("exp", "here"):
        (tmp_path / folder / "corpus.txt").write_text("to be or not to be " * 200)
    monkeypatch.chdir(tmp_path / "here")
    assert load_experiment(f).data.options.path == str(tmp_path / "exp" / "corpus.txt")
    typed = load_experiment(f, ["data.path=corpus.txt", "training.init_from=ckpt"], check_data=False)
    assert typed.data.options.path == str(tmp_path / "here" / "corpus.txt")
    assert typed.training.init_from == str(tmp_path / "here" / "ckpt")


def test_a_component_spec_names_its_component_and_the_old_attribute_still_reads(tmp_path):
    cfg = load_experiment(write_experiment(tmp_path / "e.toml"), ["model.positional.kind=rope"])
    assert cfg.model.positional.name == "rope" and cfg.model.positional.to_dict()["kind"] == "rope"  # the TOML key stays
    with pytest.warns(DeprecationWarning, match="now ComponentSpec.name"):
        assert cfg.model.positional.kind == "rope"
