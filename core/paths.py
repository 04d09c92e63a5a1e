"""Where gptx keeps files of its own (torch-free, so every command path can import it)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$GPTX_CACHE_DIR``, by default ``~/.cache/gptx``: token caches, MLflow downloads, the web page's JavaScript packages."""
    return Path(os.environ.get("GPTX_CACHE_DIR") or Path.home() / ".cache" / "gptx")
