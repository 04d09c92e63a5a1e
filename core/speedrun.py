"""``gptx bench --only speedrun``: time to nanoGPT's quality, measured as whole processes.

Each recipe runs as its own ``gptx run`` process, timed from outside (start-up, tokenization,
tracking, the final whole-split evaluation: everything a user waits for), alternating per seed:
nanoGPT's recipe (``shakespeare_char.toml``, step for step nanoGPT's CPU run) then the speedrun
(``speedrun_char.toml``), so a drift in the machine's speed hits both. The ratio is taken pair by
pair. With ``--nanogpt DIR`` (a nanoGPT checkout with ``data/shakespeare_char`` prepared) nanoGPT
itself runs its README's CPU command in the same rotation.

Both gptx recipes log to one MLflow store in the work folder, created before the clock starts
(its one-time creation, ~4 s, is reported apart: it is paid once per folder, by either recipe).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from gptx.errors import GptxError

TARGET = 1.90  # nanoGPT's checkpoints score 1.891-1.908 on the whole validation split (3 seeds)
SEED_CEILING = 1.92  # and no single seed of the speedrun may score above this
RECIPES = {"nanogpt_recipe": "shakespeare_char.toml", "speedrun": "speedrun_char.toml"}
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100", "--block_size=64",
                     "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
TIMEOUT_S = 3600
BENCH_SETS = ("training.seed", "training.out_dir")  # set by gptx_run for every run (tracking.* too)


def experiments() -> Path:
    return Path(str(resources.files("gptx.experiments")))


def check_nanogpt(directory: Optional[str]) -> Optional[Path]:
    """The nanoGPT checkout to time, checked before anything runs."""
    if directory is None:
        return None
    d = Path(directory).expanduser().resolve()
    if not (d / "train.py").is_file() or not (d / "config" / "train_shakespeare_char.py").is_file():
        raise GptxError(f"--nanogpt: {d} is not a nanoGPT checkout (no train.py and config/train_shakespeare_char.py)")
    if not (d / "data" / "shakespeare_char" / "train.bin").is_file():
        raise GptxError(f"--nanogpt: {d}/data/shakespeare_char/train.bin is missing; run "
                        "python data/shakespeare_char/prepare.py there first")
    return d


def timed_process(cmd: list[str], cwd: Path, what: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` as a whole process; its output and wall seconds. A failure is one line naming ``what``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise GptxError(f"{what} failed with exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return proc, wall


def check_overrides(overrides: tuple) -> None:
    """``--speedrun-set``: the speedrun recipe with these overrides must load and plan, checked
    before anything runs (one line naming the recipe and the key otherwise)."""
    if not overrides:
        return
    from gptx.config import load_experiment, parse_override
    from gptx.errors import ConfigError
    from gptx.training.plan import plan_run

    recipe = experiments() / RECIPES["speedrun"]
    for item in overrides:
        try:
            key = ".".join(parse_override(item)[0])
        except ConfigError:
            continue  # load_experiment below names the malformed override
        if key in BENCH_SETS or key.startswith("tracking."):
            raise GptxError(f"--speedrun-set {item}: {key} is the bench's own (one seed, run folder and MLflow store "
                            "per run: --speedrun-seeds chooses the seeds)")
    try:
        plan_run(load_experiment(recipe, list(overrides)), outputs=False)
    except ConfigError as err:
        where = str(err.located(recipe.name))  # names the override as "--set KEY=VALUE: ..."
        raise GptxError(f"--speedrun-{where[2:]}" if where.startswith("--set") else f"--speedrun-set: {where}") from None


def gptx_run(recipe: str, seed: int, steps: Optional[int], work: Path, overrides: tuple = ()) -> dict:
    """One whole ``gptx run`` process: its wall seconds and the final whole-split val loss."""
    cmd = [sys.executable, "-m", "gptx", "run", str(experiments() / RECIPES[recipe]), "--quiet",
           "--set", f"training.seed={seed}",
           "--set", f"training.out_dir={json.dumps(str(work / 'runs'))}",
           "--set", f"tracking.uri={json.dumps('sqlite:///' + str(work / 'mlflow.db'))}"]
    for item in overrides:
        cmd += ["--set", item]
    if steps is not None:
        cmd += ["--set", f"training.max_steps={steps}"]
    proc, wall = timed_process(cmd, work, f"speedrun: {recipe} (seed {seed})")
    found = re.search(r"whole validation split: ([0-9.]+)\)", proc.stdout)
    return {"wall_s": round(wall, 2), "final_val_loss": float(found.group(1)) if found else None,
            "reached": bool(found) and float(found.group(1)) <= TARGET}


def nanogpt_run(directory: Path, seed: int, steps: Optional[int], work: Path) -> dict:
    """nanoGPT's README CPU command as a whole process (its seed is fixed in its train.py: the
    runs differ only in the machine's noise); its last printed val loss is a 20-batch estimate."""
    iters = steps or 2000
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_FLAGS,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={work / f'nanogpt-{seed}'}"]
    proc, wall = timed_process(cmd, directory, "speedrun: nanoGPT")
    found = re.findall(r"step \d+: train loss [0-9.]+, val loss ([0-9.]+)", proc.stdout)
    return {"wall_s": round(wall, 2), "printed_val_loss": float(found[-1]) if found else None}


