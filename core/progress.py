"""Status lines for long jobs that are not training steps (tokenizing, preparing shards).

A job reports through a plain callable ``progress(line)``: a status line now and then, the
summary last. ``StatusLine`` is the callable the commands pass, as a context manager: on a
terminal it rewrites one live line; otherwise (logs, CI) it prints a plain line every ``every``
seconds and, on leaving the block, the last line if that is still unprinted; a job shorter than
``every`` prints nothing there. A block left by an exception prints nothing more: the error is
the line that matters.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def bar(fraction: float, width: int = 20) -> str:
    done = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * done + "-" * (width - done) + "]"


class StatusLine:
    """A live line on a terminal; plain lines at most every ``every`` seconds elsewhere."""

    def __init__(self, stream: Optional[TextIO] = None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = self.last_print = time.monotonic()
        self.pending: Optional[str] = None  # the newest line not printed yet (plain mode)
        self.live = False  # a live line is on screen

    def __call__(self, line: str) -> None:
        if self.tty:
            print("\r\033[K" + line, end="", file=self.stream, flush=True)
            self.live = True
        elif time.monotonic() - self.last_print >= self.every:
            print(line, file=self.stream, flush=True)
            self.last_print, self.pending = time.monotonic(), None
        else:
            self.pending = line

    def close(self, failed: bool = False) -> None:
        """Leave the last line on screen (terminal) or print it if it was held back (plain; not
        when the job ``failed`` or took less than ``every`` seconds)."""
        if self.live:
            print(file=self.stream, flush=True)
            self.live = False
        elif self.pending is not None and not failed and time.monotonic() - self.start >= self.every:
            print(self.pending, file=self.stream, flush=True)
        self.pending = None

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class TrainProgress:
    """A live status line on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, total: int, every: int, enabled: bool):
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first_step: Optional[int] = None

    def step(self, step: int, loss: float, lr: float, tok_s: float):
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.perf_counter()
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        line = f"step {step:>6}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  ETA {hms(eta)}"
        if self.tty:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def say(self, text: str):
        if self.enabled:
            if self.tty:
                print("\r\033[K", end="", file=sys.stderr)
            print(text, file=sys.stderr, flush=True)
