"""``python -m gptx.harness ARGS``: lm-eval's own command line with the ``gptx`` model added
(lm-eval 0.4 discovers models by import only, not by entry point), e.g.

    python -m gptx.harness run --model gptx --model_args checkpoint=runs/x --tasks hellaswag
"""
import importlib

from lm_eval.__main__ import cli_evaluate

importlib.import_module("gptx.harness")  # registers the model "gptx" with lm-eval
cli_evaluate()