def run(seeds: int = 3, base_seed: int = 1337, steps: Optional[int] = None, nanogpt: Optional[str] = None,
        work: Optional[Path] = None, log: Callable[[str], None] = lambda s: None, overrides: tuple = ()) -> dict:
    """Run the recipes ``seeds`` times, alternating; per-seed rows, means and the ratio.
    ``overrides`` (``--speedrun-set``) change the speedrun recipe alone: an ablation's row."""
    import tempfile

    from gptx import tracking

    nano_dir = check_nanogpt(nanogpt)
    with tempfile.TemporaryDirectory(prefix="gptx-speedrun-") as tmp:
        work = Path(work or tmp)
        t0 = time.perf_counter()
        tracking.ensure_sqlite_store("sqlite:///" + str(work / "mlflow.db"))
        store_s = round(time.perf_counter() - t0, 2)
        rows = []
        for i in range(seeds):
            seed = base_seed + i
            row: dict = {"seed": seed}
            for recipe in RECIPES:
                log(f"seed {seed}: {recipe} ({RECIPES[recipe]})...")
                row[recipe] = gptx_run(recipe, seed, steps, work, overrides if recipe == "speedrun" else ())
            if nano_dir is not None:
                log(f"seed {seed}: nanoGPT ({nano_dir})...")
                row["nanogpt"] = nanogpt_run(nano_dir, seed, steps, work)
            row["ratio"] = round(row["speedrun"]["wall_s"] / row["nanogpt_recipe"]["wall_s"], 4)
            if "nanogpt" in row:
                row["ratio_vs_nanogpt"] = round(row["speedrun"]["wall_s"] / row["nanogpt"]["wall_s"], 4)
            rows.append(row)
    mean = lambda values: round(sum(values) / len(values), 4) if values and None not in values else None  # noqa: E731
    summary = {name: {"wall_s": mean([r[name]["wall_s"] for r in rows]),
                      "final_val_loss": mean([r[name]["final_val_loss"] for r in rows])} for name in RECIPES}
    summary["ratio"] = mean([r["ratio"] for r in rows])
    if nano_dir is not None:
        summary["nanogpt"] = {"wall_s": mean([r["nanogpt"]["wall_s"] for r in rows])}
        summary["ratio_vs_nanogpt"] = mean([r["ratio_vs_nanogpt"] for r in rows])
    loss = summary["speedrun"]["final_val_loss"]
    worst = max((r["speedrun"]["final_val_loss"] for r in rows), key=lambda v: float("inf") if v is None else v)
    summary["speedrun_worst_seed"] = worst
    summary["speedrun_reaches_target"] = loss is not None and loss <= TARGET and worst is not None and worst <= SEED_CEILING
    return {"target_val_loss": TARGET, "seed_ceiling": SEED_CEILING, "steps": steps, "overrides": list(overrides),
            "store_creation_s": store_s, "runs": rows, "mean": summary}


def table(result: dict) -> str:
    lines = [f"time to whole-split val loss <= {result['target_val_loss']}, mean of the seeds, none above "
             f"{result['seed_ceiling']} (whole processes, alternating per seed; the MLflow store's one-time creation, "
             f"{result['store_creation_s']} s, before the clock):"]
    if result["overrides"]:
        lines.append(f"  speedrun recipe with {' '.join(result['overrides'])}")
    head = f"  {'seed':>6} {'nanoGPT recipe s':>17} {'val':>7} {'speedrun s':>11} {'val':>7} {'ratio':>7}"
    with_nano = any("nanogpt" in r for r in result["runs"])
    lines.append(head + (f" {'nanoGPT s':>10} {'ratio':>7}" if with_nano else ""))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in result["runs"]:
        a, b = r["nanogpt_recipe"], r["speedrun"]
        line = f"  {r['seed']:>6} {a['wall_s']:>17.1f} {fmt(a['final_val_loss']):>7} {b['wall_s']:>11.1f} {fmt(b['final_val_loss']):>7} {r['ratio']:>7.3f}"
        if with_nano:
            line += f" {r['nanogpt']['wall_s']:>10.1f} {r['ratio_vs_nanogpt']:>7.3f}"
        lines.append(line)
    m = result["mean"]
    line = (f"  {'mean':>6} {m['nanogpt_recipe']['wall_s']:>17.1f} {fmt(m['nanogpt_recipe']['final_val_loss']):>7} "
            f"{m['speedrun']['wall_s']:>11.1f} {fmt(m['speedrun']['final_val_loss']):>7} {m['ratio']:>7.3f}")
    if with_nano:
        line += f" {m['nanogpt']['wall_s']:>10.1f} {m['ratio_vs_nanogpt']:>7.3f}"
    lines.append(line)
    verdict = "reaches" if m["speedrun_reaches_target"] else "does not reach"
    worst = fmt(m["speedrun_worst_seed"])
    lines.append(f"  the speedrun {verdict} the target (mean {fmt(m['speedrun']['final_val_loss'])}, worst seed {worst})")
    return "\n".join(lines)
