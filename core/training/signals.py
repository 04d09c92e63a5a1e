"""SIGINT/SIGTERM during training: finish the step, checkpoint, stop; a second signal stops at once."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional




class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second signal acts at once.
    Once the last checkpoint is written (``now``), a signal stops the run at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.checkpoint: Optional[Path] = None
        self.immediate = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def now(self, checkpoint: Optional[Path]) -> None:
        """From here on a signal raises Interrupted at once: ``checkpoint`` holds everything."""
        self.checkpoint, self.immediate = checkpoint, True
        if self.signum:
            raise Interrupted(self.signum, checkpoint)

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():
            signal.signal(s, old)
        if self.immediate:
            raise Interrupted(signum, self.checkpoint)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
