"""Compare finished runs: group them by the settings that differ between them (runs that differ
only in ``training.seed`` are one group), summarise each group's ``final_val_loss`` over its
seeds (mean ± sample std, t-based 95% interval), test each group against the base group (the
first) with Welch's t-test, and draw the loss curves. ``gptx sweep`` and ``gptx compare`` both
end here, so they report the same numbers for the same runs. Torch-free.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Optional

from gptx import stats
from gptx.errors import GptxError
from gptx.runs import TARGET_KEYS, FinishedRun

METRIC = "final_val_loss"  # the whole validation split: no sampling noise
FALLBACK = "val_loss"  # the last sampled estimate, for runs that skipped the final evaluation
TEST = "Welch's two-sample t-test (two-sided, unequal variances) of each variant against the base"
# Settings that name or file a run rather than change what it trains.
IGNORED = {"training.seed", "training.out_dir", "tracking.run_name", "tracking.parent_run_id", "tracking.uri",
           "tracking.enabled"}


@dataclasses.dataclass
class Group:
    label: str
    settings: dict[str, str]  # what sets this group apart
    runs: list[FinishedRun]


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):  # NaN fails both comparisons
        raise GptxError(f"--alpha: must be a number strictly between 0 and 1, got {alpha}")
    return float(alpha)


def group_runs(runs: list[FinishedRun]) -> list[Group]:
    """Groups in the order their first run was named; the first is the base."""
    keys = sorted({k for r in runs for k in r.settings} - IGNORED)
    differing = [k for k in keys if len({r.settings.get(k) for r in runs}) > 1]
    groups: dict[tuple, Group] = {}
    for run in runs:
        ident = tuple(run.settings.get(k) for k in differing)
        if ident not in groups:
            groups[ident] = Group("", {k: run.settings[k] for k in differing if k in run.settings}, [])
        groups[ident].runs.append(run)
    _label(list(groups.values()), runs, differing)
    return list(groups.values())


def _label(groups: list[Group], runs: list[FinishedRun], differing: list[str]) -> None:
    """Label each group by the keys that tell groups apart. A key only some runs have (an option
    of one component kind) is left out when it holds one value wherever it is set: the kind says it."""
    telling = [k for k in differing if len({r.settings[k] for r in runs if k in r.settings}) > 1
               or all(k in r.settings for r in runs)]
    for g in groups:
        g.label = " ".join(f"{k}={g.settings[k]}" for k in telling if k in g.settings) or "all runs"
    if len({g.label for g in groups}) < len(groups):  # still ambiguous: show every differing key
        for g in groups:
            g.settings = {k: g.settings.get(k, "-") for k in differing}
            g.label = " ".join(f"{k}={v}" for k, v in g.settings.items())
    else:
        for g in groups:
            g.settings = {k: g.settings[k] for k in telling if k in g.settings}


def summarize(groups: list[Group], alpha: float) -> dict:
    """The comparison as plain data (what ``--json`` prints and sweep.json/compare.json hold)."""
    metric = METRIC if any(METRIC in r.results for g in groups for r in g.runs) else FALLBACK
    base_values = _values(groups[0], metric)
    variants = []
    for i, g in enumerate(groups):
        values = _values(g, metric)
        s = stats.summarize(values)
        entry = {"variant": g.label, "settings": g.settings, "base": i == 0, "n": s.n, "mean": s.mean, "std": s.std,
                 "ci95": list(s.ci95) if s.ci95 else None, "diff": None, "diff_ci95": None, "p_value": None,
                 "significant": None}
        if i > 0 and values and base_values:
            w = stats.welch(base_values, values)
            entry |= {"diff": w.diff, "diff_ci95": list(w.ci95) if w.ci95 else None, "p_value": w.p_value,
                      "significant": None if w.p_value is None else w.p_value < alpha}
        entry |= {"tokens_per_sec": _median([v for r in g.runs for v in _tok_s(r)]),
                  "wall_seconds": _median([r.wall_seconds for r in g.runs if r.wall_seconds is not None]),
                  "params": next((r.num_params for r in g.runs if r.num_params), None),
                  "runs": [_run_entry(r, metric) for r in g.runs]}
        for key in TARGET_KEYS:
            got = [r.results[key] for r in g.runs if key in r.results]
            if got:
                entry[key] = {"mean": statistics.fmean(got), "std": statistics.stdev(got) if len(got) > 1 else None,
                              "runs_with_it": len(got)}
        variants.append(entry)
    return {"metric": metric, "alpha": alpha, "test": TEST, "base": groups[0].label,
            "seeds": sorted({r.seed for g in groups for r in g.runs if r.seed is not None}), "variants": variants}


def _values(g: Group, metric: str) -> list[float]:
    return [r.results[metric] for r in g.runs if metric in r.results and math.isfinite(r.results[metric])]


def _tok_s(run: FinishedRun) -> list[float]:
    return [r["tokens_per_sec"] for r in run.records if "tokens_per_sec" in r]


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _run_entry(run: FinishedRun, metric: str) -> dict:
    return {"run_id": run.run_id, "run_dir": str(run.run_dir) if run.run_dir else None, "name": run.name,
            "seed": run.seed, metric: run.results.get(metric), "tokens_per_sec": run.median_tokens_per_sec(),
            "wall_seconds": run.wall_seconds} | {k: run.results[k] for k in TARGET_KEYS if k in run.results}


# ---- the table -------------------------------------------------------------------------------

def _f(v: Optional[float], fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _p(p: Optional[float]) -> str:
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _count(n: Optional[int]) -> str:
    if not n:
        return "-"
    return f"{n:,}" if n < 10_000_000 else f"{n / 1e6:.1f}M"  # small models differ in the thousands


def _hms(seconds: Optional[float]) -> str:
    from gptx.progress import hms

    return "-" if seconds is None else hms(round(seconds))


def _target_cell(key: str, entry: dict) -> str:
    got = entry.get(key)
    if not got:
        return "-"
    fmt = {"best_val_loss": lambda v: f"{v:.4f}", "steps_to_target": lambda v: f"{v:,.0f}",
           "tokens_to_target": lambda v: f"{v / 1e6:.2f}M", "seconds_to_target": _hms}[key]
    return fmt(got["mean"]) + ("" if key == "best_val_loss" else f" ({got['runs_with_it']}/{entry['n']})")


def table(result: dict) -> str:
    """Best mean first; the base marked; '*' where the difference is significant at alpha."""
    targets = [k for k in TARGET_KEYS if any(k in v for v in result["variants"])]
    final = result["metric"] == METRIC
    head = ["variant", "n", "final val loss" if final else "val loss (sampled)", "95% CI", "diff vs base", "p", "tok/s (median step)", "wall/run",
            "params", *[k.replace("_", " ") for k in targets]]
    rows = []
    order = sorted(result["variants"], key=lambda v: (v["mean"] is None, v["mean"] or 0.0))
    for v in order:
        spread = f" ± {v['std']:.4f}" if v["std"] is not None else ""
        ci = f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v["ci95"] else "-"
        diff = "(base)" if v["base"] else _f(v["diff"], "+.4f")
        mark = " *" if v["significant"] else ""
        params = _count(v["params"])
        rows.append([v["variant"], str(v["n"]), _f(v["mean"]) + spread, ci, diff, _p(v["p_value"]) + mark,
                     _f(v["tokens_per_sec"], ",.0f"), _hms(v["wall_seconds"]), params,
                     *[_target_cell(k, v) for k in targets]])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    loss = ("final val loss: mean ± sample std over the n seeds ({}) of the loss on the whole validation split"
            if final else "val loss (sampled): mean ± sample std over the n seeds ({}) of the last evaluation's val loss "
            "(sampled batches: the runs skipped the whole-split evaluation, training.final_eval_tokens = 0)")
    notes = [
        loss.format(", ".join(map(str, result["seeds"])) or "-") + "; 95% CI of the mean (Student t).",
        f"p: Welch's t-test (two-sided) against the base; * marks p < {result['alpha']:g}.",
        "tok/s: the median over all training steps of all seeds of tokens / step time (the progress lines show "
        "single steps); wall/run: median time from a run's first step to its final evaluation, evaluations included.",
    ]
    if any(v["n"] < 2 for v in result["variants"]):
        notes.append("one seed gives no spread and no test: use --seeds 3 or more.")
    wrapped = [w for note in notes for w in textwrap.wrap(note, 100, subsequent_indent="  ")]
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), "", *wrapped])


# ---- outputs ---------------------------------------------------------------------------------

def new_folder(parent: Path, prefix: str) -> Path:
    """``parent/<prefix>-<timestamp>``, never an existing one (a suffix when two start in one second)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        folder = parent / (f"{prefix}-{stamp}" + (f"-{i + 1}" if i else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise GptxError(f"{parent}: cannot find a new folder name for {prefix}-{stamp}")


def write_json(path: Path, data: dict) -> None:
    from gptx.fsutil import write_atomic

    write_atomic(path, json.dumps(data, indent=2))


PLOT = "loss_curves.png"


def plot(groups: list[Group], folder: Path, title: str) -> Path:
    from gptx.plots import plot_groups

    return plot_groups([(g.label, g.settings, [r.records for r in g.runs]) for g in groups], folder / PLOT, title)


def compare(names: list[str], alpha: float, out: Optional[Path], tracking_uri: Optional[str]) -> tuple[dict, list[str]]:
    """``gptx compare``: load and check everything first, then create ``out`` (default: a new
    ``runs/compare-<timestamp>``) with compare.json and the plot. Returns the result and warnings."""
    from gptx.runs import MlflowRuns, resolve

    alpha = check_alpha(alpha)
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptxError(f"--out: {out} exists and is not an empty folder; name a new one")
    runs, warnings = resolve(names, MlflowRuns(tracking_uri))
    if not runs:  # say why each was passed over (a diverged run keeps its reason in run.json)
        raise GptxError("no finished runs to compare" + (f" ({'; '.join(warnings)})" if warnings else ""))
    groups = group_runs(runs)
    result = summarize(groups, alpha)
    if out is None:
        folder = new_folder(Path("runs").resolve(), "compare")
    else:
        out.mkdir(parents=True, exist_ok=True)
        folder = out
    result |= {"folder": str(folder.resolve()), "parent_run_id": None}
    experiments = sorted({r.experiment for r in runs})
    result["plots"] = [str(plot(groups, folder, _title(experiments, groups)))]
    write_json(folder / "compare.json", result)
    return result, warnings


def _title(experiments: list[str], groups: list[Group]) -> str:
    seeds = sorted({len(g.runs) for g in groups})
    per = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    return f"{', '.join(experiments)}: {len(groups)} variant{'s' * (len(groups) != 1)} × {per} seed{'s' * (seeds != [1])}"
