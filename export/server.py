"""``gptx web OUT_DIR``: serve the browser page (``export/web/``), the JavaScript packages it runs
(onnxruntime-web, @huggingface/tokenizers) and an export folder over HTTP. Torch-free.

The page, its module ``gptx.mjs`` (shared with the Node example) and the styles ship with gptx.
The JavaScript packages come from the npm registry, pinned in ``web/package.json``, into a
``node_modules`` folder: the web folder's own (``npm install`` there) or gptx's cache
(``gptx web --install``). Only the few files of theirs that the page loads are served, and only
files under the web folder and the export folder: nothing else on the machine is reachable.
"""
from __future__ import annotations

import errno
import fcntl
import http.server
import ipaddress
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path
from typing import Optional

from gptx.errors import GptxError
from gptx.export import META_FILE, MODEL_FILE, TOKENIZER_FILE
from gptx.export.tokenizer_json import refusal
from gptx.fsutil import MAX_NAME_BYTES
from gptx.numeric import int_or_none

WEB_DIR = Path(__file__).resolve().parent / "web"
EXPORT_PREFIX = "export"  # the page reads the export folder at /export/...
NODE_MODULES = "node_modules"

# The files of each package that the page loads (URL /node_modules/<package>/<file>, as the import
# map in index.html names them): the WebAssembly build of onnxruntime and, where the browser has
# WebGPU, its WebGPU build; the tokenizer library's ES module.
VENDORED = {
    "onnxruntime-web": [
        "dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm",
        "dist/ort.webgpu.min.mjs", "dist/ort-wasm-simd-threaded.asyncify.mjs", "dist/ort-wasm-simd-threaded.asyncify.wasm",
    ],
    "@huggingface/tokenizers": ["dist/tokenizers.min.mjs"],
}
WASM_FILES = ["dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm",
    ".onnx": "application/octet-stream", ".png": "image/png", ".svg": "image/svg+xml",
}


