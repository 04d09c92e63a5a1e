"""``<run_dir>/metrics.jsonl``: a run's curves, one JSON object per line, written as it trains.

The contract (readers: ``gptx compare``, the plots; writer: the trainer, main process only)::

    {"step": 50, "seconds": 2.113, "train_loss": 2.61, "lr": 0.0005, "tokens_per_sec": 19750.2}
    {"step": 250, "seconds": 11.52, "val_loss": 2.04, "eval_train_loss": 1.99}
    {"step": 2000, "seconds": 92.0, "final_val_loss": 1.9014}

``step`` is the optimizer step the values belong to, ``seconds`` the wall clock since training
started (the first step; setup, tokenizing and model building excluded). A training record per
logged step, an evaluation record per evaluation, a final record after the whole-split
evaluation; other keys may appear (the reader keeps every numeric key). It exists with and
without MLflow, so it is the first source of curves; a resumed run drops the records after the
checkpoint it resumed from and continues the clock where they ended.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from gptx.errors import GptxError
from gptx.fsutil import open_regular
from gptx.numeric import INT64_MAX, float_or_none, int_or_none, number_or_none, shown

FILE = "metrics.jsonl"
MAX_LINE = 64 * 1024  # a record is ~120 bytes; a longer line is not ours
MAX_RECORDS = 10_000_000


class MetricsLog:
    """Appends records to ``<run_dir>/metrics.jsonl`` (a no-op when not ``enabled``: other ranks)."""

    def __init__(self, run_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(run_dir) / FILE
        self.enabled = enabled
        offset = 0.0
        if enabled:
            kept = self._records_before(resume_step)
            offset = max((r["seconds"] for r in kept), default=0.0)
            from gptx.fsutil import write_atomic

            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a new run starts empty; a resumed one keeps its past
        self._start = time.perf_counter() - offset

    def _records_before(self, resume_step: int) -> list[dict]:
        if not resume_step or not self.path.exists():
            return []
        try:
            return [r for r in read(self.path) if r["step"] <= resume_step]
        except GptxError as err:
            print(f"Warning: {err}; its curve restarts at step {resume_step}", file=sys.stderr, flush=True)
            return []

    def seconds(self) -> float:
        """Wall-clock seconds since training started (continued across a resume)."""
        return time.perf_counter() - self._start

    def write(self, step: int, seconds: float, **metrics: float) -> None:
        """Append one record. Like tracking, the curves must never cost the run: a write that
        fails (a full disk) is one warning, and the file takes no more records."""
        if not self.enabled:
            return
        record = {"step": int(step), "seconds": round(float(seconds), 3)} | {k: float(v) for k, v in metrics.items()}
        try:
            with open(self.path, "a", encoding="utf-8") as f:  # open per record: nothing to close, nothing lost on a crash
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            self.enabled = False
            print(f"Warning: {self.path}: {err.strerror or err}; no more curve records, training continues",
                  file=sys.stderr, flush=True)


def read(path: Path) -> list[dict]:
    """The records of a metrics file. A truncated last line (a crash mid-write) is dropped; any
    other malformed line is a GptxError naming the file and line."""
    path = Path(path)
    records: list[dict] = []
    try:
        with open_regular(path) as f:
            lineno = 0
            while True:
                raw = f.readline(MAX_LINE + 1)
                if not raw:
                    return records
                lineno += 1
                if len(raw) > MAX_LINE:
                    raise GptxError(f"{path}: line {lineno} is longer than {MAX_LINE} bytes; not a gptx metrics file")
                if len(records) >= MAX_RECORDS:
                    raise GptxError(f"{path}: more than {MAX_RECORDS:,} records; not a gptx metrics file")
                record = _parse(raw, path, lineno, last=not raw.endswith(b"\n"))
                if record is not None:
                    records.append(record)
    except OSError as err:
        raise GptxError(f"{path}: cannot read: {err.strerror or err}") from None


def _parse(raw: bytes, path: Path, lineno: int, last: bool) -> Optional[dict]:
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        if last:  # the writer died mid-line: the line is lost, the file is fine
            return None
        raise GptxError(f"{path}: line {lineno} is not JSON") from None
    if not isinstance(record, dict):
        raise GptxError(f"{path}: line {lineno} is not a JSON object")
    step, seconds = record.get("step"), record.get("seconds")
    # JSON integers only (the writer writes no "5" or 5.0), and within int64, where numpy and MLflow keep steps
    if not isinstance(step, int) or int_or_none(step, 0, INT64_MAX) is None:
        raise GptxError(f"{path}: line {lineno}: 'step' must be a non-negative integer below 2**63, got {shown(step)}")
    if float_or_none(number_or_none(seconds)) is None or seconds < 0:
        raise GptxError(f"{path}: line {lineno}: 'seconds' must be a non-negative number, got {shown(seconds)}")
    # unknown text fields and integers beyond the float range: ignored
    return {k: v for k, v in record.items() if number_or_none(v) is not None}


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, seconds, values) of the records holding ``key``, in step order; the last record
    wins when a step repeats."""
    by_step = {r["step"]: (r["seconds"], r[key]) for r in records if key in r}
    steps = np.array(sorted(by_step), dtype=np.int64)  # [N]
    seconds = np.array([by_step[s][0] for s in steps], dtype=float)  # [N]
    values = np.array([by_step[s][1] for s in steps], dtype=float)  # [N]
    return steps, seconds, values


def last(records: list[dict], key: str) -> Optional[float]:
    """The newest value of ``key`` (None when no record has it)."""
    return next((float(r[key]) for r in reversed(records) if key in r), None)
