"""gptx: a plugin-based toolkit for experimenting with GPT-2-style language models.

The public surface plugin authors need lives here:
``hookimpl`` to mark hook implementations and the component interfaces.
"""
from importlib.metadata import PackageNotFoundError, version as _version

import pluggy

try:
    __version__ = _version("gptx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("gptx")
"""Decorator for plugin hook implementations, e.g. ``@gptx.hookimpl def register_attention(register): ...``"""

__all__ = ["__version__", "hookimpl"]
