"""A dataset that needs its own file, through gptx's hooks only:

- dataset ``jsonl_docs``: a JSON-lines file, one ``{"text": ...}`` document per line. The last
  ``val_documents`` documents are the validation split, whole: no validation document is ever
  half in training, as a cut at a fraction of the tokens (the built-in ``text``) can leave one.

It reads and tokenizes with what the built-in ``text`` dataset uses (``gptx.prepare.Source``,
``gptx.data.cached_tokens``: streaming, parallel, cached once per tokenizer) and serves windows
through the built-ins' ``TokenArrayDataset`` (batches, evaluation windows, resumable stream).
"""
from __future__ import annotations

import dataclasses

import numpy as np

import gptx
from gptx.errors import ConfigError, GptxError
from gptx.options import option
from gptx.plugins.datasets import TokenArrayDataset, TokenSplit

SCAN_TOKENS = 1 << 20  # ids read per step while looking for the validation documents


@dataclasses.dataclass(frozen=True)
class JsonlDocsOptions:
    path: str = dataclasses.field(default="data/docs.jsonl", metadata={"path": True})  # a .jsonl file, relative to the experiment file
    val_documents: int = option(10, low=1)  # the last this many documents validate


def last_starts(ids: np.ndarray, eot: int, count: int) -> np.ndarray:
    """Where the last ``count`` documents start (each begins with ``eot``), or fewer if there are
    fewer; read back from the end in blocks, so a corpus beyond memory is not scanned whole."""
    found, end = [], len(ids)
    while end > 0 and sum(len(f) for f in found) < count:
        start = max(0, end - SCAN_TOKENS)
        found.insert(0, start + np.flatnonzero(ids[start:end] == eot))  # [n] positions in this block
        end = start
    return np.concatenate(found)[-count:] if found else np.zeros(0, dtype=np.int64)


class JsonlDocs(TokenArrayDataset):
    """JSON-lines documents; the last ``val_documents`` of them validate."""

    Options = JsonlDocsOptions

    def prepare(self):
        if self.tokenizer.eot_id is None:  # the documents' boundaries are its end-of-text tokens
            raise ConfigError(f"jsonl_docs needs a tokenizer with an end-of-text token; "
                              f"{type(self.tokenizer).__name__} has none", "tokenizer.kind")
        ids = self._tokens()
        cut = self._validation_start(ids)
        name = [self.options.path]
        self.splits = {"train": TokenSplit([ids[:cut]], name, self.block_size),
                       "val": TokenSplit([ids[cut:]], name, self.block_size)}
        self.check_splits("data.val_documents", "val_documents")

    def _tokens(self) -> np.ndarray:
        """The file's ids, memory-mapped from gptx's token cache; a bad file is one line naming data.path."""
        from gptx.data import cached_tokens
        from gptx.prepare import Source, fit

        try:
            source = Source(self.options.path)  # already absolute: declared a path
            if not source.jsonl:
                raise GptxError(f"{source.path}: expected a .jsonl file of {{\"text\": ...}} documents")
            if self.tokenizer.requires_fit and not self.tokenizer.state():
                fit(self.tokenizer, source, self.progress)
            return cached_tokens(source, self.tokenizer, self.progress)
        except GptxError as err:
            raise ConfigError(str(err), "data.path") from None

    def _validation_start(self, ids: np.ndarray) -> int:
        """The position of the first validation document; at least one document must train."""
        want = self.options.val_documents
        starts = last_starts(ids, self.tokenizer.eot_id, want + 1)  # one more: the last training document
        if len(starts) <= want:
            raise ConfigError(f"{self.options.path} holds {len(starts)} documents; val_documents = {want} "
                              f"leaves none to train on", "data.val_documents")
        return int(starts[-want])


@gptx.hookimpl
def register_dataset(register):
    register("jsonl_docs", JsonlDocs)
