"""Sweeps: one base experiment, a grid of variants, each trained with the same N seeds; every
variant × seed is its own MLflow run nested under one parent run and its own run directory in
the sweep's folder ``<out_dir>/<experiment>/sweep-<timestamp>/``; one table (``gptx.compare``)
and one plot compare the variants over their seeds."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import sys
from pathlib import Path
from typing import Optional

from gptx.config import load_experiment
from gptx.errors import ConfigError, GptxError

MAX_SEEDS = 1000


@dataclasses.dataclass
class Variant:
    overrides: list[str]  # KEY=VALUE items this variant sets

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "base"

    @property
    def settings(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides)


def parse_vary(items: list[str]) -> list[Variant]:
    """``["model.positional.kind=learned,rope", "model.n_layer=2,4"]`` -> the 4 combinations."""
    axes, keys = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"expected KEY.PATH=V1,V2,..., got {item!r}", file="--vary")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"no values to try in {item!r}; expected KEY.PATH=V1,V2,...", file="--vary")
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:  # the same variant twice would train twice and compare with itself
            raise ConfigError(f"{key}: the value {twice!r} is given twice", file="--vary")
        if key in keys:
            raise ConfigError(f"{key} is varied twice; give all its values in one --vary", file="--vary")
        keys.add(key)
        axes.append([f"{key}={v}" for v in values])
    return [Variant(list(combo)) for combo in itertools.product(*axes)] if axes else [Variant([])]


def check_seeds(seeds: int, vary: list[str]) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise GptxError(f"--seeds: must be an integer from 1 to {MAX_SEEDS}, got {seeds}")
    if seeds > 1 and any(v.partition("=")[0].strip() == "training.seed" for v in vary):
        raise GptxError("--seeds: the seeds come from training.seed; do not --vary training.seed as well")
    return seeds


@dataclasses.dataclass
class Planned:
    variant: Variant
    seed: Optional[int]  # None: the variant's own training.seed (a single-seed sweep)
    cfg: object  # ExperimentConfig
    dir_name: str


def plan(base: Path, vary: list[str], overrides: list[str], seeds: int) -> list[Planned]:
    """Every variant × seed, validated (a typo costs nothing), seed-major: the first seed of
    every variant trains first, so an interrupted sweep still compares every variant, and a
    machine that slows down slows all variants alike."""
    variants = parse_vary(vary)
    base_seed = load_experiment(base, [*overrides, *variants[0].overrides]).training.seed
    seed_list = [base_seed + i for i in range(seeds)] if seeds > 1 else [None]
    planned = []
    for seed in seed_list:
        for v in variants:
            extra = [f"training.seed={seed}"] if seed is not None else []
            cfg = load_experiment(base, [*overrides, *v.overrides, *extra])
            planned.append(Planned(v, seed, cfg, _slug(f"{v.label}-seed{cfg.training.seed}")))
    names = [p.dir_name for p in planned]
    for i, p in enumerate(planned):
        if names.count(p.dir_name) > 1:  # two labels that read alike once made safe for a file name
            p.dir_name = f"{p.dir_name}-{i}"
    return planned


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text)[:120]


def sweep(base: Path, vary: list[str], overrides: list[str] = (), seeds: int = 1, alpha: float = 0.05,
          progress: bool = True, resume: bool = False) -> dict:
    """Validate everything (every variant's config and data), create the sweep folder and the
    parent MLflow run, train each variant × seed into its own run directory, then compare (table
    data, sweep.json, loss_curves.png; both logged to the parent run). Returns the comparison.
    ``resume``: continue the newest unfinished sweep of the same grid instead: its finished runs
    are kept, an interrupted one resumes from its checkpoint, the others train."""
    from gptx import compare, tracking
    from gptx.runs import check_writable, experiment_dir
    from gptx.training.signals import Interrupted

    alpha = compare.check_alpha(alpha)
    check_seeds(seeds, vary)
    planned = plan(base, vary, list(overrides), seeds)
    grid = {"vary": list(vary), "set": list(overrides), "seeds": seeds}
    base_cfg = planned[0].cfg
    folder = find_resumable(experiment_dir(base_cfg), grid, planned) if resume else None
    check_all(planned, len(planned) // seeds, progress)
    check_writable(base_cfg)
    uri = tracking.tracking_uri(base_cfg.tracking.uri)
    earlier = read_sweep_file(folder) if folder is not None else {}
    parent = None
    if base_cfg.tracking.enabled:
        tracking.check_store(uri)
        parent = tracking.MlflowTracker(uri, base_cfg.name, f"sweep {' '.join(vary)}" + (f" × {seeds} seeds" if seeds > 1 else ""),
                                        run_id=earlier.get("parent_run_id") if isinstance(earlier.get("parent_run_id"), str) else None)
    status, result = "FAILED", {}
    try:
        if folder is None:
            folder = compare.new_folder(experiment_dir(base_cfg), "sweep")
        result = {"parent_run_id": parent.run_id if parent else None, "folder": str(folder), "grid": grid}
        compare.write_json(folder / "sweep.json", result | {"status": "RUNNING", "pid": os.getpid()})
        if parent is not None and not earlier:
            parent.log_params({"sweep.vary": " ; ".join(vary), "sweep.variants": str(len(planned) // seeds),
                               "sweep.seeds": str(seeds), "sweep.alpha": str(alpha), "sweep.folder": str(folder)})
        runs = _train_all(planned, folder, parent, progress)
        result = _finish(planned, runs, folder, parent, alpha, base_cfg.name, grid) | {"status": "FINISHED"}
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt) as err:
        status = "KILLED"
        if isinstance(err, Interrupted):
            err.sweep_folder = folder
        raise
    finally:
        if status != "FINISHED" and folder is not None:  # what finished stays comparable: gptx compare FOLDER
            compare.write_json(folder / "sweep.json", result | {"status": status})
        if parent is not None:
            parent.finish(status)
    return result


def check_all(planned: list[Planned], n_variants: int, progress: bool) -> None:
    """Every check ``gptx run`` makes before it creates anything (data read and tokenized,
    memory, output directory, tracking store), for every variant, before the first trains: the
    last variant's empty data file costs nothing. Seeds change no check, so the first seed's
    variants stand for all (the plan is seed-major)."""
    from gptx.progress import StatusLine
    from gptx.training.plan import plan_run

    for p in planned[:n_variants]:
        cfg = p.cfg  # plan_run resolves a copy of it: each run resolves its own
        try:
            with StatusLine() if progress else contextlib.nullcontext() as status:
                plan_run(cfg, progress=status)
        except ConfigError as err:
            where = str(cfg.source) if cfg.source else None
            raise ConfigError(f"{err.problem} (variant {p.variant.label})", err.key, err.file or where) from None
        except GptxError as err:
            raise GptxError(f"{err} (variant {p.variant.label})") from None


def read_sweep_file(folder: Path) -> dict:
    from gptx.runs import SWEEP_FILE, read_json_file

    return read_json_file(folder / SWEEP_FILE, "sweep folder")


def find_resumable(root: Path, grid: dict, planned: list[Planned]) -> Path:
    """The newest sweep folder under ``root`` that did not finish and was started with this very
    grid (--vary, --set, --seeds); one whose sweep is still running is refused."""
    from gptx.fsutil import pid_alive

    folders = sorted((p for p in root.glob("sweep-*") if (p / "sweep.json").is_file()), key=lambda p: p.stat().st_mtime) \
        if root.is_dir() else []
    for folder in reversed(folders):
        try:
            info = read_sweep_file(folder)
        except GptxError:
            continue  # a damaged sweep.json is not this sweep's
        if info.get("grid") != grid or info.get("status") == "FINISHED":
            continue
        pid = info.get("pid")
        if info.get("status") == "RUNNING" and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            raise GptxError(f"--resume: the sweep in {folder} is still running (pid {pid}); stop it first")
        return folder
    raise GptxError(f"--resume: no unfinished sweep of '{planned[0].cfg.name}' with these --vary, --set and --seeds "
                    f"under {root}")


def _train_all(planned: list[Planned], folder: Path, parent, progress: bool) -> list:
    """Each variant × seed in order. A run directory that is there already (a resumed sweep) is
    kept when its run finished, resumed from its newest checkpoint when it has one, and trained
    again from the start when it has none (nothing of it was worth keeping)."""
    from gptx import checkpoint as ckpt
    from gptx.runs import from_run_dir, read_run_file
    from gptx.training.trainer import train

    runs = []
    for i, p in enumerate(planned, 1):
        cfg = p.cfg
        cfg.tracking.run_name = " ".join(filter(None, [cfg.tracking.run_name, p.variant.label, f"seed={cfg.training.seed}"]))
        if parent is not None:
            cfg.tracking.parent_run_id = parent.run_id
        run_dir = folder / p.dir_name
        resume = None
        if run_dir.is_dir() and read_run_file(run_dir).get("status") == "FINISHED":
            if progress:
                print(f"== [{i}/{len(planned)}] {cfg.tracking.run_name}: finished before, kept", file=sys.stderr, flush=True)
            runs.append(from_run_dir(run_dir))
            continue
        if run_dir.is_dir() and ckpt.complete_checkpoints(run_dir / "checkpoints"):
            resume = run_dir
        else:
            run_dir.mkdir(exist_ok=True)  # a directory of ours that no checkpoint reached starts over
        if progress:
            print(f"== [{i}/{len(planned)}] {cfg.tracking.run_name}" + (" (resumed)" if resume else ""), file=sys.stderr, flush=True)
        if resume is not None:
            train(cfg, resume=resume, progress=progress)
        else:
            train(cfg, progress=progress, run_dir=run_dir)
        runs.append(from_run_dir(run_dir))
    return runs


def _finish(planned: list[Planned], runs: list, folder: Path, parent, alpha: float, experiment: str, grid: dict) -> dict:
    from gptx import compare

    labels = list(dict.fromkeys(p.variant.label for p in planned))
    by_label = {label: [r for p, r in zip(planned, runs) if p.variant.label == label] for label in labels}
    settings = {p.variant.label: p.variant.settings for p in planned}
    groups = [compare.Group(label, settings[label], by_label[label]) for label in labels]
    result = compare.summarize(groups, alpha) | {"parent_run_id": parent.run_id if parent else None, "folder": str(folder),
                                                  "grid": grid}
    n_seeds = len(runs) // len(groups)
    title = f"{experiment} sweep: {len(groups)} variants × {n_seeds} seed{'s' * (n_seeds != 1)}"
    result["plots"] = [str(compare.plot(groups, folder, title))]
    compare.write_json(folder / "sweep.json", result | {"status": "FINISHED"})
    if parent is not None:
        parent.log_artifact(folder / "sweep.json")
        parent.log_artifact(Path(result["plots"][0]))
        parent.log_text(compare.table(result), "table.txt")
    return result
