"""A new kind of component is one entry in ``gptx.kinds.KINDS``, its interface in
``gptx.components`` and a built-in plugin module — three files. Proved on a scratch copy of the
package: add a ``regularizer`` kind there and nothing else, then the config loader, the registry,
``gptx components``, ``gptx check-plugin``, checkpoints and MLflow params all know it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_experiment

REPO = Path(__file__).resolve().parents[1]

KIND = '''    Kind("regularizer", "Regularizer", "training.regularizer", "none", "training",
         "a penalty on the weights added to the loss"),
)
'''

INTERFACE = '''

class Regularizer(Component, abc.ABC):
    """A penalty on the weights. Its ``Options`` are the ``[training.regularizer]`` table."""

    supports = frozenset()

    def __init__(self, options, training):
        self.options, self.training = options, training

    @abc.abstractmethod
    def penalty(self, named_parameters) -> float: ...
'''

PLUGIN = '''"""Weight penalties: none, or an L2 penalty of a given weight."""
import dataclasses

import gptx
from gptx.components import Regularizer
from gptx.options import option


class NoPenalty(Regularizer):
    def penalty(self, named_parameters):
        return 0.0


@dataclasses.dataclass(frozen=True)
class L2Options:
    weight: float = option(1e-4, low=0, high=1)  # the penalty's factor


class L2(Regularizer):
    Options = L2Options

    def penalty(self, named_parameters):
        return self.options.weight * sum(float((p * p).sum()) for _, p in named_parameters)


@gptx.hookimpl(trylast=True)
def register_regularizer(register):
    register("none", NoPenalty)
    register("l2", L2)
'''


def scratch_package(root: Path) -> Path:
    """A copy of gptx laid out as installed (core/ is gptx, plugins/ is gptx.plugins, ...)."""
    skip = shutil.ignore_patterns("__pycache__", "node_modules")
    shutil.copytree(REPO / "core", root / "gptx", ignore=skip)
    for folder in ("plugins", "export", "experiments"):
        shutil.copytree(REPO / folder, root / "gptx" / folder, ignore=skip)
    return root


def add_regularizer_kind(pkg: Path) -> list[Path]:
    """The three edits a new kind takes; returns the files touched."""
    kinds = pkg / "kinds.py"
    text = kinds.read_text()
    end = text.index("\n)\n", text.index("KINDS: tuple[Kind, ...] = ("))
    kinds.write_text(text[:end + 1] + KIND + text[end + 3:])
    components = pkg / "components.py"
    components.write_text(components.read_text() + INTERFACE)
    plugin = pkg / "plugins" / "regularizers.py"
    plugin.write_text(PLUGIN)
    return [kinds, components, plugin]


@pytest.mark.slow
def test_a_new_kind_is_one_entry_its_interface_and_a_builtin_plugin(tmp_path, mlflow_sqlite):
    root = scratch_package(tmp_path / "src")
    touched = add_regularizer_kind(root / "gptx")
    assert len(touched) == 3
    env = os.environ | {"PYTHONPATH": str(root)}

    def gptx(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
        return proc

    where = subprocess.run([sys.executable, "-c", "import gptx; print(gptx.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(root)), where
    # the catalog and the hook: `gptx components` lists the new kind and its built-ins
    catalog = gptx("components").stdout
    assert "regularizer" in catalog and "l2" in catalog, catalog
    # the config loader: the table is validated by the component's options, errors name the key
    exp = write_experiment(tmp_path / "reg.toml", '\n[training.regularizer]\nkind = "l2"\nweight = 0.01\n')
    gptx("validate", exp)
    bad = gptx("validate", exp, "--set", "training.regularizer.weight=2", check=False)
    assert bad.returncode == 2 and "training.regularizer.weight" in bad.stderr, bad.stderr
    unknown = gptx("validate", exp, "--set", "training.regularizer.kind='l3'", check=False)
    assert unknown.returncode == 2 and "training.regularizer" in unknown.stderr and "l2" in unknown.stderr, unknown.stderr
    # the contract checks
    checked = gptx("check-plugin", "l2")
    assert "regularizer l2" in checked.stdout and "FAIL" not in checked.stdout, checked.stdout
    # a run: the checkpoint's config and the MLflow params carry the component
    gptx("run", exp, "--set", "training.max_steps=2", "--set", "training.eval_interval=2", "--set", "tracking.enabled=true",
         "--set", f"tracking.uri='{mlflow_sqlite}'", "--set", "training.final_eval_tokens=0", "--quiet")
    stored = json.loads(next((tmp_path / "runs").rglob("gptx.json")).read_text())
    assert stored["config"]["training"]["regularizer"] == {"kind": "l2", "weight": 0.01}, stored["config"]["training"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.data.params["training.regularizer.kind"] == "l2"
    assert float(run.data.params["training.regularizer.weight"]) == 0.01
