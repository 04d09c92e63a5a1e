"""The one error type users see.

Anything wrong with what a user gave us (a config file, a checkpoint, a flag) is a
``GptxError``: the CLI prints its message on one line and exits with code 2, no traceback.
"""


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
