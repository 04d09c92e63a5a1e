"""Helpers shared by test modules (importable: pyproject puts tests/ on pythonpath)."""
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "experiments" / "data" / "tinyshakespeare.txt"


def gptx(*args, cwd=None, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess: ``python -m gptx ARGS``."""
    full_env = os.environ.copy() | (env or {})
    proc = subprocess.run([sys.executable, "-m", "gptx", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptx {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_experiment(path: Path, body: str = "", data: Path = SHAKESPEARE, **sections) -> Path:
    """A tiny experiment TOML (2 layers, 32 wide, char tokenizer, tracking off) plus ``body``."""
    text = f'''
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[tokenizer]
kind = "char"

[data]
path = "{data}"

[training]
max_steps = 20
batch_size = 4
eval_interval = 10
eval_steps = 2
log_interval = 5
sample_tokens = 10
out_dir = "{path.parent / 'runs'}"

[tracking]
enabled = false
'''
    path.write_text(text + body)
    return path


def plugin_experiment(path: Path, model: str = "", tokenizer: str = "char", max_steps: int = 10, sample_tokens: int = 0,
                      tables: str = "", tracking: str = "enabled = false") -> Path:
    """A 2-layer, 32-wide, 4-head experiment on one thread with the ``[model.*]`` tables in ``model``
    (a plugin's parts), ``tables`` appended last (``[training.optimizer]`` and the like)."""
    path.write_text(textwrap.dedent(f"""
        [model]
        n_layer = 2
        n_head = 4
        n_embd = 32
        block_size = 32
        [tokenizer]
        kind = "{tokenizer}"
        [data]
        path = {json.dumps(str(SHAKESPEARE))}
        [training]
        batch_size = 4
        max_steps = {max_steps}
        eval_interval = 10
        eval_steps = 2
        log_interval = {max(1, max_steps // 2)}
        sample_tokens = {sample_tokens}
        final_eval_tokens = 0
        threads = 1
        [tracking]
        """) + tracking + "\n" + textwrap.dedent(model) + textwrap.dedent(tables))
    return path


def start_mlflow_server(d: Path) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1 (the FIELD-NOTES recipe) in its own process group,
    its store and log in ``d``. Returns the process and its URL once /health answers OK."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)


def fake_node_modules(root: Path) -> Path:
    """A node_modules under ``root`` laid out as npm installs the page's pinned packages, holding
    the files the page loads (their content does not matter to the server)."""
    import json

    from gptx.export import server

    modules = root / "node_modules"
    for package, version in server.pinned_versions().items():
        (modules / package).mkdir(parents=True)
        (modules / package / "package.json").write_text(json.dumps({"name": package, "version": version}))
        for f in server.VENDORED[package]:
            (modules / package / f).parent.mkdir(parents=True, exist_ok=True)
            (modules / package / f).write_bytes(b"\0asm" if f.endswith(".wasm") else b"export {};\n")
    return modules


def tiny_model(tokenizer: str = "byte", state=None, seed: int = 0, **model):
    """A randomly initialised (seed ``seed``) model of the given sizes — by default 1 layer, 2 heads,
    16 wide, context 32 — with its config and tokenizer, vocab_size taken from the tokenizer.
    Returns (model, config, tokenizer)."""
    import torch

    from gptx import checkpoint
    from gptx.config import from_dict
    from gptx.model import GPT

    sizes = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32} | model
    cfg = from_dict({"model": sizes, "tokenizer": {"kind": tokenizer}})
    tok = checkpoint.build_tokenizer(cfg.tokenizer, state)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    return GPT(cfg.model), cfg, tok


def tiny_checkpoint(run_dir: Path, tokenizer: str = "byte", state=None, seed: int = 0, **model) -> Path:
    """The one recipe for a test checkpoint: ``tiny_model(...)`` saved at step 1 under run_dir;
    returns the checkpoint directory."""
    from gptx import checkpoint

    return checkpoint.save(Path(run_dir), 1, *tiny_model(tokenizer, state, seed, **model))


def tiny_checkpoint_and_export(root: Path, block_size: int = 32, tokenizer: str = "byte", state: dict | None = None):
    """A 1-layer checkpoint (random weights, seed 0; byte-level unless ``tokenizer`` and its
    ``state`` say otherwise) in root/run and its verified ONNX export in root/export, made
    in-process. Returns (checkpoint dir, export dir)."""
    from gptx.export.onnx_export import export_checkpoint

    ck = tiny_checkpoint(root / "run", tokenizer, state, block_size=block_size)
    export_checkpoint(ck, root / "export", log=lambda _msg: None, track=False)
    return ck, root / "export"


PLUGIN_PACKAGES = Path(__file__).resolve().parent / "plugin_packages"


def install_plugin_packages(tmp: Path, names: list[str]) -> Path:
    """pip-install the packages under tests/plugin_packages named ``names`` into a fresh
    ``--target`` directory (offline with this environment's setuptools); returns it. Put it on
    PYTHONPATH (``plugin_env``) for a subprocess to see the plugins."""
    import importlib.util
    import shutil

    sources = []
    for name in names:  # build from copies: setuptools writes build/ and *.egg-info in place
        shutil.copytree(PLUGIN_PACKAGES / name, tmp / name, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        sources.append(str(tmp / name))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target", str(target)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd += ["--no-build-isolation", "--no-index"]
    proc = subprocess.run(cmd + sources, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def plugin_env(site: Path, load: str | None = None) -> dict:
    """Environment variables for a subprocess that sees the plugins installed in ``site``."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    if load is not None:
        env["GPTX_LOAD_PLUGINS"] = load
    return env


_MADE: dict = {}


def once(key, make):
    """``make()`` once per test process, remembered under ``key``. For module fixtures that build
    something slow (an export): pytest-xdist may tear such a fixture down and set it up again
    between two batches of the module's tests, and the second build would cost as much as the first."""
    if key not in _MADE:
        _MADE[key] = make()
    return _MADE[key]


def wandering_export(root: Path, tokenizer: str, seed: int, state=None, stop_prompt=None, attention=None, log=None,
                     quantize=None) -> Path:
    """A 2-layer, 64-wide model (untied LM head, weights x5, so greedy text wanders instead of
    repeating one token) and its verified ONNX export in root/out, for runtimes compared token by
    token. With ``stop_prompt`` (GPT-2 BPE), end-of-text's LM-head row copies (x1.5) the row of
    the third token greedy decoding gives that prompt, so that prompt's greedy text ends there.
    ``attention``: the model's attention table (e.g. the int8 KV cache); ``log`` sees the export's lines;
    ``quantize``: gptx export --quantize's scheme."""
    import torch

    from gptx import checkpoint
    from gptx.export.onnx_export import export_checkpoint

    model, cfg, tok = tiny_model(tokenizer, state, seed, n_layer=2, n_head=4, n_embd=64, block_size=96,
                                 tie_embeddings=False, **({"attention": attention} if attention else {}))
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
        if stop_prompt is not None:
            ids = torch.tensor([tok.encode(stop_prompt)])  # [1, T]
            for _ in range(3):
                logits, _ = model(ids)  # [1, T, V]
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # [1, T+1]
            model.lm_head.weight[tok.eot_id] = 1.5 * model.lm_head.weight[int(ids[0, -1])]
    ck = checkpoint.save(root / "run", 1, model, cfg, tok)
    export_checkpoint(ck, root / "out", quantize=quantize, log=log or (lambda _m: None), track=False)
    return root / "out"


NPM_NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "EHOSTUNREACH")


def missing_tool(reason: str) -> None:
    """A tool the test needs is not on this machine: skip, saying so, on a developer's machine; in CI
    (CI set, as .ci/run's environment has it) fail, since CI installs every tool and a skip there
    would keep it green without running the test."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI must have it: {reason}", pytrace=False)
    pytest.skip(reason)


def skip_if_registry_unreachable(output: str) -> None:
    """An npm install that failed because the registry cannot be reached skips the test, saying so
    (fails in CI); any other failure is left to the caller's assertion."""
    hits = [code for code in NPM_NETWORK_ERRORS if code in output]
    if hits:
        missing_tool(f"the npm registry is unreachable from this machine ({', '.join(hits)}): cannot install the JavaScript packages")


def npm_install_pinned(cache_dir: Path, package_json: Path, env=None) -> Path:
    """``npm install`` the dependencies ``package_json`` pins into a folder of ``cache_dir`` named after
    them (kept between sessions while the pins stay the same); returns its node_modules."""
    import fcntl
    import hashlib
    import json
    import shutil

    deps = json.loads(package_json.read_text())["dependencies"]
    prefix = cache_dir / ("npm-" + hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
    npm = shutil.which("npm")
    assert npm is not None, "npm is not installed (Node.js 18+ with npm is part of the test environment)"
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers take turns; released when the file closes
        if not all((prefix / "node_modules" / name / "package.json").is_file() for name in deps):
            _npm_install(npm, prefix, package_json, env)
    return prefix / "node_modules"


def _npm_install(npm: str, prefix: Path, package_json: Path, env) -> None:
    import shutil

    shutil.copy(package_json, prefix / "package.json")
    r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix)], capture_output=True,
                       text=True, timeout=600, env=os.environ | (env or {}))
    if r.returncode != 0:
        skip_if_registry_unreachable(r.stdout + r.stderr)
    assert r.returncode == 0, f"npm install failed:\n{r.stdout}\n{r.stderr}"


