"""The one error type users see.

Anything wrong with what a user gave us (a config file, a checkpoint, a flag) is a
``GptxError``: the CLI prints its message on one line and exits with code 2, no traceback.
"""
from pathlib import Path


class GptxError(Exception):
    """A problem with the user's input; ``str(err)`` is the whole message."""

    exit_code = 2


class ConfigError(GptxError):
    """An invalid experiment file or override. Built from the file, the key path and the problem."""

    def __init__(self, problem: str, key: str | None = None, file: str | None = None):
        self.problem, self.key, self.file = problem, key, file
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {problem}" if where else problem)

    def located(self, file: str | None) -> "ConfigError":
        """The same error, naming ``file`` (used once the error bubbles up to the loader)."""
        return self if self.file or not file else ConfigError(self.problem, self.key, file)


class ComponentOutputError(GptxError, TypeError):
    """A model component's ``forward`` returned something its output contract does not allow (a
    plugin's bug, met while the model runs): the message names the class, what it returned and
    what it must return. A GptxError, so the command line prints it on one line."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else ""


def read_format_json(path: Path, fmt: str, max_version: int, what: str) -> dict:
    """A gptx metadata file (``gptx.json``, ``gptx_export.json``): missing, corrupted, of another
    format or written by a newer gptx, it is a GptxError naming the file. Torch-free, for the
    checkpoint loader and the onnxruntime runtime alike."""
    from gptx.schemas import read_json

    path = Path(path)
    meta = read_json(path, what)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise GptxError(f"{path}: not a {what} (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise GptxError(f"{path}: format_version: expected a whole number, got {version!r}")
    if version > max_version:
        raise GptxError(f"{path.parent}: written by a newer gptx (format {meta['format_version']}); upgrade gptx")
    return meta
