"""gptx's web page (``gptx web``) in headless Chromium, driven by Playwright: what ``gptx bench``'s
``web`` backend measures and what the tests open. Torch-free.

Chromium is the system's (``$GPTX_CHROMIUM``, else ``chromium`` on the PATH, else
/usr/bin/chromium): Playwright's own browser download needs the internet, and gptx must run
without it. The page and the export are served from a thread of this process by gptx's own
server (``gptx.export.server``), which sends the cross-origin isolation headers the page needs
for WebAssembly threads.
"""
from __future__ import annotations

import os
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import Optional

from gptx.errors import GptxError, first_line

CHROMIUM_ENV = "GPTX_CHROMIUM"
DEFAULT_CHROMIUM = Path("/usr/bin/chromium")  # Debian's package
LAUNCH_ARGS = ["--no-sandbox"]  # root in a container has no user namespaces for Chromium's sandbox
LOAD_TIMEOUT_MS = 600_000  # downloading and compiling GPT-2 124M's 0.5 GB takes seconds; a slow disk, more


def chromium() -> Path:
    """The Chromium executable to drive: ``$GPTX_CHROMIUM``, else the PATH's, else Debian's path."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return Path(explicit)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found else DEFAULT_CHROMIUM


def unavailable() -> Optional[str]:
    """Why the page cannot be opened on this machine (Playwright, Chromium or the page's
    JavaScript packages missing), or None."""
    import importlib.util

    from gptx.export import server

    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install playwright)"
    path = chromium()
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"no Chromium at {path} (install it, e.g. apt-get install chromium, or set {CHROMIUM_ENV} to its path)"
    try:
        server.find_node_modules()
    except GptxError:
        return "the page's JavaScript packages are not installed (run gptx web --install)"
    return None


def launch(playwright):
    """A headless Chromium browser from a started Playwright (``sync_playwright()``)."""
    return playwright.chromium.launch(executable_path=str(chromium()), args=LAUNCH_ARGS)


class ServedPage:
    """The page for the export ``out_dir``, served from a thread of this process on a free port of
    127.0.0.1 and open in headless Chromium with ``threads`` WebAssembly threads; ``generate``
    runs greedy generations on the loaded model. A context manager: everything stops on exit."""

    def __init__(self, out_dir: Path, threads: int):
        self.out_dir, self.threads = Path(out_dir), threads
        self.server = self.serving = self.playwright = self.browser = self.page = None

    def __enter__(self) -> "ServedPage":
        from playwright.sync_api import Error as PlaywrightError

        try:
            self._start()
        except PlaywrightError as err:  # Chromium would not start, or the page crashed: one line, not a traceback
            self.close()
            raise GptxError(f"{chromium()}: headless Chromium failed: {first_line(err)}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        from gptx.export import server

        server.check_export(self.out_dir)
        self.server = server.serve(self.out_dir, "127.0.0.1", 0, server.find_node_modules())
        self.serving = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.serving.start()
        self.playwright = sync_playwright().start()
        self.browser = launch(self.playwright)
        self.page = self.browser.new_page()
        self.page.goto(server.url_of(self.server) + "?" + urllib.parse.urlencode({"threads": self.threads}))
        self.page.wait_for_function("window.gptx && ['ready', 'error'].includes(window.gptx.status)", timeout=LOAD_TIMEOUT_MS)
        error = self.page.evaluate("gptx.error")
        if error:
            raise GptxError(f"{self.out_dir}: the web page could not load the export: {error}")

    def generate(self, ids: list[int], new_tokens: int) -> dict:
        """Greedy decoding of exactly ``new_tokens`` tokens after the prompt ``ids`` (end-of-text
        does not stop it, as the bench's other backends); the page's {result, stats}."""
        from playwright.sync_api import Error as PlaywrightError

        query = urllib.parse.urlencode({"ids": ",".join(map(str, ids)), "max_new_tokens": new_tokens, "temperature": 0,
                                        "stop_at_eot": 0})
        try:
            out = self.page.evaluate("query => gptx.generate(query)", query)
        except PlaywrightError as err:  # the page crashed (out of memory, a killed renderer)
            raise GptxError(f"{self.out_dir}: the web page failed to generate: {first_line(err)}") from None
        if out["status"] != "done":
            raise GptxError(f"{self.out_dir}: the web page failed to generate: {out['error']}")
        return out

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self.playwright is not None:
            self.playwright.stop()
        if self.serving is not None:  # shutdown() waits for serve_forever: only once it runs
            self.server.shutdown()
        if self.server is not None:
            self.server.server_close()
        self.server = self.serving = self.playwright = self.browser = self.page = None