def node_example_modules(request, tmp_path_factory) -> Path:
    """The Node example's packages (export/node/package.json: onnxruntime-node, CPU binaries only, and
    @huggingface/tokenizers), installed once into pytest's cache directory (.pytest_cache,
    git-ignored), or into the test's temporary directory when the cache is disabled."""
    import shutil
    from importlib import resources

    if shutil.which("node") is None or shutil.which("npm") is None:
        missing_tool("Node.js (node and npm) is not installed: the Node example cannot be run here")
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("gptx-node")) if cache is not None else tmp_path_factory.mktemp("gptx-node")
    package_json = Path(str(resources.files("gptx.export") / "node" / "package.json"))
    return npm_install_pinned(root, package_json, env={"ONNXRUNTIME_NODE_INSTALL": "skip"})  # no CUDA download


def node_example(node_modules: Path, out: Path, prompts, n: int, *flags: str) -> subprocess.CompletedProcess:
    """``node generate.js OUT --prompt P ... --max-new-tokens N [flags]``, finished."""
    from importlib import resources

    script = resources.files("gptx.export") / "node" / "generate.js"
    args = ["node", str(script), str(out), "--max-new-tokens", str(n), *flags]
    for p in prompts:
        args += ["--prompt", p]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=dict(os.environ, NODE_PATH=str(node_modules)))


