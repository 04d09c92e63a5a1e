"""``gptx web OUT_DIR``: the command's errors, what its server serves and refuses, and how it stops.
Each case runs the real CLI in a subprocess; the page itself runs in test_web_browser.py."""
import json
import signal
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from gptx.export import server
from helpers import WebServer, fake_node_modules, gptx, once, tiny_checkpoint_and_export


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return once("web-byte", lambda: tiny_checkpoint_and_export(tmp_path_factory.mktemp("web"))[1])


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory) -> Path:
    """A node_modules laid out as npm installs the pinned packages, holding the files the page loads
    (their content does not matter to the server)."""
    root = fake_node_modules(tmp_path_factory.mktemp("npm"))
    (root / "onnxruntime-web" / "secret.txt").write_text("not for the page")
    return root


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def served(out_dir, node_modules):
    s = WebServer(out_dir, "--node-modules", node_modules)
    yield s
    if s.proc.poll() is None:
        s.stop(signal.SIGKILL)


# ---- what it serves -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, content_type", [
    ("/", "text/html; charset=utf-8"),
    ("/app.mjs", "text/javascript; charset=utf-8"),
    ("/gptx.mjs", "text/javascript; charset=utf-8"),
    ("/gptx.css", "text/css; charset=utf-8"),
    ("/export/gptx_export.json", "application/json"),
    ("/export/model.onnx", "application/octet-stream"),
    ("/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm", "application/wasm"),
    ("/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", "text/javascript; charset=utf-8"),
    ("/node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs", "text/javascript; charset=utf-8"),
    ("/node_modules/%40huggingface/tokenizers/dist/tokenizers.min.mjs?v=1", "text/javascript; charset=utf-8"),
])
def test_serves_the_page_the_packages_and_the_export(served, out_dir, path, content_type):
    status, headers, body = served.get(path)
    assert status == 200 and headers["Content-Type"] == content_type
    assert int(headers["Content-Length"]) == len(body) > 0
    # cross-origin isolation: onnxruntime-web may run its WebAssembly on several threads
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin" and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    if path == "/export/gptx_export.json":
        assert body == (out_dir / "gptx_export.json").read_bytes()
    head_status, head_headers, head_body = served.get(path, method="HEAD")
    assert head_status == 200 and head_body == b"" and head_headers["Content-Length"] == headers["Content-Length"]


TRAVERSALS = [
    "/../../../../etc/passwd",
    "/export/../../../../../etc/passwd",
    "/export/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/export/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/export/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/export/%252e%252e/%252e%252e/etc/passwd",
    "/export//etc/passwd",
    "//etc/passwd",
    "/export/%2fetc%2fpasswd",
    "/export/..\\..\\..\\..\\etc\\passwd",
    "/export/..%5c..%5c..%5c..%5cetc%5cpasswd",
    "/export/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/export/gptx_export.json%00.html",
    "/export/link-out",
    "/node_modules/onnxruntime-web/package.json",
    "/node_modules/onnxruntime-web/secret.txt",
    "/node_modules/onnxruntime-web/dist/../secret.txt",
    "/node_modules/onnxruntime-web/dist/%2e%2e/secret.txt",
    "/package.json",
    "/export",
    "/nonexistent.html",
]


def test_refuses_everything_outside_the_two_folders(served, out_dir):
    link = out_dir / "link-out"
    link.symlink_to("/etc/passwd")  # a symlink inside the export folder must not lead out of it
    try:
        for path in TRAVERSALS:
            status, _, body = served.get(path)
            assert status == 404, path
            assert b"root:" not in body and b"not for the page" not in body, path
    finally:
        link.unlink()
    status, _, _ = served.get("/", method="DELETE")
    assert status == 501


def test_ctrl_c_stops_it_cleanly(served, out_dir):
    assert str(out_dir) in served.banner and served.url.startswith("http://127.0.0.1:")
    code, out, err = served.stop(signal.SIGINT)
    assert code == 0 and "stopped" in out and err == ""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=2)


def test_sigterm_stops_it_cleanly(served):
    code, out, err = served.stop(signal.SIGTERM)
    assert code == 0 and "stopped" in out and err == ""


def test_listening_beyond_loopback_says_so(out_dir, node_modules):
    s = WebServer(out_dir, "--node-modules", node_modules, "--host", "0.0.0.0")
    code, out, _ = s.stop()
    assert code == 0 and "Warning: listening on 0.0.0.0" in out


# ---- bad input: one line, exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("port", ["-1", "70000", "x", "nan", "inf", str(2**70), "1.5", "", "0x50"])
def test_a_bad_port_is_one_line(out_dir, port):
    one_line_error(gptx("web", out_dir, "--port", port), "--port", "0 (any free port) to 65535", repr(port))


