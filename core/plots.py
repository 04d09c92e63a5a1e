"""Loss curves as PNG (matplotlib's Agg canvas: no display, no global pyplot state).

``plot_run``: one run, loss against step and against wall-clock seconds. ``plot_groups``: a
comparison (a sweep, ``gptx compare``): one colour per variant, the mean over its seeds as a
line and the min–max over seeds as a shaded band, train and val loss, against step and seconds.
Curves are the ``metrics.jsonl`` records (``gptx.metrics_log``). Train loss is per batch and
noisy, so it is drawn smoothed (a centred moving average, the window said in the title).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from gptx import metrics_log

BAND = "band: min–max over seeds"
DPI = 90


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends instead of padding."""
    n = len(values)
    csum = np.concatenate([[0.0], np.cumsum(values)])  # [n + 1]
    idx = np.arange(n)
    lo, hi = np.clip(idx - window // 2, 0, n), np.clip(idx + window // 2 + 1, 0, n)  # [n]
    return (csum[hi] - csum[lo]) / (hi - lo)


def smoothing_window(n_points: int) -> int:
    return max(1, n_points // 40)


def _train_label(window: int) -> str:
    return "train loss" + (f" (moving average, {window} steps)" if window > 1 else " (per step)")


@dataclasses.dataclass
class Curve:
    """One variant's curve of one metric: mean over seeds and the min–max band, on common steps."""

    steps: np.ndarray  # [N]
    seconds: np.ndarray  # [N] median over seeds (as the table's wall time: robust to one slowed run)
    mean: np.ndarray  # [N]
    low: np.ndarray  # [N]
    high: np.ndarray  # [N]

    @classmethod
    def of(cls, runs: Sequence[list[dict]], key: str, window: int = 1) -> Optional["Curve"]:
        parts = [metrics_log.series(records, key) for records in runs]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return None
        common = parts[0][0]
        for steps, _, _ in parts[1:]:
            common = np.intersect1d(common, steps)  # seeds of one variant log the same steps; be safe
        if not len(common):
            return None
        pick = [np.searchsorted(steps, common) for steps, _, _ in parts]
        secs = np.stack([s[i] for (_, s, _), i in zip(parts, pick)])  # [seeds, N]
        vals = np.stack([smooth(v, window)[i] for (_, _, v), i in zip(parts, pick)])  # [seeds, N]
        return cls(common, np.median(secs, 0), vals.mean(0), vals.min(0), vals.max(0))


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _zoom(ax, curves: list[Curve]) -> None:
    """Loss falls from ~ln(vocab) in the first few percent of training; scale the y axis to the
    rest, where variants differ, so the early drop does not flatten every difference."""
    lows = [c.low.min() for c in curves if c is not None]
    if not lows:
        return
    tops = [c.high[min(len(c.high) - 1, np.searchsorted(c.steps, c.steps[-1] * 0.1))] for c in curves if c is not None]
    bottom, top = min(lows), max(tops)
    if top > bottom:
        margin = 0.05 * (top - bottom)
        ax.set_ylim(bottom - margin, top + margin)


def _draw(ax, curve: Optional[Curve], x: str, color, label: Optional[str], marker: Optional[str] = None) -> None:
    if curve is None:
        return
    xs = curve.steps if x == "step" else curve.seconds
    ax.plot(xs, curve.mean, color=color, lw=1.6, marker=marker, ms=3.5, label=label)
    ax.fill_between(xs, curve.low, curve.high, color=color, alpha=0.18, lw=0)


def _final_marker(ax, runs: Sequence[list[dict]], x: str, color) -> None:
    """The whole-split val loss after the last step: mean, with a min–max error bar."""
    finals = [(r["step"], r["seconds"], r["final_val_loss"]) for records in runs for r in records if "final_val_loss" in r]
    if not finals:
        return
    step, secs, vals = (np.array(v, dtype=float) for v in zip(*finals))  # [seeds] each
    pos = step.mean() if x == "step" else np.median(secs)
    ax.errorbar([pos], [vals.mean()], yerr=[[vals.mean() - vals.min()], [vals.max() - vals.mean()]], color=color,
                marker="D", ms=6, mec="black", mew=0.6, capsize=3, lw=1.2, zorder=5)


def _style(ax, x: str, ylabel: str, over_seeds: bool = True) -> None:
    """Steps stay linear: the variants part ways late in training, which a log axis squeezes."""
    seconds = "wall-clock seconds since the first step" + (" (median over seeds)" if over_seeds else "")
    ax.set_xlabel("step" if x == "step" else seconds)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def legend_labels(settings: list[dict[str, str]], labels: list[str]) -> tuple[Optional[str], list[str]]:
    """One legend title for the keys every variant sets, entries with just the values; the full
    labels when the variants set different keys."""
    keys = [list(s) for s in settings]
    if keys and all(k == keys[0] for k in keys) and keys[0]:
        return "  ·  ".join(keys[0]), ["  ·  ".join(s[k] for k in keys[0]) for s in settings]
    return None, labels


def plot_groups(groups: list[tuple[str, dict[str, str], list[list[dict]]]], path: Path, title: str) -> Path:
    """groups: (label, settings, [records of each seed's run]). One PNG with four panels: train
    and val loss (columns) against step and wall-clock seconds (rows)."""
    fig, axes = _figure(2, 2, 13, 9)
    legend_title, names = legend_labels([g[1] for g in groups], [g[0] for g in groups])
    colors = [f"C{i % 10}" for i in range(len(groups))]
    n_train = max((len(metrics_log.series(r, "train_loss")[0]) for _, _, runs in groups for r in runs), default=0)
    window = smoothing_window(n_train)
    train = [Curve.of(runs, "train_loss", window) for _, _, runs in groups]
    val = [Curve.of(runs, "val_loss") for _, _, runs in groups]
    for row, x in enumerate(("step", "seconds")):
        for i, (color, name) in enumerate(zip(colors, names)):
            n_seeds = len(groups[i][2])
            _draw(axes[row, 0], train[i], x, color, f"{name}  ({n_seeds} seed{'s' * (n_seeds != 1)})" if row == 0 else None)
            _draw(axes[row, 1], val[i], x, color, None, marker="o")
            _final_marker(axes[row, 1], groups[i][2], x, color)
        _style(axes[row, 0], x, _train_label(window))
        _style(axes[row, 1], x, "val loss")
        _zoom(axes[row, 0], train)
        _zoom(axes[row, 1], val)
    axes[0, 0].set_title("train loss by step")
    axes[0, 1].set_title("val loss by step (◆ whole validation split after the last step)")
    axes[1, 0].set_title("train loss by wall-clock time")
    axes[1, 1].set_title("val loss by wall-clock time")
    fig.suptitle(f"{title}\nline: mean over seeds · {BAND}", fontsize=12)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=min(3, len(groups)),
               title=legend_title, frameon=False)
    return _save(fig, path)


def plot_run(source: Union[Path, list[dict]], path: Path, title: Optional[str] = None) -> Path:
    """One run's loss curves (``source``: its run directory or its records) against step and
    wall-clock seconds, into the PNG ``path``."""
    records = metrics_log.read(Path(source) / metrics_log.FILE) if isinstance(source, (str, Path)) else source
    if title is None:
        title = f"{Path(source).parent.name}/{Path(source).name}" if isinstance(source, (str, Path)) else "run"
    fig, axes = _figure(1, 2, 12, 4.8)
    window = smoothing_window(len(metrics_log.series(records, "train_loss")[0]))
    train, val = Curve.of([records], "train_loss", window), Curve.of([records], "val_loss")
    final = metrics_log.last(records, "final_val_loss")
    for ax, x in zip(axes[0], ("step", "seconds")):
        if window > 1:  # the raw per-step losses behind the smoothed line
            raw = metrics_log.series(records, "train_loss")
            ax.plot(raw[0] if x == "step" else raw[1], raw[2], color="C0", lw=0.6, alpha=0.3, label="train loss (per step)")
        _draw(ax, train, x, "C0", _train_label(window))
        _draw(ax, val, x, "C1", "val loss (sampled batches)", marker="o")
        _final_marker(ax, [records], x, "C1")
        _style(ax, x, "loss", over_seeds=False)
        _zoom(ax, [train, val])
    axes[0, 0].set_title("by step")
    axes[0, 1].set_title("by wall-clock time")
    summary = f"final val loss {final:.4f} (◆, whole validation split)" if final is not None else "no final val loss"
    fig.suptitle(f"{title}: {summary}", fontsize=12)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """A 256-colour PNG: a third of the size of matplotlib's RGBA one (plots have few colours),
    so README pictures and MLflow artifacts stay small; written whole or not at all."""
    from PIL import Image

    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")  # [H, W, 3]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
        tmp.replace(path)  # a reader never sees half a PNG
    except OSError as err:  # a full disk: no half PNG left, and the message names the plot, not our temporary
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write: {err.strerror or err}", str(path)) from None
    return path


RUN_PLOT = "loss_curves.png"


def log_run_curves(run_dir: Path, tracker) -> Optional[Path]:
    """The end of ``gptx run``: log ``metrics.jsonl`` to the run's MLflow run (so ``gptx compare
    <run id>`` reads the very records a run directory holds) and draw ``<run_dir>/loss_curves.png``,
    logged too. A plot is a convenience: any failure is one warning, never a failed run."""
    records = Path(run_dir) / metrics_log.FILE
    if records.is_file():
        tracker.log_artifact(records)
    try:
        path = plot_run(run_dir, Path(run_dir) / RUN_PLOT)
    except Exception as err:  # noqa: BLE001 (matplotlib can raise anything; the run's results are safe)
        reason = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else f"{type(err).__name__}: {err}"
        print(f"Warning: no loss-curve plot ({reason})", file=sys.stderr, flush=True)
        return None
    tracker.log_artifact(path)
    return path
