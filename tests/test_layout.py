"""The repository layout maps onto one ``gptx`` namespace, and the wheel holds all of it.

setuptools' package-dir maps core/ -> gptx, plugins/ -> gptx.plugins, export/ -> gptx.export,
experiments/ -> gptx.experiments (the shipped experiment files and their data).
Every package must be listed explicitly: a missing one still works in an editable install but is
silently left out of the wheel. And nothing may import ``core``/``plugins``/``export`` directly:
that would be a second copy of the package that only exists when running from the repo root.
"""
import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR = SETUPTOOLS["package-dir"]  # dotted name -> folder
FOLDERS = ("core", "plugins", "export", "experiments")
SKIP_DIRS = {".git", ".tox", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", "mlruns", "runs"}


def folder_to_package() -> dict[str, str]:
    return {folder: pkg for pkg, folder in PACKAGE_DIR.items()}


def expected_packages() -> dict[str, Path]:
    """Dotted name -> folder for every folder with an __init__.py under core/, plugins/, export/."""
    roots = folder_to_package()
    found = {}
    for folder in FOLDERS:
        base = ROOT / folder
        if not base.is_dir():
            continue
        for init in base.rglob("__init__.py"):
            if SKIP_DIRS & set(init.relative_to(ROOT).parts):
                continue
            rel = init.parent.relative_to(base).parts
            found[".".join((roots[folder],) + rel)] = init.parent
    return found


def test_the_folders_are_mapped_to_one_namespace():
    assert PACKAGE_DIR == {"gptx": "core", "gptx.plugins": "plugins", "gptx.export": "export",
                           "gptx.experiments": "experiments"}
    assert PYPROJECT["project"]["scripts"]["gptx"] == "gptx.cli:main"


def test_every_package_folder_is_listed():
    listed = set(SETUPTOOLS["packages"])
    expected = expected_packages()
    assert {"gptx", "gptx.plugins"} <= set(expected)
    missing = sorted(set(expected) - listed)
    assert not missing, f"package folders missing from [tool.setuptools] packages (dropped from the wheel): {missing}"
    roots = folder_to_package()
    for pkg in listed:  # and nothing listed that does not exist
        top = next(p for p in sorted(PACKAGE_DIR, key=len, reverse=True) if pkg == p or pkg.startswith(p + "."))
        folder = ROOT / PACKAGE_DIR[top] / Path(*pkg[len(top):].lstrip(".").split(".") if pkg != top else ())
        assert (folder / "__init__.py").is_file(), f"{pkg} is listed but {folder} has no __init__.py"
    assert set(roots) == set(FOLDERS)


def test_no_python_folder_without_init():
    """A folder of .py files without __init__.py would be a namespace package setuptools leaves out."""
    for folder in FOLDERS:
        base = ROOT / folder
        for py in base.rglob("*.py") if base.is_dir() else ():
            if SKIP_DIRS & set(py.relative_to(ROOT).parts):
                continue
            assert (py.parent / "__init__.py").is_file(), f"{py.relative_to(ROOT)}: its folder has no __init__.py"


def test_bpe_files_are_declared_package_data():
    data = SETUPTOOLS["package-data"]["gptx.plugins"]
    for name in ("vocab.bpe", "encoder.json"):
        rel = f"data/gpt2-bpe/{name}"
        assert (ROOT / "plugins" / rel).is_file()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in data), f"{rel} not matched by {data}"


def _python_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in filenames:
            if f.endswith(".py"):
                yield Path(dirpath) / f


def test_nothing_imports_the_folders_as_top_level_packages():
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names = [node.args[0].value]
            for name in names:
                if name.split(".")[0] in FOLDERS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not offenders, "import gptx.* instead of the folder names:\n" + "\n".join(offenders)