@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "--bogus: no such option"),
    (["--hots", "x"], "--hots: no such option (did you mean --host"),
    (["--port"], "--port"),
    ([], "OUT_DIR: missing"),
])
def test_usage_errors_are_one_line(args, fragment):
    one_line_error(gptx("web", *args), fragment)


def test_a_port_in_use_is_one_line(out_dir, node_modules):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = gptx("web", out_dir, "--node-modules", node_modules, "--port", port)
    one_line_error(r, f"--port: {port} on 127.0.0.1 is in use")


@pytest.mark.parametrize("host", ["nonexistent.invalid", "8.8.8.8", "::zz"])
def test_a_host_it_cannot_listen_on_is_one_line(out_dir, node_modules, host):
    one_line_error(gptx("web", out_dir, "--node-modules", node_modules, "--host", host, "--port", "0"), f"--host: cannot listen on '{host}'")


def test_bad_export_directories_are_one_line(tmp_path, out_dir, node_modules):
    one_line_error(gptx("web", tmp_path / "nope"), "nope: no such export directory")
    one_line_error(gptx("web", tmp_path), "not a gptx export (no gptx_export.json)")
    (tmp_path / "file").write_text("x")
    one_line_error(gptx("web", tmp_path / "file"), "no such export directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    for content, fragment in [("{not json", "corrupted"), ("", "corrupted"), ("[1, 2]", "not a gptx export"),
                              (json.dumps({"format": "gptx.export", "format_version": 99}), "newer gptx")]:
        (bad / "gptx_export.json").write_text(content)
        one_line_error(gptx("web", bad), str(bad), fragment)
    meta = json.loads((out_dir / "gptx_export.json").read_text())
    (bad / "gptx_export.json").write_text(json.dumps(meta))
    one_line_error(gptx("web", bad), "missing model.onnx")
    (bad / "model.onnx").write_bytes(b"")
    def with_tokenizer(kind, options, state, **more):
        from gptx.export import tokenizer_hash

        tok = meta["tokenizer"] | {"kind": kind, "options": options, "state": state, "sha256": tokenizer_hash(kind, options, state)}
        (bad / "gptx_export.json").write_text(json.dumps(meta | {"tokenizer": tok | more}))

    meta["files"] = [f for f in meta["files"] if f != "tokenizer.json"]  # what an export of such a tokenizer lists
    with_tokenizer("tiktoken", {"encoding": "cl100k_base"}, {})
    one_line_error(gptx("web", bad), "tokenizer 'tiktoken' has no tokenizer.json, which the web page needs")
    with_tokenizer("gpt2", {}, {}, gpt2_bpe=True)  # an export made before files listed tokenizer.json
    one_line_error(gptx("web", bad), "missing tokenizer.json")
    meta["files"].append("tokenizer.json")
    with_tokenizer("hf", {}, {})  # any tokenizer whose export lists one
    one_line_error(gptx("web", bad), "missing tokenizer.json")
    with_tokenizer("char", {}, {}, **{"class": "gptx.plugins.tokenizers:CharTokenizer"})
    one_line_error(gptx("web", bad), "tokenizer.state.chars: missing")


def test_missing_packages_say_how_to_install_them(out_dir, tmp_path):
    r = gptx("web", out_dir, "--node-modules", tmp_path)
    one_line_error(r, "--node-modules", "not installed there", "gptx web --install")
    r = gptx("web", out_dir, env={"GPTX_CACHE_DIR": str(tmp_path / "cache")})
    if not server.usable(server.WEB_DIR / "node_modules"):  # a checkout where `npm install` ran in export/web serves that
        one_line_error(r, "gptx web --install")


def test_install_without_npm_is_one_line(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "GPTX_CACHE_DIR": str(tmp_path)}
    one_line_error(gptx("web", "--install", env=env), "--install: npm", "not installed")


# ---- shipped with the package --------------------------------------------------------------------------

def test_the_page_ships_with_the_package():
    web = resources.files("gptx.export") / "web"
    for name in ("index.html", "app.mjs", "gptx.mjs", "gptx.css", "package.json"):
        assert (web / name).is_file(), name
    pins = json.loads((web / "package.json").read_text())["dependencies"]
    assert set(pins) == {"onnxruntime-web", "@huggingface/tokenizers"}
    assert all(v[0].isdigit() for v in pins.values()), "exact versions: the served file list depends on them"
    html = (web / "index.html").read_text()
    for package, files in server.VENDORED.items():  # the import map names only files the server serves
        for url in [u for u in html.split('"') if u.startswith(f"./node_modules/{package}/")]:
            assert url[len(f"./node_modules/{package}/"):] in files, url
    assert "https://" not in html.split("<body>")[0], "no CDN: every script comes from the local server"


def test_the_server_path_is_torch_free(out_dir):
    code = ("import sys; from gptx.export import server; server.check_export(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(out_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
