"""``gptx eval SOURCE --harness TASK[,TASK]``: lm-eval's ``simple_evaluate`` on SOURCE.

SOURCE is what ``gptx eval`` takes (a checkpoint or run directory, ``runs:/<id>``, an ONNX export
directory), scored by the ``gptx`` backend (``gptx.harness``); or a ``gptx export --format hf``
folder (its config.json has a "gptx" key), scored by lm-eval's own ``hf`` backend, as anyone
who is handed that folder would score it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path
from typing import Optional

from gptx.errors import GptxError


MAX_FEWSHOT = 10_000  # examples in one prompt: far past any context, and a bound lm-eval does not set
MAX_LIMIT = 2**31 - 1  # examples per task; a larger one means "all" and is said with no --limit

def hf_export_config(source: str) -> Optional[dict]:
    """config.json of a ``gptx export --format hf`` folder; None for any other source."""
    path = Path(source) / "config.json"
    if str(source).startswith("runs:/") or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "gptx" in config else None


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise GptxError("--harness: give one or more lm-eval task names, separated by commas")
    return names


def task_manager(names: list[str], include_path: Optional[str]):
    """A TaskManager that knows every name: the include path's alone when it holds them all (lm-eval's
    own index of thousands of tasks takes seconds to build), else lm-eval's too."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise GptxError(f"--include-path: {include_path}: no such directory")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(local, n) for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        where = f" or in {include_path}" if include_path else " (--include-path DIR adds a folder of task YAMLs)"
        raise GptxError(f"--harness: unknown task {unknown[0]!r}: not one of lm-eval's tasks{where}")
    return manager


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def model_for(source: str, device: str, batch: Optional[int]):
    """(lm-eval model name, its model_args) for SOURCE."""
    config = hf_export_config(source)
    if config is None:
        importlib.import_module("gptx.harness")  # registers the model "gptx" with lm-eval

        return "gptx", {"checkpoint": source, "device": device, "batch_size": batch}
    from lm_eval.api.registry import get_model

    try:
        get_model("hf")
    except ImportError as err:
        raise GptxError(f"{source}: a Hugging Face export is scored by lm-eval's hf backend, which needs "
                        f"{err.name or 'transformers'}: pip install 'lm-eval[hf]'") from None
    args = {"pretrained": source, "dtype": "float32", "device": device, "batch_size": batch or 1}
    if config.get("bos_token_id") is None:  # char and byte tokenizers have no end-of-text: as the gptx backend
        args["prefix_token_id"] = 0
    return "hf", args


def evaluate(source: str, harness: str, include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
             limit: Optional[int] = None, batch: Optional[int] = None, device: str = "cpu") -> dict:
    """lm-eval's results for SOURCE on the tasks, JSON-ready: "results" is lm-eval's own dict."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    if num_fewshot is not None and num_fewshot < 0:
        raise GptxError(f"--num-fewshot: must be at least 0, got {num_fewshot}")
    if num_fewshot is not None and num_fewshot > MAX_FEWSHOT:
        raise GptxError(f"--num-fewshot: must be at most {MAX_FEWSHOT:,}, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise GptxError(f"--limit: must be at least 1 example per task, got {limit}")
    if limit is not None and limit > MAX_LIMIT:
        raise GptxError(f"--limit: must be at most {MAX_LIMIT:,} examples per task, got {limit}")
    if batch is not None and batch < 1:
        raise GptxError(f"--batch-size: must be at least 1, got {batch}")
    names = task_names(harness)
    manager = task_manager(names, include_path)
    model, model_args = model_for(source, device, batch)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval and transformers print progress: stdout is the result's
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, task_manager=manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=False)
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    picked = {"source": source, "backend": model} | {k: out[k] for k in keep if k in out}
    # lm-eval's own encoder for its result files: numpy scalars become Python numbers, values unchanged
    return json.loads(json.dumps(picked, default=handle_non_serializable))


def table(result: dict) -> str:
    """lm-eval's own results table (and its groups', where tasks form groups)."""
    from lm_eval.utils import make_table

    text = make_table(result)
    return text + ("\n" + make_table(result, "groups") if result.get("groups") else "")
