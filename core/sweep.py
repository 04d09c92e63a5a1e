"""Sweeps: one base experiment, a grid of variants, each its own MLflow run under one parent,
compared in one table (val loss, tokens/s, parameters)."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Optional

from gptx.config import load_experiment
from gptx.errors import ConfigError


@dataclasses.dataclass
class Variant:
    overrides: list[str]  # KEY=VALUE items this variant sets

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "base"


def parse_vary(items: list[str]) -> list[Variant]:
    """``["model.positional.kind=learned,rope", "model.n_layer=2,4"]`` -> the 4 combinations."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"expected KEY.PATH=V1,V2,..., got {item!r}", file="--vary")
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",") if v.strip()])
    return [Variant(list(combo)) for combo in itertools.product(*axes)] if axes else [Variant([])]


def sweep(base: Path, vary: list[str], overrides: list[str] = (), progress: bool = True) -> tuple[Optional[str], list[dict]]:
    """Validate every variant first (a typo costs nothing), then train them one by one.
    Returns the parent MLflow run id (None without tracking) and one row per variant."""
    from gptx import tracking
    from gptx.train import train

    variants = parse_vary(vary)
    configs = [load_experiment(base, [*overrides, *v.overrides]) for v in variants]
    base_cfg = configs[0]
    parent = None
    if base_cfg.tracking.enabled:
        tracking.check_reachable(tracking.tracking_uri(base_cfg.tracking.uri))
        parent = tracking.MlflowTracker(tracking.tracking_uri(base_cfg.tracking.uri), base_cfg.name,
                                        f"sweep {' '.join(vary)}")
        parent.log_params({"sweep.vary": " ; ".join(vary), "sweep.variants": str(len(variants))})
    rows = []
    status = "FAILED"
    try:
        for variant, cfg in zip(variants, configs):
            if parent is not None:
                cfg.tracking.parent_run_id = parent.run_id
                cfg.tracking.run_name = cfg.tracking.run_name or variant.label
            if progress:
                print(f"== {variant.label}", flush=True)
            result = train(cfg, progress=progress)
            row = {"variant": variant.label, "val_loss": result.val_loss, "final_val_loss": result.final_val_loss,
                   "train_loss": result.train_loss,
                   "tokens_per_sec": result.tokens_per_sec, "params": result.num_params, "run_id": result.run_id}
            rows.append(row)
            losses = {k: row[k] for k in ("val_loss", "final_val_loss") if row[k] is not None}
            if parent is not None and losses:
                parent.log_metrics(losses, len(rows))
        status = "FINISHED"
    finally:
        if parent is not None:
            parent.finish(status)
    return (parent.run_id if parent else None), rows


def table(rows: list[dict]) -> str:
    """Best first, by the whole-split val loss when the runs have one (no sampling noise)."""
    head = ("variant", "val loss", "final val loss", "tokens/s", "params")
    loss = lambda r: r.get("final_val_loss") if r.get("final_val_loss") is not None else r["val_loss"]  # noqa: E731
    cell = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    body = [(r["variant"], cell(r["val_loss"]), cell(r.get("final_val_loss")), f"{r['tokens_per_sec']:,.0f}",
             f"{r['params'] / 1e6:.2f}M") for r in sorted(rows, key=lambda r: (loss(r) is None, loss(r) or 0))]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])