def run_node(node_modules: Path, out: Path, prompts, n: int, *flags: str) -> list[dict]:
    """The Node example's JSON rows for ``prompts`` (greedy, ``n`` new tokens); it must succeed."""
    import json

    r = node_example(node_modules, out, prompts, n, *flags)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


class WebServer:
    """A real ``gptx web`` process on 127.0.0.1 and a free port, stopped by its pid."""

    def __init__(self, *args, env=None):
        # unbuffered: reading the first line must leave the rest of the output in the pipe for stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "gptx", "web", *map(str, args), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                     env=os.environ | (env or {}))
        self.banner = self.proc.stdout.readline().decode()
        if "http://" not in self.banner:
            self.proc.kill()
            raise AssertionError(f"gptx web did not start: {self.banner}{self.proc.stderr.read().decode()}")
        self.url = self.banner.split(" at ")[1].split()[0]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def get(self, raw_path: str, method="GET"):
        """The response to ``raw_path`` sent byte for byte (no client-side normalisation)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.putrequest(method, raw_path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), body

    def stop(self, sig=signal.SIGINT):
        """Signal the server; its exit code, stdout (after the first line) and stderr."""
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out.decode(), err.decode()


# ---- the web page in headless Chromium (fixtures: conftest.py's web_cache, browser, page) ----------

def install_web_packages(root: Path) -> Path:
    """`gptx web --install` into GPTX_CACHE_DIR=root: the page's pinned npm packages."""
    r = gptx("web", "--install", env={"GPTX_CACHE_DIR": str(root)}, timeout=900)
    if r.returncode != 0:
        skip_if_registry_unreachable(r.stderr)
    assert r.returncode == 0, r.stderr
    assert "installed the page's JavaScript packages" in r.stdout
    return root


def serve(out: Path, web_cache: Path):
    """A `gptx web` server for the export ``out`` (a generator for a fixture); stopped cleanly."""
    s = WebServer(out, env={"GPTX_CACHE_DIR": str(web_cache)})
    yield s
    code, _, err = s.stop()
    assert code == 0, err
