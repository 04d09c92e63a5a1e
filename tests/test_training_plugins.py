"""The training side as plugins: optimizers, schedules, datasets and auxiliary losses, built-in
and third-party (tests/plugin_packages/gptx-training-plugin, pip-installed), through the real
CLI; keys that moved into component tables; the one loss the model owns."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, gptx, install_plugin_packages, plugin_env, write_experiment
from safetensors.torch import load_file

from gptx import registry as registry_mod
from gptx.components import Aux, FeedForwardOutput
from gptx.config import from_dict, load_experiment
from gptx.errors import ConfigError
from gptx.model import GPT
from gptx.plugins.ffn import GeluMLP, MLPOptions
from gptx.training.step import build_optimizer, build_schedule
from gptx.training.trainer import train

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 64}


def schedule(kind: str, max_steps=100, learning_rate=1e-2, **options):
    cfg = from_dict({"model": TINY, "training": {"max_steps": max_steps, "learning_rate": learning_rate,
                                                "schedule": {"kind": kind, **options}}})
    return build_schedule(cfg)


# ---- schedules -------------------------------------------------------------------------------

def test_cosine_is_nanogpts_schedule():
    s = schedule("cosine", max_steps=2000, learning_rate=1e-3, warmup_steps=100, min_lr=1e-4)
    lr = lambda step: 1e-3 * s.factor(step)  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 101) and lr(99) == pytest.approx(1e-3 * 100 / 101)
    assert lr(100) == pytest.approx(1e-3)
    assert lr(1050) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert lr(2000) == pytest.approx(1e-4) and lr(10_000) == pytest.approx(1e-4)
    assert schedule("cosine", learning_rate=1e-3, warmup_steps=0).factor(100) == pytest.approx(0.1)  # min_lr: lr / 10


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_to_min_lr(shape):
    s = schedule("wsd", max_steps=100, learning_rate=1e-2, warmup_steps=10, decay_fraction=0.2, min_lr=1e-3, shape=shape)
    f = [s.factor(i) for i in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10:80] == [1.0] * 70  # stable
    assert all(a > b for a, b in zip(f[79:], f[80:]))  # strictly decaying over the last 20 steps
    assert f[99] == pytest.approx(0.1)  # min_lr / learning_rate at the last step
    p = 10 / 20  # halfway through the decay (step 89 is the 10th decay step)
    drop = p if shape == "linear" else math.sqrt(p)
    assert f[89] == pytest.approx(0.1 + 0.9 * (1 - drop))


def test_constant_with_warmup():
    s = schedule("constant", warmup_steps=4)
    assert [s.factor(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_schedule_options_are_validated():
    with pytest.raises(ConfigError, match="training.schedule.min_lr: must be between 0 and learning_rate"):
        schedule("cosine", learning_rate=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="training.schedule.decay_fraction"):
        schedule("wsd", decay_fraction=0)
    with pytest.raises(ConfigError, match="training.schedule.kind: unknown schedule 'wds' \\(did you mean 'wsd'"):
        schedule("wds")


# ---- optimizers ------------------------------------------------------------------------------

def make(optimizer: dict, **model):
    cfg = from_dict({"model": TINY | model, "training": {"learning_rate": 3e-3, "optimizer": optimizer}})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    return cfg, model, build_optimizer(cfg, model, torch.device("cpu"))


def test_adamw_decays_matrices_only_with_the_peak_lr():
    cfg, model, opt = make({"kind": "adamw", "weight_decay": 0.05, "beta2": 0.99})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["lr"] == 3e-3 and decay["betas"] == (0.9, 0.99)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    cfg, model, opt = make({"kind": "muon", "lr": 0.05, "embedding_lr": 0.01, "embedding_weight_decay": 0.5},
                           tie_embeddings=False)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert matrices == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    by_role = {tuple(sorted(names[id(p)] for p in g["params"])): g["lr"] for g in adamw.param_groups}
    assert by_role[("positional.wpe.weight", "wte.weight")] == 0.01  # embeddings: their own lr
    assert by_role[("lm_head.weight",)] == 3e-3  # untied head: training.learning_rate
    decay = {tuple(sorted(names[id(p)] for p in g["params"])): g["weight_decay"] for g in adamw.param_groups}
    assert decay[("positional.wpe.weight", "wte.weight")] == 0.5 and decay[("lm_head.weight",)] == 0.0
    assert muon.param_groups[0]["lr"] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_round_trips_bitwise(tmp_path, optimizer):
    """Train 6 steps, or 3 + save + restore into fresh objects + 3: the same weights, bit for bit."""
    from gptx import distributed

    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))

    def steps(model, opt, n):
        for _ in range(n):
            model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    _, a, opt_a = make({"kind": optimizer})
    steps(a, opt_a, 6)
    _, b, opt_b = make({"kind": optimizer})
    steps(b, opt_b, 3)
    dist = distributed.Dist()
    state = distributed.full_optimizer_state(b, opt_b, dist)
    torch.save({"optimizer": state}, tmp_path / "trainer.pt")
    _, c, opt_c = make({"kind": optimizer})
    loaded = torch.load(tmp_path / "trainer.pt", weights_only=True)["optimizer"]
    distributed.load_full_state(c, opt_c, {k: v.clone() for k, v in b.state_dict().items()}, loaded, dist)
    steps(c, opt_c, 3)
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name


# ---- keys that moved, kinds changed on the command line --------------------------------------

def test_old_flat_keys_are_read_at_their_new_place_with_a_note(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    f.write_text(f.read_text().replace("max_steps = 20", "max_steps = 20\nbeta2 = 0.98\nwarmup_steps = 7"))
    cfg = load_experiment(f)
    assert cfg.training.optimizer.options.beta2 == 0.98 and cfg.training.schedule.options.warmup_steps == 7
    assert any("training.beta2 is now training.optimizer.beta2" in n for n in cfg.notes)
    f.write_text(f.read_text() + "\n[training.optimizer]\nbeta2 = 0.9\n")
    with pytest.raises(ConfigError, match="training.beta2: is now training.optimizer.beta2, which is also set"):
        load_experiment(f)


def test_changing_kind_on_the_command_line_drops_the_files_options_of_the_old_kind(tmp_path):
    f = write_experiment(tmp_path / "e.toml")
    f.write_text(f.read_text() + '\n[model.ffn]\nkind = "gelu"\napproximate = "none"\nhidden = 48\n')
    cfg = load_experiment(f, ["model.ffn.kind=swiglu"])
    assert cfg.model.ffn.name == "swiglu" and cfg.model.ffn.options.hidden == 48  # swiglu has `hidden`
    (note,) = cfg.notes
    assert "model.ffn: swiglu has no option approximate" in note and "--set 'model.ffn={kind=\"swiglu\"}'" in note
    cfg = load_experiment(f, ['model.ffn={kind="swiglu"}'])  # the documented way to replace the table
    assert cfg.model.ffn.options.hidden is None and not cfg.notes


# ---- auxiliary losses: returned, added to the objective, logged ------------------------------

@dataclasses.dataclass(frozen=True)
class AuxOptions(MLPOptions):
    weight: float = 0.5


class MLPWithAux(GeluMLP):
    """A GELU MLP that reports the mean square of its output as an auxiliary loss."""

    Options = AuxOptions

    def forward(self, x):
        y = super().forward(x)
        if not self.training:
            return y  # no Aux: the bare tensor is the whole output
        aux = Aux(losses={"energy": (y.pow(2).mean(), self.options.weight)}, metrics={"mean": y.mean()})
        return FeedForwardOutput(y, aux)


class AuxPlugin:
    @staticmethod
    @__import__("gptx").hookimpl
    def register_ffn(register):
        register("with_aux", MLPWithAux)


@pytest.fixture()
def aux_registry():
    reg = registry_mod.load(extra_plugins=(AuxPlugin,))
    registry_mod.use(reg)
    yield reg
    registry_mod.use(None)


def test_the_objective_is_cross_entropy_plus_weighted_aux_losses(aux_registry):
    cfg = from_dict({"model": TINY | {"ffn": {"kind": "with_aux", "weight": 0.5}}}, aux_registry)
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert set(out.aux) == {"aux/layer0.ffn/energy", "aux/layer1.ffn/energy"}
    assert set(out.metrics) == {"aux/layer0.ffn/mean", "aux/layer1.ffn/mean"}
    assert out.loss.item() == pytest.approx(out.ce.item() + 0.5 * sum(v.item() for v in out.aux.values()), rel=1e-6)
    model.eval()
    plain = model(ids[:, :-1], targets=ids[:, 1:])  # evaluation: no aux, the objective is the cross-entropy
    assert plain.aux == {} and torch.equal(plain.loss, plain.ce)


def test_aux_losses_are_logged_to_mlflow_per_step(tmp_path, aux_registry, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "e.toml")
    cfg = load_experiment(f, ["model.ffn.kind=with_aux", "training.max_steps=10", "tracking.enabled=true",
                              f"tracking.uri='{mlflow_sqlite}'", "training.sample_tokens=0"], registry=aux_registry)
    result = train(cfg, progress=False)
    client = MlflowClient(mlflow_sqlite)
    history = client.get_metric_history(result.run_id, "aux/layer1.ffn/energy")
    assert [m.step for m in history] == [5, 10] and all(m.value > 0 for m in history)  # log_interval 5
    assert client.get_metric_history(result.run_id, "aux/layer0.ffn/mean")
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("aux/layer1.ffn/energy" in r for r in lines)


# ---- third-party optimizer, schedule and dataset, pip-installed --------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return install_plugin_packages(tmp_path_factory.mktemp("plugins"), ["gptx-training-plugin"])


def plugin_experiment(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = write_experiment(d / "e.toml")
    text = f.read_text().replace('[tokenizer]\nkind = "char"', '[tokenizer]\nkind = "byte"')
    text = text.replace(f'path = "{REPO / "experiments" / "data" / "tinyshakespeare.txt"}"',
                        'kind = "copy_task"\nsymbols = 12\nspan = 6')
    text += '\n[training.optimizer]\nkind = "lion"\nlr = 3e-3\n\n[training.schedule]\nkind = "inverse_sqrt"\nwarmup_steps = 10\n'
    f.write_text(text.replace("max_steps = 20", "max_steps = 60\ncheckpoint_interval = 10").replace("sample_tokens = 10", "sample_tokens = 0"))
    return f


@pytest.mark.slow
def test_third_party_training_components_are_listed(site):
    rows = json.loads(gptx("components", "--json", env=plugin_env(site), check=True).stdout)
    found = {(r["kind"], r["name"]): r for r in rows}
    for kind, name in (("optimizer", "adamw"), ("optimizer", "muon"), ("optimizer", "lion"), ("schedule", "cosine"),
                       ("schedule", "wsd"), ("schedule", "constant"), ("schedule", "inverse_sqrt"),
                       ("dataset", "text"), ("dataset", "copy_task")):
        assert (kind, name) in found, (kind, name)
    assert found[("optimizer", "lion")]["distribution"] == "gptx-training-plugin"
    shown = gptx("components", "lion", env=plugin_env(site), check=True).stdout
    assert "[training.optimizer] kind = \"lion\"" in shown and "beta2 = 0.99  (number in [-1e+06, 1e+06])" in shown  # a plugin's float without a declared range


@pytest.mark.slow
def test_third_party_optimizer_schedule_and_dataset_train_and_resume_bitwise(tmp_path, site):
    f = plugin_experiment(tmp_path / "a")
    gptx("run", f, "--quiet", cwd=tmp_path, env=plugin_env(site), check=True)
    (run_a,) = (tmp_path / "a" / "runs" / "e").iterdir()
    final = json.loads((run_a / "run.json").read_text())["final_val_loss"]
    first = json.loads((run_a / "metrics.jsonl").read_text().splitlines()[0])
    assert final < 0.8 * first["train_loss"], (first, final)
    assert "lion" in (run_a / "checkpoints" / "step-000060" / "gptx.json").read_text()

    g = plugin_experiment(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(g), "--quiet"], cwd=tmp_path,
                            env={**__import__("os").environ, **plugin_env(site)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "b" / "runs" / "e"
    deadline = time.time() + 300
    while not list(runs.glob("*/checkpoints/step-000020")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    gptx("run", g, "--resume", "--quiet", cwd=tmp_path, env=plugin_env(site), check=True)
    (run_b,) = runs.iterdir()
    a = load_file(run_a / "checkpoints" / "step-000060" / "model.safetensors")
    b = load_file(run_b / "checkpoints" / "step-000060" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU


@pytest.mark.slow
def test_muon_with_wsd_trains_shakespeare_and_resumes_bitwise(tmp_path):
    """The issue's acceptance, shortened: shakespeare_char's recipe with muon + wsd; the loss falls
    clearly, and a run stopped by SIGTERM and resumed ends with the uninterrupted run's weights."""
    sets = ["training.optimizer.kind=muon", "training.schedule.kind=wsd", "training.schedule.warmup_steps=5",
            "training.max_steps=40",
            "training.eval_interval=20", "training.checkpoint_interval=10", "training.sample_tokens=0",
            "tracking.enabled=false", "training.threads=1", "training.final_eval_tokens=20000",
            f"training.out_dir='{tmp_path / 'runs'}'"]
    args = [a for s in sets for a in ("--set", s)]
    exp = REPO / "experiments" / "shakespeare_char.toml"
    whole = gptx("run", exp, *args, "--set", "tracking.run_name='whole'", "--quiet", cwd=tmp_path, check=True)
    info = json.loads((tmp_path / "runs" / "shakespeare_char" / "whole" / "run.json").read_text())
    assert info["final_val_loss"] < 3.0, whole.stdout  # from ln(65) = 4.17
    proc = subprocess.Popen([sys.executable, "-m", "gptx", "run", str(exp), *args, "--set", "tracking.run_name='cut'",
                             "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cut = tmp_path / "runs" / "shakespeare_char" / "cut"
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step-000010").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    gptx("run", exp, *args, "--set", "tracking.run_name='cut'", "--resume", "--quiet", cwd=tmp_path, check=True)
    assert json.loads((cut / "run.json").read_text())["final_val_loss"] == info["final_val_loss"]


class NanAtStepThree:
    """A schedule plugin whose factor breaks at one step: the run names the step and the value."""

    @staticmethod
    @__import__("gptx").hookimpl
    def register_schedule(register):
        from gptx.plugins.schedules import Constant

        class Broken(Constant):
            def factor(self, step):
                return float("nan") if step == 3 else 1.0

        register("broken", Broken)


def test_a_schedule_factor_that_is_not_a_number_names_the_step_and_value(tmp_path):
    from gptx.errors import GptxError

    reg = registry_mod.load(extra_plugins=(NanAtStepThree,))
    registry_mod.use(reg)
    try:
        cfg = load_experiment(write_experiment(tmp_path / "e.toml", '\n[training.schedule]\nkind = "broken"\n'),
                              ["training.max_steps=6"], registry=reg)
        with pytest.raises(GptxError, match=r"training.schedule 'broken' \(.*Broken\): factor\(3\) returned nan; "
                                            r"a learning-rate factor must be a finite number >= 0"):
            train(cfg, progress=False)
    finally:
        registry_mod.use(None)


def test_an_optimizer_state_holding_another_type_names_it_on_resume(tmp_path):
    from gptx import checkpoint
    from gptx.errors import GptxError

    from fractions import Fraction

    torch.save({"optimizer": {"state": {0: {"momentum": Fraction(1, 3)}}}}, tmp_path / "trainer.pt")
    with pytest.raises(GptxError, match=r"trainer.pt: cannot be loaded safely: it holds a fractions.Fraction, which gptx does not unpickle \(weights_only\); "
                                        r"an optimizer's or dataset's state_dict must hold only tensors"):
        checkpoint.load_trainer_state(tmp_path)
