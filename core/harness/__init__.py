"""A backend for EleutherAI's lm-evaluation-harness (``lm_eval``): any gptx checkpoint, run
directory, ``runs:/<id>`` or ONNX export, scored on lm-eval's tasks.

Registered as lm-eval's model ``gptx`` on import. lm-eval 0.4 finds its models in its own
registry only (no entry points), so this package is imported first: by ``gptx eval SOURCE
--harness TASKS``, by ``python -m gptx.harness run --model gptx --model_args checkpoint=PATH ...``
(lm-eval's own command line, with this backend added), or by ``import gptx.harness`` before
calling ``lm_eval.simple_evaluate(model="gptx", ...)``. Importing it imports lm_eval, so nothing
else in gptx imports it at module level.

The three request types follow lm-eval's ``hf`` backend step for step, so that a checkpoint
scores what its ``gptx export --format hf`` folder scores there: requests sorted longest first
(``Collator``), batches right-padded to their longest row and run in one forward each,
log-softmax in float32, one-token continuations of one context scored from one row, rolling
windows from ``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window`` over the
model's context. Generation is gptx's own (KV cache), greedy unless a task samples, stopping
each row at end-of-text or at the first of the task's stop sequences.

Model arguments: ``checkpoint`` (required), ``device`` (cpu), ``batch_size`` (rows per forward;
default by memory, as ``gptx eval``), ``prefix_token_id`` (what an empty context conditions on:
default the end-of-text token, or id 0 for a tokenizer without one, such as char and byte),
``max_gen_toks`` (256, as the hf backend), ``seed`` (of a sampling task's sampler).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from gptx.errors import GptxError
from gptx.numeric import int_or_none
from gptx.sampling import Sampler

log = logging.getLogger(__name__)
SAMPLING_KWARGS = {"do_sample", "temperature", "top_k", "top_p"}  # what gptx's Sampler reads; others are ignored


def _whole(value, name: str, low: int) -> Optional[int]:
    """A model argument that must be a whole number >= low (lm-eval passes them as text or ints)."""
    if value is None:
        return None
    number = None if isinstance(value, bool) else int_or_none(value, low)
    if number is None:
        raise GptxError(f"{name}: must be a whole number of at least {low}, got {value!r}")
    return number


def _usable(device) -> str:
    """The device to run on. lm-eval's command line asks for cuda:0 unless told otherwise; on a
    machine without CUDA that means the CPU, as lm-eval's hf backend takes it (``gptx eval
    --device`` is checked before it gets here)."""
    device = str(device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("gptx backend: %s is not available here; running on the CPU", device)
        return "cpu"
    return device


@register_model("gptx")
class GptxLM(TemplateLM):
    """lm-eval's ``LM`` API over a gptx scorer (``gptx.evaluate.open_scorer``: PyTorch or onnxruntime)."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size=None, max_batch_size=None,
                 prefix_token_id=None, max_gen_toks=256, seed=1234):
        super().__init__()
        from gptx.evaluate import open_scorer, rows_per_batch

        device = _usable(device)
        self.scorer = open_scorer(str(checkpoint), device)
        self.tokenizer, self._device = self.scorer.tokenizer, device
        self.vocab_size = self.scorer.vocab_size  # read by rows_per_batch
        rows = None if batch_size in (None, "auto") else _whole(batch_size, "batch_size", 1)
        self.batch = rows_per_batch(self, self.max_length, rows) if rows is None else rows
        eot = self.tokenizer.eot_id
        self._prefix = _whole(prefix_token_id, "prefix_token_id", 0) if prefix_token_id is not None else (eot or 0)
        self._max_gen_toks = _whole(max_gen_toks, "max_gen_toks", 1)
        self.seed = _whole(seed, "seed", 0)

    # ---- what TemplateLM asks ------------------------------------------------------------

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.scorer.context

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)  # gptx tokenizers add no special tokens
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- loglikelihood ---------------------------------------------------------------------

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Token rows, longest first -> log-probabilities [B, L, V] float32, rows right-padded with id 0."""
        width = len(rows[0])
        ids = np.zeros((len(rows), width), dtype=np.int64)  # [B, L]
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        logits = torch.as_tensor(self.scorer.logits(ids))  # [B, L, V] float32 (a numpy array from onnxruntime)
        return F.log_softmax(logits, dim=-1)  # [B, L, V]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        """(log-probability, greedy?) of each continuation, in the requests' order."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        results = []
        for chunk in order.get_batched(n=override_bs or self.batch):
            # a row is context + continuation minus its last token, at most the context long
            # (its oldest tokens dropped): its logits at t predict token t + 1
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logprobs = self._forward(rows)  # [B, L, V]
            for (key, ctx, cont), row, lp in zip(chunk, rows, logprobs):
                scored = lp[len(row) - len(cont):len(row)].unsqueeze(0)  # [1, len(cont), V]
                greedy = scored.argmax(dim=-1)  # [1, len(cont)]
                for req_key, cont_ids, lp_one in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                                 logits=scored):
                    target = torch.tensor(cont_ids, dtype=torch.long, device=lp_one.device).unsqueeze(0)  # [1, n]
                    picked = torch.gather(lp_one, 2, target.unsqueeze(-1)).squeeze(-1)  # [1, n]
                    answer = (float(picked.sum()), bool((greedy[:, -target.shape[1]:] == target).all()))
                    results.append(answer)
                    if req_key is not None:
                        self.cache_hook.add_partial("loglikelihood", req_key, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, from disjoint windows of the model's context, the
        first conditioned on ``prefix_token_id``."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owners.append(index)
        totals = [0.0] * len(requests)
        for start in range(0, len(windows), self.batch):
            batch = windows[start:start + self.batch]
            for owner, (logprob, _) in zip(owners[start:start + self.batch],
                                           self._loglikelihood_tokens(batch, override_bs=len(batch))):
                totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generate_until --------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued until a stop sequence, end-of-text or ``max_gen_toks`` tokens."""
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = None if self.eot_token_id is None else self.tok_decode([self.eot_token_id])
        out = []
        for chunk in order.get_batched(n=self.batch):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)  # one Collator group: the same kwargs
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            texts = self._generate(list(contexts), new_tokens, until, kwargs)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return order.get_original(out)

    def _generate(self, contexts: list[str], new_tokens: int, until: list[str], kwargs: dict) -> list[str]:
        # the hf backend keeps the last (context - new_tokens) tokens of a prompt so the whole
        # generation fits the window; gptx's generator also slides past it, for longer generations
        keep = self.max_length - new_tokens
        prompts = [self.tok_encode(c, left_truncate_len=keep if keep > 0 else None) or [self.prefix_token_id]
                   for c in contexts]
        stops = [s for s in until if s]

        def stop(ids: list[int]) -> bool:
            text = self.tok_decode(ids)
            return any(s in text for s in stops)

        generated = self.scorer.generate(prompts, new_tokens, self._sampler(kwargs), stop if stops else None)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in generated.ids]

    def _sampler(self, kwargs: dict) -> Sampler:
        ignored = sorted(set(kwargs) - SAMPLING_KWARGS)
        if ignored:
            log.warning("gptx backend: ignoring generation arguments %s", ", ".join(ignored))
        temperature = float(kwargs.get("temperature") or 0.0)
        if not kwargs.get("do_sample") or temperature == 0.0:
            return Sampler(temperature=0.0)
        return Sampler(temperature=temperature, top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=self.seed)

    def get_model_info(self) -> dict:
        """What lm-eval records of the model in its results (``config``)."""
        return {"gptx_source": type(self.scorer).__name__, "context": self.max_length, "vocab_size": self.vocab_size}
