"""Where a run's numbers go. One ``Recorder`` fans each event of a run out to its four outputs:
the console (``TrainProgress``), ``metrics.jsonl`` (the curves, with or without MLflow),
``run.json`` (the run's state for --resume and gptx compare) and the MLflow run. Ranks other than
0 get a ``NullRecorder``, so the trainer reports without asking which rank it is."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from gptx import runs
from gptx.metrics_log import MetricsLog
from gptx.progress import TrainProgress


class NullRecorder:
    """A rank other than 0: every event is dropped (rank 0 reports for all)."""

    run_id: Optional[str] = None
    mlflow_link: dict = {}
    untracked = False
    linked = True  # nothing to wait for

    def link(self, wait: bool) -> None: ...
    def begin_tracking(self) -> None: ...

    def started(self, cfg, num_params: int, resumed: bool, tags: dict) -> None: ...
    def train_step(self, step: int, seconds: float, loss: float, lr: float, tokens_per_sec: float, aux: dict) -> None: ...
    def aux_means(self, step: int, means: dict) -> None: ...
    def evaluation(self, step: int, seconds: float, metrics: dict) -> None: ...
    def target_reached(self, target: dict) -> None: ...
    def note(self, **fields) -> None: ...
    def checkpoint(self, step: int, path: Path) -> None: ...
    def final(self, step: int, seconds: float, final_val_loss: float, tokens: int) -> None: ...
    def sample(self, text: str) -> None: ...
    def ended(self, best_val_loss: Optional[float], seconds: float, checkpoint: Optional[Path]) -> None: ...
    def say(self, text: str) -> None: ...
    def finish(self, status: str, error: Optional[str]) -> None: ...


class Recorder(NullRecorder):
    """Rank 0's outputs. ``tracker`` is the MLflow run (or tracking's NullTracker); ``earlier`` the
    run.json of the run this one resumes ({} for a new run)."""

    def __init__(self, run_dir: Path, tracker, show: TrainProgress, resume_step: int, earlier: dict):
        self.run_dir, self.tracker, self.show = run_dir, tracker, show
        self.run_id: Optional[str] = None
        # a run resumed with tracking off keeps its link to the MLflow run it began in; a run whose
        # MLflow run starts in the background has none yet (``link`` adds it once it is up)
        self.mlflow_link = {k: earlier.get(k) for k in ("mlflow_run_id", "mlflow_tracking_uri")}
        self.linked = False
        if tracker.ready(wait=False):
            self._take_link()
        self.curves = MetricsLog(run_dir, resume_step)  # a resumed run keeps its curves up to resume_step

    def _take_link(self) -> None:
        self.linked = True
        if self.tracker.run_id is not None:
            self.run_id = self.tracker.run_id
            self.mlflow_link = {"mlflow_run_id": self.tracker.run_id, "mlflow_tracking_uri": self.tracker.uri}

    def link(self, wait: bool) -> None:
        """Once an MLflow run started in the background is up (``wait``: wait for it), its id and
        store become the run's link: run.json and the checkpoints written from then on. A start
        that failed raises its error here, so the run stops on it."""
        if self.linked:
            return
        up = self.tracker.ready(wait)
        if self.tracker.error is not None:
            raise self.tracker.error
        if up:
            self._take_link()
            runs.write_run_file(self.run_dir, **self.mlflow_link)

    def begin_tracking(self) -> None:
        """Start the MLflow run, where it starts in the background."""
        self.tracker.begin()

    @property
    def untracked(self) -> bool:
        """The MLflow run could not be started (in the background): the run must leave nothing."""
        return self.tracker.error is not None

    def started(self, cfg, num_params: int, resumed: bool, tags: dict) -> None:
        from gptx import tracking

        runs.write_run_file(self.run_dir, status="RUNNING", experiment=cfg.name, **self.mlflow_link,
                            config=cfg.to_dict(), pid=os.getpid(), num_params=num_params)
        if not resumed:  # a resumed MLflow run has its params, tags and config already
            self.tracker.log_params(tracking.flatten(cfg.to_dict()))
            self.tracker.log_metrics({"num_params": num_params}, 0)  # gptx compare <run id> reads it
            self.tracker.set_tags(tags)
            self.tracker.log_text(json.dumps(cfg.to_dict(), indent=2), "config.json")

    def train_step(self, step, seconds, loss, lr, tokens_per_sec, aux) -> None:
        self.tracker.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec}, step)
        self.curves.write(step, seconds, train_loss=loss, lr=lr, tokens_per_sec=tokens_per_sec, **aux)
        self.show.step(step, loss, lr, tokens_per_sec)

    def aux_means(self, step, means) -> None:
        if means:
            self.tracker.log_metrics(means, step)

    def evaluation(self, step, seconds, metrics) -> None:
        """``metrics``: val_loss, eval_train_loss, best_val_loss and, once, the target's."""
        self.tracker.log_metrics(metrics, step)
        self.tracker.flush()  # an evaluation is worth seeing in the MLflow UI now
        self.curves.write(step, seconds, val_loss=metrics["val_loss"], eval_train_loss=metrics["eval_train_loss"])
        self.show.say(f"step {step}: train loss {metrics['eval_train_loss']:.4f}, val loss {metrics['val_loss']:.4f}")

    def target_reached(self, target) -> None:
        runs.write_run_file(self.run_dir, **target)

    def note(self, **fields) -> None:
        """Facts about the run for run.json alone (e.g. ``startup_s``)."""
        runs.write_run_file(self.run_dir, **fields)

    def checkpoint(self, step, path) -> None:
        runs.write_run_file(self.run_dir, step=step, checkpoint=str(path))

    def final(self, step, seconds, final_val_loss, tokens) -> None:
        self.tracker.log_metrics({"final_val_loss": final_val_loss}, step)
        self.curves.write(step, seconds, final_val_loss=final_val_loss)
        runs.write_run_file(self.run_dir, final_val_loss=final_val_loss)
        self.show.say(f"final val loss {final_val_loss:.4f} on {tokens:,} tokens of the validation split")

    def sample(self, text) -> None:
        self.tracker.log_text(text, "sample.txt")

    def ended(self, best_val_loss, seconds, checkpoint) -> None:
        from gptx.plots import log_run_curves

        runs.write_run_file(self.run_dir, best_val_loss=best_val_loss, seconds=round(seconds, 3))
        if checkpoint is not None:
            self.tracker.log_artifacts(checkpoint, "checkpoint")
        log_run_curves(self.run_dir, self.tracker)  # metrics.jsonl and loss_curves.png; never fails the run

    def say(self, text) -> None:
        self.show.say(text)

    def finish(self, status, error) -> None:
        self.tracker.finish(status)
        try:
            runs.write_run_file(self.run_dir, status=status, error=error)  # None: a resumed run's old error is gone
        except OSError:  # e.g. the disk that just refused a checkpoint: keep the error that matters
            pass