def pinned_versions() -> dict[str, str]:
    """Package -> the exact version web/package.json pins."""
    return dict(json.loads((WEB_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"])


def cache_node_modules() -> Path:
    from gptx.fsutil import cache_root

    return cache_root() / "web" / NODE_MODULES


def installed_version(node_modules: Path, package: str) -> Optional[str]:
    try:
        return json.loads((node_modules / package / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None


def usable(node_modules: Path) -> bool:
    """Whether ``node_modules`` holds the pinned packages with every file the page loads."""
    return all(
        installed_version(node_modules, pkg) == version and all((node_modules / pkg / f).is_file() for f in VENDORED[pkg])
        for pkg, version in pinned_versions().items()
    )


def find_node_modules(explicit: Optional[Path] = None) -> Path:
    """The node_modules to serve: ``explicit``, else the web folder's own, else gptx's cache."""
    candidates = [Path(explicit)] if explicit else [WEB_DIR / NODE_MODULES, cache_node_modules()]
    for candidate in candidates:
        if usable(candidate):
            return candidate
    pins = " ".join(f"{p}@{v}" for p, v in pinned_versions().items())
    where = f"--node-modules: {explicit}" if explicit else f"{candidates[-1]}"
    raise GptxError(f"{where}: the page's JavaScript packages ({pins}) are not installed there; "
                    f"run gptx web --install (needs npm), or npm install in {WEB_DIR}")


def install(prefix: Optional[Path] = None, log=print) -> Path:
    """``npm install`` the pinned packages into ``prefix`` (default: gptx's cache) unless they are
    there already; their node_modules. Concurrent installs into one prefix take turns."""
    prefix = Path(prefix) if prefix else cache_node_modules().parent
    npm = shutil.which("npm")
    if npm is None:
        raise GptxError("--install: npm (Node.js's package manager) is not installed; install Node.js 18+")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not usable(prefix / NODE_MODULES):
            npm_install(npm, prefix, log)
    return prefix / NODE_MODULES


def npm_install(npm: str, prefix: Path, log) -> None:
    shutil.copy(WEB_DIR / "package.json", prefix / "package.json")
    log(f"installing {', '.join(f'{p}@{v}' for p, v in pinned_versions().items())} into {prefix / NODE_MODULES} ...")
    try:
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix)],
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise GptxError("--install: npm install did not finish in 10 minutes") from None
    if r.returncode != 0 or not usable(prefix / NODE_MODULES):
        said = [line for line in r.stderr.splitlines() if line.startswith("npm error") and "complete log" not in line]
        raise GptxError(f"--install: npm install failed ({'; '.join(said[:2]) or 'the packages are incomplete after it'})")


def check_export(out_dir: Path) -> dict:
    """The export's metadata, after checking the page can run it; GptxError naming the problem."""
    from gptx.export.runtime import load_tokenizer, read_meta

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise GptxError(f"{out_dir}: no such export directory")
    meta = read_meta(out_dir)
    if not (out_dir / MODEL_FILE).is_file():
        raise GptxError(f"{out_dir}: missing {MODEL_FILE}")
    tok = meta["tokenizer"]  # validated whole by read_meta
    # the page's choice, as gptx.mjs buildTokenizer makes it: char and byte in JavaScript (exact
    # where @huggingface/tokenizers is not), any other tokenizer through its tokenizer.json
    if tok["kind"] in ("char", "byte"):
        load_tokenizer(tok, out_dir / META_FILE)  # its state checked by the tokenizer's schema, as the page will read it
    elif TOKENIZER_FILE in (meta.get("files") or []) or tok.get("gpt2_bpe"):
        if not (out_dir / TOKENIZER_FILE).is_file():
            raise GptxError(f"{out_dir}: missing {TOKENIZER_FILE} (the tokenizer the page reads)")
    else:
        raise GptxError(f"{out_dir / META_FILE}: {refusal(tok['kind'], 'the web page')}")
    return meta


# ---- HTTP ---------------------------------------------------------------------------------------

def host_name(header: Optional[str]) -> Optional[tuple[str, Optional[int]]]:
    """A Host header as (lower-case name, port or None); None when it is missing or malformed.
    An IPv6 address comes without its brackets."""
    if not header or header != header.strip() or any(c.isspace() or ord(c) < 32 for c in header):
        return None
    header = header.lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = header.rpartition(":") if ":" in header else (header, "", None)
        if ":" in name:  # an IPv6 address without brackets is not a valid Host
            return None
    if not name:
        return None
    if port_text is None:
        return name, None
    port = int_or_none(port_text, 0, 65535) if port_text[:1].isascii() and port_text[:1].isdigit() else None
    return None if port is None else (name, port)


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class HostCheck:
    """Which Host headers the server answers: the names that mean this machine (localhost, the
    loopback addresses), the address it is bound to and the names given with ``--allow-host``,
    each with no port or the server's own. Anything else is refused: a page on another site whose
    name an attacker re-points at this machine (DNS rebinding) sends that site's name as Host,
    so it cannot read the export through the visitor's browser."""

    def __init__(self, bound: str, port: int, allowed: tuple[str, ...] = ()):
        names = set(LOCAL_NAMES) | {bound.lower().strip("[]")} | {a.lower().strip("[]") for a in allowed}
        self.names, self.port = names, port
        # bound to every address (0.0.0.0, ::): each of the machine's addresses is one it serves. An
        # address is safe to answer: rebinding needs a name, and a page at an address is its own origin.
        self.any_address = is_address(bound.strip("[]")) and ipaddress.ip_address(bound.strip("[]")).is_unspecified

    def allows(self, header: Optional[str]) -> bool:
        parsed = host_name(header)
        if parsed is None:
            return False
        name, port = parsed
        return (name in self.names or (self.any_address and is_address(name))) and port in (None, self.port)


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def url_segments(raw_path: str) -> Optional[list[str]]:
    """The decoded, non-empty segments of a request path; None when a segment could step outside
    its folder ('..', '.', a backslash, a NUL) once decoded."""
    path = urllib.parse.urlsplit(raw_path).path
    segments = [urllib.parse.unquote(s, errors="strict") for s in path.split("/") if s]
    if any(s in (".", "..") or "\\" in s or "/" in s or "\0" in s for s in segments):
        return None
    return segments


def inside(root: Path, segments: list[str]) -> Optional[Path]:
    """The regular file ``root/segments`` when it (symlinks resolved) lies under ``root``; None for
    anything the file system refuses to look up (a name too long, a loop of links)."""
    if any(len(s.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for s in segments):
        return None
    try:
        root = root.resolve()
        target = root.joinpath(*segments).resolve()
        return target if target.is_relative_to(root) and target.is_file() else None
    except (OSError, ValueError, RuntimeError):  # ENAMETOOLONG, ELOOP, an embedded NUL
        return None


class Site:
    """What the server maps URLs to: the web folder, the export folder, the vendored package files."""

    def __init__(self, out_dir: Path, node_modules: Path):
        self.out_dir, self.node_modules = Path(out_dir).resolve(), Path(node_modules).resolve()

    def file_for(self, raw_path: str) -> Optional[Path]:
        try:
            segments = url_segments(raw_path)
        except UnicodeDecodeError:
            return None
        if segments is None:
            return None
        if not segments:
            return WEB_DIR / "index.html"
        head, rest = segments[0], segments[1:]
        if head == EXPORT_PREFIX:
            return inside(self.out_dir, rest)
        if head == NODE_MODULES:
            return self.vendored(rest)
        return inside(WEB_DIR, segments) if head != "package.json" else None

    def vendored(self, segments: list[str]) -> Optional[Path]:
        for package, files in VENDORED.items():
            depth = package.count("/") + 1
            if "/".join(segments[:depth]) == package and "/".join(segments[depth:]) in files:
                return inside(self.node_modules / package, segments[depth:])
        return None


class Handler(http.server.BaseHTTPRequestHandler):
    site: Site  # set on the subclass that serve() makes
    hosts: HostCheck  # likewise
    server_version = "gptx-web"

    def do_GET(self):
        self.respond(body=True)

    def do_HEAD(self):
        self.respond(body=False)

    def respond(self, body: bool):
        if not self.hosts.allows(self.headers.get("Host")) or len(self.headers.get_all("Host") or []) != 1:
            self.send_error(421, "Misdirected request", "this server answers only the host it serves (see gptx web --allow-host)")
            return
        if not self.path.startswith("/"):  # absolute URIs and '*': we are no proxy
            self.send_error(400, "Bad request", "the request target must be a path")
            return
        path = self.site.file_for(self.path)
        try:
            f = open(path, "rb") if path is not None else None
        except OSError:  # removed or made unreadable since the lookup
            f = None
        if f is None:
            self.send_error(404, "Not found")
            return
        with f:
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, mimetypes.guess_type(path.name)[0] or "application/octet-stream"))
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            # cross-origin isolation lets onnxruntime-web run its WebAssembly on several threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            if body:
                try:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away mid-download

    def log_message(self, format, *args):  # quiet: a page load is dozens of requests
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """A request that fails past the handler's own checks (a client gone mid-response) costs that
    connection only: no traceback on the server's console."""

    def handle_error(self, request, client_address):
        pass


def serve(out_dir: Path, host: str, port: int, node_modules: Path, allow_hosts: tuple[str, ...] = ()) -> http.server.ThreadingHTTPServer:
    """A bound (not yet serving) server for the page and ``out_dir``; GptxError when it cannot bind.
    It answers only requests whose Host is this machine, ``host`` or one of ``allow_hosts``."""
    handler = type("GptxWebHandler", (Handler,), {"site": Site(out_dir, node_modules)})
    try:
        server = QuietServer((host, port), handler)
    except OSError as err:
        if err.errno in (errno.EADDRINUSE, errno.EACCES):
            what = "is in use" if err.errno == errno.EADDRINUSE else f"is not open to this user ({err.strerror})"
            raise GptxError(f"--port: {port} on {host} {what}") from None
        raise GptxError(f"--host: cannot listen on {host!r} ({err.strerror or err})") from None
    server.daemon_threads = True
    handler.hosts = HostCheck(host, server.server_address[1], tuple(allow_hosts))
    return server


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run_until_stopped(server: http.server.ThreadingHTTPServer, announce) -> None:
    """Call ``announce()`` (print the URL), then serve until Ctrl-C or SIGTERM; close the socket and
    return (the CLI exits 0). The signals are caught before the URL appears, so a client that
    stops the server as soon as it reads the URL gets the same clean stop."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}  # even where SIGINT was ignored (a `&` job)
    try:
        announce()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()


def banner(server: http.server.ThreadingHTTPServer, out_dir: Path, node_modules: Path) -> str:
    """What ``gptx web`` prints once it listens: the URL first (tools read it), then the download sizes."""
    runtime = sum(bundle_bytes(node_modules).values()) / 1e6
    model = (Path(out_dir) / MODEL_FILE).stat().st_size / 1e6
    lines = [f"serving {out_dir} at {url_of(server)}  (Ctrl-C stops)",
             f"the page downloads {runtime:.1f} MB of runtime (onnxruntime-web, tokenizer, page) and {model:.1f} MB of model"]
    if not ipaddress.ip_address(server.server_address[0]).is_loopback:
        lines.append(f"Warning: listening on {server.server_address[0]}: other machines can reach this page and the export "
                     "(by address, or by a name given with --allow-host)")
    return "\n".join(lines)


def bundle_bytes(node_modules: Path) -> dict[str, int]:
    """What the page downloads besides the model, in bytes: the WebAssembly runtime, the tokenizer
    library and gptx's own page files."""
    return {
        "onnxruntime-web (wasm)": sum((node_modules / "onnxruntime-web" / f).stat().st_size for f in WASM_FILES),
        "@huggingface/tokenizers": sum((node_modules / "@huggingface/tokenizers" / f).stat().st_size
                                       for f in VENDORED["@huggingface/tokenizers"]),
        "gptx page": sum(p.stat().st_size for p in WEB_DIR.iterdir() if p.is_file() and p.suffix in (".html", ".mjs", ".css")),
    }