def test_the_package_imports_from_its_installed_name():
    import gptx
    import gptx.plugins

    import gptx.experiments
    import gptx.export

    base = Path(gptx.__file__).parent
    if base == ROOT / "core":  # an editable install: each package from its own folder
        where = {"plugins": ROOT / "plugins", "export": ROOT / "export", "experiments": ROOT / "experiments"}
    else:  # a wheel install: one tree
        where = {"plugins": base / "plugins", "export": base / "export", "experiments": base / "experiments"}
    for name, folder in where.items():
        assert Path(getattr(gptx, name).__file__).parent == folder, name
    assert "core" not in sys.modules and "plugins" not in sys.modules and "export" not in sys.modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source (the working tree stays free of build/ output)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")
    for folder in set(PACKAGE_DIR.values()):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    [whl] = out.glob("gptx-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contains_every_package_and_the_bpe_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg, folder in expected_packages().items():
        for py in folder.glob("*.py"):
            assert f"{pkg.replace('.', '/')}/{py.name}" in names, f"{py.relative_to(ROOT)} missing from the wheel"
    for needed in ("gptx/__init__.py", "gptx/cli.py", "gptx/plugins/__init__.py", "gptx/export/__init__.py",
                   "gptx/plugins/data/gpt2-bpe/vocab.bpe", "gptx/plugins/data/gpt2-bpe/encoder.json",
                   "gptx/export/node/generate.js", "gptx/export/node/bench.js", "gptx/export/node/package.json",
                   "gptx/export/web/index.html",
                   "gptx/export/web/app.mjs", "gptx/export/web/gptx.mjs", "gptx/export/web/gptx.css",
                   "gptx/export/web/package.json", "gptx/experiments/shakespeare_char.toml",
                   "gptx/experiments/baseline.toml", "gptx/experiments/data/tinyshakespeare.txt"):
        assert needed in names, needed
    assert not [n for n in names if n.split("/")[0] in FOLDERS], "the folder names leaked into the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gptx = gptx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_wheel_alone_works(wheel, tmp_path):
    """Unpacked onto PYTHONPATH (ahead of the editable install), the wheel's gptx loads every
    built-in plugin and tokenizes offline from its own BPE files."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    script = (
        "import gptx, json\n"
        "from gptx import registry\n"
        "from gptx.plugins.tokenizers import GPT2Tokenizer, gpt2_bpe_file\n"
        "reg = registry.load()\n"
        "print(json.dumps({'file': gptx.__file__, 'errors': reg.errors, 'bpe': gpt2_bpe_file('vocab.bpe'),\n"
        "                  'ids': GPT2Tokenizer(None).encode('Hello world'), 'attention': reg.names('attention')}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), GPTX_LOAD_PLUGINS="")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path)) and out["bpe"].startswith(str(tmp_path))
    assert out["errors"] == [] and out["ids"] == [15496, 995] and "causal" in out["attention"]


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_virtualenv_works_from_any_folder(wheel, tmp_path):
    """pip install of the wheel (not editable) into a new virtualenv, then the commands whose
    defaults are files gptx ships, run from a folder outside the checkout: gptx bench's default
    experiment and its data, gptx check-plugin's sample text, gptx validate of a shipped file."""
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # gptx's dependencies come from this environment (a path line: its editable gptx is not loaded)
    import torch

    (site / "deps.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}

    def gptx(*args):
        return subprocess.run([str(py), "-m", "gptx", *args], capture_output=True, text=True, env=env, cwd=work, timeout=600)

    where = subprocess.run([str(py), "-c", "import gptx; print(gptx.__file__)"], capture_output=True, text=True, env=env, cwd=work)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # the wheel's gptx, not the checkout's
    bench = gptx("bench", "--only", "train", "--train-steps", "3", "--warmup-steps", "1", "--json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["train"]["experiment"].startswith(str(site)) and result["train"]["tokens_per_s"] > 0
    check = gptx("check-plugin", "relu2", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["passed"], check.stdout[-2000:] + check.stderr[-2000:]
    shipped = site / "gptx" / "experiments" / "shakespeare_char.toml"
    valid = gptx("validate", shipped)
    assert valid.returncode == 0 and "OK" in valid.stdout, valid.stderr
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written where it ran
